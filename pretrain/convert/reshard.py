"""`pretrain convert reshard`: the whole training state of a checkpoint (weights, fp32 master
weights, Adam moments and step, scheduler, data position) for another TP/PP layout.

It goes through DeepSpeed's universal checkpoint format (one full tensor per parameter and
optimizer state, re-sliced for the TP rank when loaded; vocabulary padding stripped and re-added
for the new TP size). Parameter folders are renamed between the single-stage names (PP=1) and
DeepSpeed's layer-indexed pipeline names (PP>1). The result resumes at any data-parallel size."""

import argparse
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from pretrain.checkpoint import (
    LATEST, MARKER, PARTIAL, UNIVERSAL_FORMAT, WEIGHTS, CheckpointError, step_dir,
)
from pretrain.config import DataSource, validate
from pretrain.convert.reader import CheckpointReader
from pretrain.data.shards import TOKENIZER_DIR
from pretrain.model.pipeline import pipeline_name


def reshard(checkpoint: str | Path, out: str | Path, tp: int, pp: int, step: int | None = None) -> Path:
    """Write the resharded step into the checkpoint.dir `out`; returns its step directory."""
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, step)
    out = Path(out)
    if reader.format == WEIGHTS:
        raise CheckpointError(f"{reader.path} holds weights only (from `pretrain convert from-hf`): it loads at any "
                              "parallel.tp/parallel.pp as it is; no resharding needed")
    zero_stage = reader.client_state["ds_config"]["zero_optimization"]["stage"]
    if zero_stage not in (1, 2):
        raise CheckpointError(
            f"{reader.path} was trained with optimizer.zero_stage={zero_stage}; resharding keeps the optimizer state "
            "only for ZeRO-1/2 checkpoints. For the weights alone: `pretrain convert to-hf` then `pretrain convert "
            "from-hf --tp N --pp M`")
    config = dataclasses.replace(reader.config)
    config.parallel = dataclasses.replace(config.parallel, tp=tp, pp=pp)
    config.data = dataclasses.replace(config.data, source=DataSource.synthetic, valid_path=None)
    config.train = dataclasses.replace(config.train, global_batch_size=config.train.micro_batch_size, eval_interval=0)
    config.checkpoint = dataclasses.replace(config.checkpoint, resume="none")
    validate(config, tp * pp)  # the new layout fits the model and the optimizer stage
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty: choose a new --out folder")

    final = step_dir(out, reader.step)
    partial = final.with_name(final.name + PARTIAL)
    out.mkdir(parents=True, exist_ok=True)
    if reader.format == UNIVERSAL_FORMAT:
        shutil.copytree(reader.path, partial)
        (partial / MARKER).unlink()
    else:
        from deepspeed.checkpoint import ds_to_universal

        ds_to_universal.main(argparse.Namespace(
            input_folder=str(reader.path), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False))
        if (reader.path / TOKENIZER_DIR).is_dir():
            shutil.copytree(reader.path / TOKENIZER_DIR, partial / TOKENIZER_DIR)
    args = reader.args
    for name in reader.names():
        source = name if reader.layout["pp"] == 1 else pipeline_name(name, args)
        target = name if pp == 1 else pipeline_name(name, args)
        if source != target:
            os.replace(partial / "zero" / source, partial / "zero" / target)
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    (partial / MARKER).write_text(json.dumps({
        "format": UNIVERSAL_FORMAT, "step": reader.step, "world_size": None, "layout": {"tp": tp, "pp": pp, "dp": None},
        "resharded_from": str(reader.path.resolve()), "files": files}, indent=1))
    os.replace(partial, final)
    (out / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's converter leaves it beside the output
    (out / LATEST).write_text(final.name + "\n")
    print(f"resharded {reader.path} in {time.perf_counter() - started:.1f} s", flush=True)
    return final
