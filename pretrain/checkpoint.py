"""Checkpoints: atomic saves, retention, finding the newest complete one, stop signals.

A checkpoint is `<checkpoint.dir>/step_XXXXXXXX/`: DeepSpeed's files (weights, fp32 master,
optimizer and scheduler state, counters, our client state) plus `rank_XXXXX.pt` per rank (RNG
states, per-rank data state), `tokenizer/` (a copy of the run's tokenizer) and `complete.json`,
written last, listing every file and its size.
It is written as `step_XXXXXXXX.partial/` and renamed when every rank has finished; `latest`
names it after that. A directory without the marker, or whose files no longer have the sizes
the marker records, is torn: never loaded, reported by name, and the previous one is used.
Resuming at another data-parallel size goes through DeepSpeed's universal checkpoint format."""

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.data.shards import TOKENIZER_DIR
from pretrain.errors import UserError
from pretrain.tokenizer import copy_tokenizer

log = logging.getLogger(__name__)

MARKER, LATEST, PARTIAL, UNIVERSAL = "complete.json", "latest", ".partial", ".universal"
# What a step directory holds (`format` in its marker): DeepSpeed's files as training wrote them,
# DeepSpeed's universal form (from `pretrain convert reshard`), or full weights only (from-hf).
DEEPSPEED, UNIVERSAL_FORMAT, WEIGHTS = "deepspeed", "universal", "weights"
EXIT_STOPPED = 75  # after SIGTERM/SIGUSR1: checkpoint saved, requeue the job to continue (EX_TEMPFAIL)
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, RuntimeError):
    """No usable checkpoint where one was asked for, or one that cannot be written; the message
    names it. The run cannot go on: exit status 1."""

    exit_code = 1


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    candidates = sorted((p for p in root.glob("step_*") if _STEP_DIR.match(p.name)), reverse=True) \
        if root.is_dir() else []
    for path in candidates:
        reason = torn_reason(path)
        if reason is None:
            return path
        log.warning("skipping torn checkpoint %s: %s", path, reason)
    return None


def checkpoint_format(path: Path) -> str:
    return json.loads((path / MARKER).read_text()).get("format", DEEPSPEED)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, client_state: dict, rank_state: dict, layout: dict, keep_last: int,
         keep_every: int, tokenizer: Path | None = None) -> Path:
    """Every rank calls this. `layout`: the parallel sizes, recorded to check resumes against;
    `tokenizer`: the run's tokenizer folder, copied into the checkpoint. Returns the final
    directory once it is complete on all ranks. A write error on any rank (a full disk, EIO)
    removes the partial directory and raises CheckpointError on every rank; the checkpoints
    saved before are left as they were."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    partial = final.with_name(final.name + PARTIAL)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"*{PARTIAL}"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    started = time.perf_counter()
    error = None
    try:
        engine.save_checkpoint(str(root), tag=partial.name, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as caught:  # torch.save reports a full disk as RuntimeError
        error = caught
        dist.barrier()  # the one DeepSpeed's save ends with, where the ranks that wrote their files wait
    if error is None:
        try:
            own = partial / f"rank_{rank:05d}.pt"
            torch.save({**rank_state, "rng": rng_state()}, own)
            _fsync(own)
        except (OSError, RuntimeError) as caught:
            error = caught
    _agree_written(error, root, partial)
    try:
        if rank == 0:
            _complete(root, partial, final, step, layout, tokenizer)
            _prune(root, keep_last, keep_every)
            print(f"saved {final} in {time.perf_counter() - started:.1f} s", flush=True)
        error = None
    except (OSError, RuntimeError) as caught:  # torch.save reports a full disk as RuntimeError
        error = caught
    _agree_written(error, root, partial)
    return final


def _complete(root: Path, partial: Path, final: Path, step: int, layout: dict, tokenizer: Path | None) -> None:
    """Rank 0, once every rank has written its files: tokenizer copy, marker, rename, `latest`."""
    if tokenizer is not None:
        copy_tokenizer(tokenizer, partial / TOKENIZER_DIR)
    files = {str(p.relative_to(partial)): p.stat().st_size for p in sorted(partial.rglob("*")) if p.is_file()}
    for name in files:
        _fsync(partial / name)
    (partial / MARKER).write_text(json.dumps({"step": step, "world_size": dist.get_world_size(),
                                              "layout": layout, "files": files}, indent=1))
    _fsync(partial / MARKER)
    if final.exists():  # a checkpoint of this step from an earlier attempt
        shutil.rmtree(final)
    os.replace(partial, final)
    (root / (LATEST + PARTIAL)).write_text(final.name + "\n")
    os.replace(root / (LATEST + PARTIAL), root / LATEST)
    _fsync(root)


def _agree_written(error: Exception | None, root: Path, partial: Path) -> None:
    """All ranks learn whether any failed to write; if one did, the partial save is removed and
    every rank raises, naming the path, the error and the free space."""
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    failed = {rank: message for rank, message in enumerate(errors) if message is not None}
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    free = shutil.disk_usage(root).free / 2**30 if root.exists() else float("nan")
    previous = find_checkpoint(root, "auto")
    rank, message = next(iter(failed.items()))
    raise CheckpointError(
        f"saving {partial} failed on rank(s) {', '.join(map(str, failed))} (rank {rank}: {message}); "
        f"{free:.2f} GiB free on {root}. The partial save was removed; "
        + (f"{previous} is the newest complete checkpoint and resumes as before"
           if previous else "no earlier complete checkpoint exists")
        + ": free space (or point checkpoint.dir elsewhere) and restart")


def _prune(root: Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest keep_last complete checkpoints and every step divisible by keep_every;
    torn ones are neither counted nor removed, so the newest complete one always stays."""
    steps = sorted(int(m.group(1)) for p in root.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and torn_reason(p) is None)
    for step in steps[:-keep_last] if keep_last else []:
        if not (keep_every and step % keep_every == 0):
            shutil.rmtree(step_dir(root, step), ignore_errors=True)
            shutil.rmtree(step_dir(root, step).with_name(f"step_{step:08d}{UNIVERSAL}"), ignore_errors=True)


