"""Training's checkpoints: when to save, and the whole training state saved into and restored
from a step folder of the checkpoint format (pretrain.checkpoint): DeepSpeed's files (weights,
fp32 master weights, optimizer and scheduler state, counters, the client state below) plus
`rank_XXXXX.pt` per rank (RNG states, this rank's data-stream state), under expert parallelism
the experts of each expert-parallel rank (pretrain.checkpoint.experts_file), and the tokenizer
copy. Saves are atomic across ranks; resuming at another data-parallel size goes through
DeepSpeed's universal form of the checkpoint, made once beside it."""

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.checkpoint import (
    DEEPSPEED, MARKER, PARTIAL, UNIVERSAL, UNIVERSAL_FORMAT, WEIGHTS, CheckpointError, checkpoint_format, claim_run,
    experts_file, find_checkpoint, fsync, layout_record, partial_dir, prune, publish, read_marker, replicas, safe_load,
    step_dir, store_tokenizer, to_universal, verify_files, write_marker,
)
from pretrain.config import CheckpointConfig, Config, DataSource, Layout, OptimizerConfig, OptimizerName, run_id, to_yaml
from pretrain.lease import FolderLease

# Model settings a checkpoint's weights must agree with to start from them (checkpoint.init_from) ...
SHAPE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "norm_eps",
         "tie_embeddings")
# ... and to resume a run (the others, model.seq_len among them, may change).
ARCHITECTURE = (*SHAPE, "rope_theta", "rope_scaling")


@dataclass
class Progress:
    """Where training stands: what a checkpoint records and a resume restores."""

    step: int = 0
    tokens: int = 0
    consumed_samples: int = 0  # of the global sample order
    rank_state: dict | None = None  # this rank's own state (data.source=raw: its stream position)


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


def _rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank:05d}.pt"


