"""Runs several trainings in one launch (under torchrun or as one process) and writes each
run's per-step losses and gradient norms as JSON: python dist_runs.py SPEC.json OUT.json.

SPEC is {"config": yaml or null, "base": [overrides], "runs": {name: [overrides]}, and optionally
"split_check": [overrides]}: then the start-up batch check is also run on batches split by data-
parallel rank (must pass) and by global rank (must fail), with its message recorded; and
"checks": a module of tests/ whose checks() (collective) returns what to record. Launch
costs dominate on small machines, so tests put many runs of one world size into one launch."""

import importlib
import json
import sys
import time

import torch.distributed as dist

from dataclasses import replace

from pretrain import parallel
from pretrain.config import load, validate
from pretrain.data import stream
from pretrain.data.loader import MicroBatches
from pretrain.train import train


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    dist.init_process_group("gloo")  # kept across the runs below; torchrun or the caller set the env
    results = {}
    for name, overrides in spec["runs"].items():
        config = load(spec.get("config"), spec["base"] + overrides)
        started = time.perf_counter()
        result = train(config)
        if dist.get_rank() == 0:
            print(f"dist_runs: {name} took {time.perf_counter() - started:.1f} s", flush=True)
        results[name] = {"loss": result.losses, "grad_norm": result.grad_norms, "valid_loss": result.valid_losses,
                         "downstream": result.downstream}
    if "split_check" in spec:
        results["split_check"] = split_check(load(spec.get("config"), spec["base"] + spec["split_check"]))
    if "checks" in spec:
        results["checks"] = importlib.import_module(spec["checks"]).checks()
    if dist.get_rank() == 0:
        with open(out_path, "w") as out:
            json.dump(results, out, indent=1)
    dist.destroy_process_group()


def split_check(config) -> dict[str, str]:
    """The batch-agreement check on a correct and on a deliberately wrong (global-rank) split."""
    layout = validate(config, dist.get_world_size())
    info = stream.resolve(config)
    context = parallel.initialize(layout.tp, layout.pp, "gloo")
    outcome = {}
    try:
        for name, dp_rank in (("by_data_parallel_rank", context.dp_rank), ("by_global_rank", context.rank)):
            spec = stream.stream_spec(config, info, replace(layout, dp=context.world_size) if name == "by_global_rank"
                                        else layout, dp_rank, start_sample=0)
            batch = next(iter(MicroBatches(spec)))
            try:
                stream.check_batch_agreement(batch["tokens"], context.dp_rank)
                outcome[name] = "passed"
            except RuntimeError as error:
                outcome[name] = str(error)
    finally:
        parallel.shutdown(destroy_process_group=False)
    return outcome


if __name__ == "__main__":
    main(*sys.argv[1:])
