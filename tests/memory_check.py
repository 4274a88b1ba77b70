"""`pretrain plan`'s weights, gradients and optimizer bytes against a real engine, under torchrun:
python memory_check.py SPEC.json OUT.json. SPEC {"base": [overrides], "runs": {name: [overrides]}};
each run trains two steps and, as the second optimizer step begins (gradients reduced, Adam's
moments made by the first), every rank measures its engine (engine_memory.py) and predicts its
own share (plan.state_bytes for its stage, TP slice and data-parallel rank). OUT: per run, per
rank, {"measured": {...}, "predicted": {...}, "parameters": [planned, engine's]}."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from engine_memory import measure
from pretrain import parallel, plan
from pretrain.config import OptimizerName, Precision, load, validate
from pretrain.data import stream
from pretrain.train import Trainer


def check(config) -> dict:
    layout = validate(config, dist.get_world_size())
    context = parallel.initialize(layout.tp, layout.pp, "gloo", ep=layout.ep)
    try:
        trainer = Trainer(config, layout, context, stream.resolve(config))
        tensors = plan.stage_tensors(config.model, layout.tp, layout.pp, layout.ep)[context.pp_rank]
        predicted = plan.state_bytes(tensors, config.optimizer.zero_stage, layout.dp,
                                     config.train.precision == Precision.bf16,
                                     config.optimizer.zero3_param_persistence_threshold, dp_rank=context.dp_rank,
                                     muon=config.optimizer.name == OptimizerName.muon, ep=layout.ep)
        measured, steps, step = {}, [0], trainer.engine.optimizer.step

        def measured_step(*args, **kwargs):
            steps[0] += 1
            if steps[0] == 2:
                measured.update(measure(trainer.engine))
            return step(*args, **kwargs)

        trainer.engine.optimizer.step = measured_step
        trainer.run()
        engine_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters())
        return {"measured": measured, "predicted": predicted,
                "parameters": [sum(t.numel for t in tensors), engine_parameters]}
    finally:
        parallel.shutdown(destroy_process_group=False)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group("gloo")
    results = {}
    for name, overrides in spec["runs"].items():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, check(load(None, spec["base"] + overrides)))
        results[name] = gathered
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