def _expert_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This rank's share of the experts under expert parallelism (none without it): DeepSpeed saves
    only the first expert-parallel rank's, and would look for its own MoE layers' files on load."""
    return {name: param for name, param in module.named_parameters() if hasattr(param, "first_expert")}


def _ep_rank(experts: dict[str, torch.nn.Parameter]) -> int:
    param = next(iter(experts.values()))
    return param.first_expert // param.shape[0]


class Checkpointer:
    """Claims checkpoint.dir for this run, finds the checkpoint it starts from, decides when to
    save, and saves and restores the engine's state (collectives: every rank calls each method)."""

    def __init__(self, config: Config, layout: Layout, tokenizer_sha256: str | None):
        self.settings: CheckpointConfig = config.checkpoint
        self.root = Path(config.checkpoint.dir) if config.checkpoint.dir else None
        self.config = config
        self.layout = layout_record(layout.tp, layout.pp, layout.dp, layout.cp, layout.ep)
        self.tokenizer_sha256 = tokenizer_sha256
        self.run_id = run_id(config)
        self.lease: FolderLease | None = None
        self.from_weights_only = False  # the checkpoint start() found gives weights only: step 0, fresh optimizer

    def start(self) -> Path | None:
        """Claim checkpoint.dir (rank 0: the run record and the lease) and find the checkpoint
        this run resumes from (checkpoint.resume) or, when checkpoint.dir holds none, whose weights
        it starts from (checkpoint.init_from), checked against this run's model and tokenizer before
        anything of it is unpickled. One decision for all ranks, whatever their view of the disk."""
        if self.root is None and not self.settings.init_from:
            return None
        outcome: list = [None, False]
        if dist.get_rank() == 0:
            try:
                outcome = self._find()
            except Exception as error:  # every rank raises it, rather than waiting for rank 0
                outcome = [error, False]
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        found, self.from_weights_only = outcome
        return found

    def _find(self) -> list:
        """[the checkpoint to start from or None, whether only its weights are loaded] (rank 0)."""
        from pretrain.convert.reader import resolve_step

        found = None
        if self.root is not None:
            claim_run(self.root, self.run_id, str(Path(self.config.log.dir).resolve()))
            self.lease = FolderLease(self.root, self.run_id, self.settings.lease_timeout_s)
            self.lease.acquire()
            found = find_checkpoint(self.root, self.settings.resume)
        if found is None and self.settings.init_from:
            found = resolve_step(self.settings.init_from)
            self._check_compatible(found, SHAPE)
            return [found, True]
        if found is not None:
            self._check_compatible(found, ARCHITECTURE)
        return [found, found is not None and checkpoint_format(found) == WEIGHTS]

    def _check_compatible(self, path: Path, settings: tuple[str, ...]) -> None:
        """The checkpoint holds this run's model (`settings` of it agree) and was trained on data of
        this run's tokenizer."""
        from pretrain.convert.reader import CheckpointReader

        verify_files(path)
        reader = CheckpointReader(path)
        args = self.config.model
        differences = [f"model.{key}: checkpoint {value!r}, this run {getattr(args, key)!r}"
                       for key, value in vars(reader.args).items()
                       if key in settings and getattr(args, key) != value]
        if differences:
            raise CheckpointError(f"{path} holds another model than this run's config:\n  " + "\n  ".join(differences)
                                  + "\nResume with the checkpoint's model settings, or start a new checkpoint.dir")
        saved, current = reader.config.optimizer.name, self.config.optimizer.name
        if reader.format != WEIGHTS and saved != current:
            raise CheckpointError(
                f"{path} was trained with optimizer.name={saved.value}; this run has optimizer.name={current.value}, "
                "whose state the checkpoint does not hold. Resume with the checkpoint's optimizer, or start from its "
                "weights alone: `pretrain convert to-hf`, then `pretrain convert from-hf`")
        recorded = (reader.client_state.get("tokenizer") or {}).get("sha256")
        if recorded and self.tokenizer_sha256 and recorded != self.tokenizer_sha256:
            raise CheckpointError(
                f"{path} was trained on data of another tokenizer (sha256 {recorded[:12]}) than this run's data "
                f"({self.tokenizer_sha256[:12]}): the token ids would mean other words. Resume on shards built with "
                "the checkpoint's tokenizer (its copy is in the checkpoint folder's tokenizer/), or start a new run")

    def should_save(self, step: int, last_step: int, stop: bool) -> bool:
        """At checkpoint.interval, at the last step and when stopping on a signal."""
        interval = self.settings.interval
        return self.root is not None and (step == last_step or stop or bool(interval and step % interval == 0))

    def save(self, engine, progress: Progress) -> Path:
        """Save the training state at `progress` (see save()), unless this run lost checkpoint.dir."""
        lost = [None]
        if self.lease is not None:
            self.lease.check()
            lost = [self.lease.lost]
        dist.broadcast_object_list(lost, src=0)
        if lost[0]:
            raise CheckpointError(f"{lost[0]}: this run stops without saving, so that two runs never write one "
                                  "checkpoint folder")
        client_state = {"step": progress.step, "tokens": progress.tokens,
                        "data": {"consumed_samples": progress.consumed_samples}, "config": to_yaml(self.config),
                        "tokenizer": {"path": self.config.data.tokenizer, "sha256": self.tokenizer_sha256}}
        tokenizer = Path(self.config.data.tokenizer) if self.config.data.tokenizer else None
        return save(engine, self.root, progress.step, client_state, progress.rank_state or {}, self.layout,
                    self.settings.keep_last, self.settings.keep_every, tokenizer, self.run_id)

    def close(self) -> None:
        """Give checkpoint.dir up (the end of the run, or its failure)."""
        if self.lease is not None:
            self.lease.release()

    def resume(self, engine, path: Path) -> Progress:
        """Restore the engine from a training checkpoint; returns the progress it recorded."""
        started = time.perf_counter()
        client, rank_state = load(engine, path, self.layout, self.config.optimizer)
        if rank_state is None and self.config.data.source == DataSource.raw:
            raise CheckpointError(
                f"{path} was written by another number of processes: data.source=raw resumes only at the "
                "same data-parallel size (build shards with `pretrain data build` for elastic resumes)")
        progress = Progress(client["step"], client["tokens"], client["data"]["consumed_samples"], rank_state)
        if dist.get_rank() == 0:
            print(f"resumed from {path} (step {progress.step}, {progress.consumed_samples} samples consumed) "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)
        return progress

    def load_weights(self, model: torch.nn.Module, path: Path, tp_rank: int, canonical) -> None:
        """Start from the weights of a checkpoint of any layout (`pretrain convert from-hf`, or
        checkpoint.init_from): step 0, fresh optimizer."""
        from pretrain.convert.reader import CheckpointReader, LazyTensors
        from pretrain.model.weights import load_full_state_dict

        started = time.perf_counter()
        load_full_state_dict(model, LazyTensors(CheckpointReader(path)), tp_rank, self.layout["tp"], canonical)
        if dist.get_rank() == 0:
            print(f"loaded the weights of {path} in {time.perf_counter() - started:.1f} s", flush=True)


