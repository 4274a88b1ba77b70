"""The checkpoint folder format, and its one owner: every writer (training, `convert reshard`,
`convert from-hf`, the universal copy made for a resume at another data-parallel size) and every
reader goes through this module.

A checkpoint.dir holds `step_XXXXXXXX/` folders, `latest` (the name of the newest), `run.json`
(the one run that writes the folder) and, while that run is alive, `lease.json` (pretrain.lease). A step
folder holds the weights in one of three forms (`format` in its marker): DeepSpeed's files as
training wrote them, DeepSpeed's universal form (`pretrain convert reshard`), or full weights in
safetensors (`pretrain convert from-hf`); beside them `tokenizer/`, a copy of the run's
tokenizer, and `complete.json`, the marker, written last: the format, the step, the parallel
layout it was written with, and every file with its size. Under expert parallelism DeepSpeed's
files hold the experts of the first expert-parallel rank only: `experts_ep_rank_XX.pt`, one per
expert-parallel rank, holds each rank's share of every expert tensor. A folder is written as
`<name>.partial/` and renamed once complete. A folder without the marker, or whose files no
longer have the sizes the marker records, is torn: never loaded, reported by name."""

import argparse
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from pretrain.errors import UserError
from pretrain.model.args import LlamaArgs
from pretrain.tokenizer import copy_tokenizer

log = logging.getLogger(__name__)

MARKER, LATEST, PARTIAL, UNIVERSAL, RUN = "complete.json", "latest", ".partial", ".universal", "run.json"
TOKENIZER_DIR = "tokenizer"
# What a step directory holds (`format` in its marker): DeepSpeed's files as training wrote them,
# DeepSpeed's universal form (from `pretrain convert reshard`), or full weights only (from-hf).
DEEPSPEED, UNIVERSAL_FORMAT, WEIGHTS = "deepspeed", "universal", "weights"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for, or one that cannot be written; the message
    names it. The run cannot go on: exit status 1."""

    exit_code = 1


def _allowed_globals() -> list:
    """The classes our checkpoint files hold besides tensors and plain containers: numpy's RNG
    state (rank files) and what DeepSpeed records in its optimizer files."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    return [np.dtype, np.ndarray, multiarray._reconstruct, type(np.dtype(np.uint32)), LossScaler, ZeroStageEnum,
            fragment_address]


def safe_load(path: Path, mmap: bool = False) -> dict:
    """A checkpoint file read with torch.load(weights_only=True): tensors, plain containers and
    the few classes above, never code. A file holding anything else is refused by name."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise CheckpointError(f"{path} holds more than tensors and settings"
                              + (f" ({found.group(1)})" if found else "") + ": it was not written by this framework, "
                              "or was altered; it is not loaded, since loading it could run code") from None
    except (RuntimeError, EOFError) as error:  # a truncated or corrupted file
        raise CheckpointError(f"{path} cannot be read ({str(error).split('. ')[0]}): the file is damaged; use "
                              "another checkpoint") from None


def verify_files(path: Path) -> None:
    """Read every .pt file of a step folder with safe_load (memory-mapped: its metadata, not its
    tensors), so that DeepSpeed's own pickle loads that follow (a resume, a reshard) meet nothing
    but tensors and settings."""
    for file in sorted(path.rglob("*.pt")):
        safe_load(file, mmap=True)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def partial_dir(final: Path) -> Path:
    """Where `final` is written until it is complete."""
    return final.with_name(final.name + PARTIAL)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def layout_record(tp: int, pp: int, dp: int | None, cp: int = 1, ep: int = 1) -> dict:
    """The parallel sizes a step was written with (dp None: loadable at any data- and context-parallel size)."""
    return {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "ep": ep}


def experts_file(ep_rank: int) -> str:
    """The file of a step folder holding expert-parallel rank `ep_rank`'s experts: {parameter name:
    its num_experts / ep experts, from the first one this rank holds}."""
    return f"experts_ep_rank_{ep_rank:02d}.pt"


def replicas(layout: dict) -> int | None:
    """The ranks DeepSpeed's files are partitioned over (its data axis: dp x cp); None: any."""
    return None if layout["dp"] is None else layout["dp"] * layout.get("cp", 1)


def write_marker(folder: Path, format: str, step: int, layout: dict, **fields) -> None:
    """Complete `folder`: every file in it is flushed to disk, then the marker lists them with
    their sizes (and `fields`, e.g. world_size)."""
    marker = folder / MARKER
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p != marker}
    for name in files:
        fsync(folder / name)
    marker.write_text(json.dumps({"format": format, "step": step, "layout": layout, **fields, "files": files},
                                 indent=1))
    fsync(marker)


def read_marker(path: Path) -> dict:
    """The marker of a complete step folder (check torn_reason first)."""
    return json.loads((path / MARKER).read_text())


def checkpoint_format(path: Path) -> str:
    return read_marker(path).get("format", DEEPSPEED)