def universal_checkpoint_info(vocab_size: int) -> dict:
    """What DeepSpeed's universal-checkpoint converter must know about our parameters: norms are
    replicated across TP ranks, o_proj/down_proj are split along their rows (input dimension),
    and the vocabulary tensors are padded for the TP size (stored unpadded, re-padded on load)."""
    from deepspeed.checkpoint import constants

    from pretrain.model.weights import OUTPUT_PROJECTIONS, REPLICATED_SUFFIX, VOCAB_PARAMETERS

    def suffixes(names) -> list[str]:
        return [rf".*{re.escape(name)}$" for name in names]

    return {
        constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        constants.TP_REPLICATED_PARAMETER_PATTERNS: suffixes([REPLICATED_SUFFIX]),
        constants.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: suffixes(OUTPUT_PROJECTIONS),
        constants.VOCABULARY_PARAMETER_PATTERNS: suffixes(VOCAB_PARAMETERS),
        "original_vocab_size": vocab_size,
    }


def check_layout(path: Path, saved: dict, current: dict, zero_stage: int) -> None:
    """Refuse, with what to do, the layout changes a resume cannot handle yet."""
    if (saved["tp"], saved["pp"]) != (current["tp"], current["pp"]):
        raise CheckpointError(
            f"{path} was saved with parallel.tp={saved['tp']} parallel.pp={saved['pp']}; this run has "
            f"parallel.tp={current['tp']} parallel.pp={current['pp']}. Resume with the saved sizes, or reshard it: "
            f"`pretrain convert reshard --checkpoint {path} --tp {current['tp']} --pp {current['pp']} --out NEW_DIR`, "
            "then checkpoint.dir=NEW_DIR")
    if saved["dp"] != current["dp"] and zero_stage == 3:
        raise CheckpointError(
            f"{path} was saved with {saved['dp']} data-parallel ranks and ZeRO-3; this run has {current['dp']}. "
            f"Resume with {saved['dp'] * saved['tp'] * saved['pp']} processes (ZeRO-3 resumes only at the same size)")


def universal_copy(path: Path) -> Path:
    """DeepSpeed's universal form of a checkpoint (optimizer state per parameter, loadable at any
    data-parallel size), made once beside it by rank 0 and reused."""
    universal = path.with_name(path.name + UNIVERSAL)
    if dist.get_rank() == 0 and not (universal / MARKER).is_file():
        from deepspeed.checkpoint import ds_to_universal

        partial = universal.with_name(universal.name + PARTIAL)
        shutil.rmtree(partial, ignore_errors=True)
        started = time.perf_counter()
        ds_to_universal.main(argparse.Namespace(
            input_folder=str(path), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False))
        (partial / MARKER).write_text(json.dumps({"converted_from": path.name}))
        shutil.rmtree(universal, ignore_errors=True)
        os.replace(partial, universal)
        print(f"converted {path} for another data-parallel size in {time.perf_counter() - started:.1f} s", flush=True)
    dist.barrier()
    return universal


def load(engine, path: Path, layout: dict, zero_stage: int) -> tuple[dict, dict | None]:
    """Load a complete checkpoint into the engine: returns (client state, this rank's own state
    when the checkpoint was written by the same number of ranks, else None). A ZeRO-1/2
    checkpoint of another data-parallel size is loaded through its universal form."""
    marker = json.loads((path / MARKER).read_text())
    resharded = marker.get("format") == UNIVERSAL_FORMAT
    if resharded and zero_stage not in (1, 2):
        raise CheckpointError(f"{path} was resharded (DeepSpeed's universal format), which resumes with "
                              f"optimizer.zero_stage 1 or 2, not {zero_stage}")
    check_layout(path, marker["layout"], layout, zero_stage)
    universal = path if resharded else None
    if not resharded and marker["layout"]["dp"] != layout["dp"] and zero_stage in (1, 2):
        universal = universal_copy(path)
    if universal is not None:
        engine._config.load_universal_checkpoint = True  # for this one load only: it fails on regular ones
        try:
            _, client_state = engine.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
    else:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    own = path / f"rank_{dist.get_rank():05d}.pt"
    same_world = marker.get("world_size") == dist.get_world_size()
    rank_state = torch.load(own, weights_only=False) if same_world and own.is_file() else None
    if rank_state is not None:
        set_rng_state(rank_state["rng"])
    return client_state, rank_state


class StopSignals:
    """Records SIGTERM/SIGUSR1 (Slurm's warnings before a time limit or a preemption) so that
    training can finish its step, save and exit; all ranks agree on the step through a CPU
    all-reduce (no device synchronisation)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a stop signal (collective)."""
        flag = torch.tensor([1 if self.received else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
