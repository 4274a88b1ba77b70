"""`pretrain convert reshard`: the whole training state of a checkpoint (weights, fp32 master
weights, Adam moments and step, scheduler, data position) for another TP/PP layout.

It goes through DeepSpeed's universal checkpoint format (one full tensor per parameter and
optimizer state, re-sliced for the TP rank when loaded; vocabulary padding stripped and re-added
for the new TP size). Parameter folders are renamed between the single-stage names (PP=1) and
DeepSpeed's layer-indexed pipeline names (PP>1). The result resumes at any data- and
context-parallel size, with or without sequence parallelism."""

import dataclasses
import os
import shutil
import time
from pathlib import Path

from pretrain.checkpoint import (
    UNIVERSAL_FORMAT, WEIGHTS, CheckpointError, layout_record, partial_dir, publish, step_dir, store_tokenizer,
    to_universal, tokenizer_dir, verify_files, write_marker,
)
from pretrain.config import OptimizerName, validate_without_data
from pretrain.convert.reader import CheckpointReader
from pretrain.model.pipeline import pipeline_name
from pretrain.outputs import staged


def reshard(checkpoint: str | Path, out: str | Path, tp: int, pp: int, step: int | None = None) -> Path:
    """Write the resharded step into the checkpoint.dir `out`; returns its step directory."""
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, step)
    out = Path(out)
    if reader.format == WEIGHTS:
        raise CheckpointError(f"{reader.path} holds weights only (from `pretrain convert from-hf`): it loads at any "
                              "parallel.tp/parallel.pp as it is; no resharding needed")
    if reader.layout.get("ep", 1) > 1:
        raise CheckpointError(
            f"{reader.path} was saved with parallel.ep={reader.layout['ep']}: resharding does not handle expert-parallel "
            "checkpoints yet (DeepSpeed's universal format, which it goes through, holds only the first expert-parallel "
            "rank's experts). Resume it in its own layout, or for the weights alone: `pretrain convert to-hf` then "
            "`pretrain convert from-hf --tp N --pp M`")
    zero_stage = reader.client_state["ds_config"]["zero_optimization"]["stage"]
    if zero_stage not in (1, 2):
        raise CheckpointError(
            f"{reader.path} was trained with optimizer.zero_stage={zero_stage}; resharding keeps the optimizer state "
            "only for ZeRO-1/2 checkpoints. For the weights alone: `pretrain convert to-hf` then `pretrain convert "
            "from-hf --tp N --pp M`")
    config = reader.config
    if config.optimizer.name == OptimizerName.muon:
        raise CheckpointError(
            f"{reader.path} was trained with optimizer.name=muon: DeepSpeed's universal format, which resharding goes "
            "through, carries Adam's moments but not Muon's momentum. For the weights alone: `pretrain convert to-hf` "
            "then `pretrain convert from-hf --tp N --pp M`")
    if config.model.moe.bias_update_rate > 0:
        raise CheckpointError(
            f"{reader.path} was trained with model.moe.bias_update_rate={config.model.moe.bias_update_rate}: DeepSpeed's "
            "universal format, which resharding goes through, does not carry the routers' balancing biases yet. "
            "Resume it at its own parallel.tp/parallel.pp")
    validate_without_data(dataclasses.replace(  # the new layout fits the model and the optimizer stage
        config, parallel=dataclasses.replace(config.parallel, tp=tp, pp=pp, cp=1, sequence_parallel="auto"),
        train=dataclasses.replace(config.train, global_batch_size=config.train.micro_batch_size)), tp * pp)
    with staged(out, "convert reshard", refusal=CheckpointError) as staging:
        final = step_dir(staging, reader.step)
        partial = partial_dir(final)
        if reader.format == UNIVERSAL_FORMAT:
            shutil.copytree(reader.path, partial)
        else:
            verify_files(reader.path)  # before DeepSpeed's converter unpickles them
            to_universal(reader.path, partial)
            if tokenizer_dir(reader.path).is_dir():
                store_tokenizer(partial, tokenizer_dir(reader.path))
        args = reader.args
        for name in reader.names():
            source = name if reader.layout["pp"] == 1 else pipeline_name(name, args)
            target = name if pp == 1 else pipeline_name(name, args)
            if source != target:
                os.replace(partial / "zero" / source, partial / "zero" / target)
        write_marker(partial, UNIVERSAL_FORMAT, reader.step, layout_record(tp, pp, None), world_size=None,
                     resharded_from=str(reader.path.resolve()))
        publish(staging, partial, final)
    print(f"resharded {reader.path} in {time.perf_counter() - started:.1f} s", flush=True)
    return step_dir(out, reader.step)