def starts_from_weights(path: Path | None) -> bool:
    """A weights-only checkpoint, loaded into the model before the engine exists."""
    return path is not None and checkpoint_format(path) == WEIGHTS


def save(engine, root: Path, step: int, client_state: dict, rank_state: dict, layout: dict, keep_last: int,
         keep_every: int, tokenizer: Path | None, run_id: str) -> Path:
    """Every rank calls this. `layout`: the parallel sizes, recorded to check resumes against;
    `tokenizer`: the run's tokenizer folder, copied into the checkpoint; retention removes only
    checkpoints of run `run_id`. Returns the final directory once it is complete on all ranks.
    A write error on any rank (a full disk, EIO) removes the partial directory and raises
    CheckpointError on every rank; the checkpoints saved before are left as they were."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    partial = partial_dir(final)
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
            own = _rank_file(partial, rank)
            torch.save({**rank_state, "rng": rng_state()}, own)
            fsync(own)
            experts = _expert_parameters(engine.module)
            # the first expert-data-parallel rank of each expert-parallel rank, on TP rank 0 (TP peers hold the
            # same experts; ranks are ordered tensor-parallel fastest)
            if experts and rank % layout["tp"] == 0 and rank < layout["ep"] * layout["tp"]:
                file = partial / experts_file(_ep_rank(experts))
                torch.save({name: param.detach().cpu().clone() for name, param in experts.items()}, file)
                fsync(file)
        except (OSError, RuntimeError) as caught:
            error = caught
    _agree_written(error, root, partial)
    try:
        if rank == 0:
            if tokenizer is not None:
                store_tokenizer(partial, tokenizer)
            write_marker(partial, DEEPSPEED, step, layout, world_size=dist.get_world_size(), run_id=run_id)
            publish(root, partial, final)
            prune(root, keep_last, keep_every, run_id)
            print(f"saved {final} in {time.perf_counter() - started:.1f} s", flush=True)
        error = None
    except (OSError, RuntimeError) as caught:  # torch.save reports a full disk as RuntimeError
        error = caught
    _agree_written(error, root, partial)
    return final


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


def check_layout(path: Path, saved: dict, current: dict, optimizer: OptimizerConfig) -> None:
    """Refuse, with what to do, the layout changes a resume cannot handle yet."""
    saved_ep, current_ep = saved.get("ep", 1), current.get("ep", 1)
    if saved_ep != current_ep or (saved_ep > 1 and replicas(saved) != replicas(current)):
        saved_at = f"parallel.ep={saved_ep}" + (f" and {replicas(saved)} data-parallel ranks" if replicas(saved) else "")
        raise CheckpointError(
            f"{path} was saved with {saved_at}; this run has parallel.ep={current_ep} and {replicas(current)} "
            "data-parallel ranks. A checkpoint resumes only at the parallel.ep it was saved with, an expert-parallel "
            f"one only at its data-parallel size too: resume with parallel.ep={saved_ep}"
            + (f" and {replicas(saved) * saved['tp'] * saved['pp']} processes" if replicas(saved) else "")
            + ", or start from its weights alone: `pretrain convert to-hf`, then `pretrain convert from-hf`")
    if (saved["tp"], saved["pp"]) != (current["tp"], current["pp"]):
        reshard = (f"reshard it: `pretrain convert reshard --checkpoint {path} --tp {current['tp']} --pp {current['pp']} "
                   "--out NEW_DIR`, then checkpoint.dir=NEW_DIR") if saved_ep == 1 else (
                   "start from its weights alone (expert-parallel checkpoints are not resharded yet): `pretrain convert "
                   "to-hf`, then `pretrain convert from-hf`")
        raise CheckpointError(
            f"{path} was saved with parallel.tp={saved['tp']} parallel.pp={saved['pp']}; this run has "
            f"parallel.tp={current['tp']} parallel.pp={current['pp']}. Resume with the saved sizes, or {reshard}")
    if replicas(saved) != replicas(current) and optimizer.zero_stage == 3:
        raise CheckpointError(
            f"{path} was saved with {replicas(saved)} data- x context-parallel ranks and ZeRO-3; this run has "
            f"{replicas(current)}. Resume with {replicas(saved) * saved['tp'] * saved['pp']} processes and the saved "
            "parallel.cp (ZeRO-3 resumes only at the same size)")
    if replicas(saved) != replicas(current) and optimizer.name == OptimizerName.muon:
        saved_as = (f"with {replicas(saved)} data- x context-parallel ranks" if replicas(saved) is not None
                    else "in DeepSpeed's universal format (resharded)")
        raise CheckpointError(
            f"{path} was saved {saved_as} and optimizer.name=muon; this run has {replicas(current)}. Resume with the "
            "saved data- and context-parallel sizes: DeepSpeed's universal checkpoint, which moves ZeRO state to "
            "another data-parallel size, carries Adam's moments but not Muon's momentum")


def universal_copy(path: Path) -> Path:
    """DeepSpeed's universal form of a checkpoint (optimizer state per parameter, loadable at any
    data-parallel size), made once beside it by rank 0 and reused."""
    universal = path.with_name(path.name + UNIVERSAL)
    if dist.get_rank() == 0 and not (universal / MARKER).is_file():
        partial = partial_dir(universal)
        shutil.rmtree(partial, ignore_errors=True)
        started = time.perf_counter()
        to_universal(path, partial)
        saved = read_marker(path)
        layout = layout_record(saved["layout"]["tp"], saved["layout"]["pp"], None)
        write_marker(partial, UNIVERSAL_FORMAT, saved["step"], layout, converted_from=path.name)
        shutil.rmtree(universal, ignore_errors=True)
        os.replace(partial, universal)
        print(f"converted {path} for another data-parallel size in {time.perf_counter() - started:.1f} s", flush=True)
    dist.barrier()
    return universal


def _load_deepspeed(engine, path: Path) -> dict | None:
    """DeepSpeed's load of a step folder it wrote (each rank's ZeRO partitions: optimizer state and
    fp32 weights), then, under expert parallelism, this rank's experts from its file (DeepSpeed's
    model file holds the first expert-parallel rank's). Returns the client state."""
    experts = _expert_parameters(engine.module)
    if not experts:
        return engine.load_checkpoint(str(path.parent), tag=path.name)[1]
    engine.has_moe_layers = False  # for this load only: DeepSpeed would read expert files of its own MoE layers
    try:
        _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    finally:
        engine.has_moe_layers = True
    saved = safe_load(path / experts_file(_ep_rank(experts)))
    with torch.no_grad():
        for name, param in experts.items():
            param.copy_(saved[name])
    return client_state