def torn_reason(path: Path) -> str | None:
    """Why a checkpoint directory cannot be loaded, or None when it is complete."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as error:
        return f"unreadable {MARKER} ({error})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def step_dirs(root: Path) -> list[Path]:
    """The step folders under a checkpoint.dir, newest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), reverse=True)


def find_checkpoint(root: Path, resume: str) -> Path | None:
    """checkpoint.resume: `none`, `auto` (the newest complete checkpoint under root, or None)
    or the path of one checkpoint (an error unless it is complete)."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        reason = torn_reason(path) if path.is_dir() else "it does not exist"
        if reason:
            raise CheckpointError(f"checkpoint.resume={resume} cannot be loaded: {reason}")
        return path
    for path in step_dirs(root):
        reason = torn_reason(path)
        if reason is None:
            return path
        log.warning("skipping torn checkpoint %s: %s", path, reason)
    return None


def claim_run(root: Path, run_id: str, log_dir: str) -> None:
    """Record that run `run_id` writes checkpoint.dir `root`, or refuse when another run does.
    A folder without a record (written before records existed, by `convert from-hf` or
    `convert reshard`) is taken by the first run that trains in it."""
    root.mkdir(parents=True, exist_ok=True)
    record = root / RUN
    try:
        with open(record, "x") as file:  # exclusive: of two runs starting at once, one creates it
            json.dump({"run_id": run_id, "log_dir": log_dir}, file)
        return
    except FileExistsError:
        pass
    try:
        owner = json.loads(record.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{record} is not readable: restore it, or delete it if no other run writes "
                              f"{root}") from None
    if owner.get("run_id") != run_id:
        raise CheckpointError(
            f"checkpoint.dir {root} holds the checkpoints of another run (run {owner.get('run_id')}, log.dir "
            f"{owner.get('log_dir')}); this run is {run_id} (log.dir {log_dir}). Two runs in one folder delete and "
            "overwrite each other's checkpoints. To continue that run, use its log.dir; to start a new run from one "
            f"of its checkpoints, set checkpoint.resume={root}/step_... and another checkpoint.dir; otherwise "
            "choose another checkpoint.dir")


def publish(root: Path, partial: Path, final: Path) -> None:
    """Move a completed step folder into place and name it in `latest`."""
    if final.exists():  # a checkpoint of this step from an earlier attempt of this run
        shutil.rmtree(final)
    os.replace(partial, final)
    (root / (LATEST + PARTIAL)).write_text(final.name + "\n")
    os.replace(root / (LATEST + PARTIAL), root / LATEST)
    fsync(root)


def prune(root: Path, keep_last: int, keep_every: int, run_id: str | None = None) -> None:
    """Keep the newest keep_last complete checkpoints and every step divisible by keep_every;
    torn ones are neither counted nor removed, so the newest complete one always stays. With
    `run_id`, only that run's checkpoints are counted and removed."""
    complete = [p for p in step_dirs(root)
                if torn_reason(p) is None and (run_id is None or read_marker(p).get("run_id") == run_id)]
    for path in complete[keep_last:] if keep_last else []:
        step = int(_STEP_DIR.match(path.name).group(1))
        if not (keep_every and step % keep_every == 0):
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(path.name + UNIVERSAL), ignore_errors=True)


def tokenizer_dir(path: Path) -> Path:
    """Where a step folder keeps its copy of the run's tokenizer."""
    return path / TOKENIZER_DIR


def store_tokenizer(path: Path, tokenizer: Path) -> None:
    """Copy a tokenizer folder into a step folder being written."""
    copy_tokenizer(tokenizer, tokenizer_dir(path))


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's universal form of the DeepSpeed step folder `source` (full fp32 weights and
    optimizer state per parameter) written into the new folder `target`."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=str(source), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False))
    (target.parent / "latest_universal").unlink(missing_ok=True)  # the converter leaves it beside its output


def universal_checkpoint_info(args: LlamaArgs) -> dict:
    """What DeepSpeed's universal-checkpoint converter must know about our parameters: norms (and a
    mixture of experts' router and experts) are replicated across TP ranks, o_proj/down_proj are
    split along their rows (input dimension), and the vocabulary tensors are padded for the TP
    size (stored unpadded, re-padded on load). The converter refuses patterns no parameter of the
    model matches, so only those of `args`'s parameters are given."""
    from deepspeed.checkpoint import constants

    from pretrain.model.weights import OUTPUT_PROJECTIONS, REPLICATED_SUFFIXES, VOCAB_PARAMETERS, parameter_names

    names = parameter_names(args)

    def suffixes(candidates) -> list[str]:
        return [rf".*{re.escape(suffix)}$" for suffix in candidates if any(name.endswith(suffix) for name in names)]

    return {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        constants.TP_REPLICATED_PARAMETER_PATTERNS: suffixes(REPLICATED_SUFFIXES),
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: suffixes(OUTPUT_PROJECTIONS),
        constants.VOCABULARY_PARAMETER_PATTERNS: suffixes(VOCAB_PARAMETERS),
        "original_vocab_size": args.vocab_size,
    }