def load(engine, path: Path, layout: dict, optimizer: OptimizerConfig) -> tuple[dict, dict | None]:
    """Load a complete checkpoint into the engine: returns (client state, this rank's own state
    when the checkpoint was written by the same number of ranks in the same layout, else None). A
    ZeRO-1/2 checkpoint of another data- x context-parallel size is loaded through its universal form."""
    marker = read_marker(path)
    resharded, zero_stage = marker.get("format") == UNIVERSAL_FORMAT, optimizer.zero_stage
    if resharded and zero_stage not in (1, 2):
        raise CheckpointError(f"{path} was resharded (DeepSpeed's universal format), which resumes with "
                              f"optimizer.zero_stage 1 or 2, not {zero_stage}")
    check_layout(path, marker["layout"], layout, optimizer)
    universal = path if resharded else None
    if not resharded and replicas(marker["layout"]) != replicas(layout) and zero_stage in (1, 2):
        universal = universal_copy(path)
    if universal is not None:
        engine._config.load_universal_checkpoint = True  # for this one load only: it fails on regular ones
        try:
            _, client_state = engine.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
    else:
        client_state = _load_deepspeed(engine, path)
    if client_state is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    own = _rank_file(path, dist.get_rank())
    same_world = (marker.get("world_size") == dist.get_world_size()
                  and (marker["layout"]["dp"], marker["layout"].get("cp", 1)) == (layout["dp"], layout["cp"]))
    rank_state = safe_load(own) if same_world and own.is_file() else None
    if rank_state is not None:
        set_rng_state(rank_state["rng"])
    return client_state, rank_state
