"""Data for a training run: the checks that tie shards to the config (sequence length,
tokenizer, vocabulary), shard verification, and the per-rank training/validation streams."""

import hashlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, DataSource, Layout, data_path_list
from pretrain.data.loader import StreamSpec, micro_batch_loader
from pretrain.data.raw import RawSpec, RawState, raw_batches, raw_shard_files
from pretrain.data.shards import Manifest, ShardError, file_sha256, index_path, is_url
from pretrain.data.synthetic import synthetic_batches
from pretrain.model.context_parallel import shard_batch
from pretrain.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pretrain.metrics import MetricsWriter
    from pretrain.parallel import ParallelContext

log = logging.getLogger(__name__)


@dataclass
class DataInfo:
    paths: list[str]
    weights: list[float]
    manifests: list[Manifest]
    valid: Manifest | None
    tokenizer_sha256: str
    raw_files: list[str]  # data.source=raw: the text shards


def _absolute(location: str) -> str:
    return location if is_url(location) else str(Path(location).resolve())


def resolve(config: Config) -> DataInfo | None:
    """Read the manifests, check them against the config and fill in model.vocab_size from the
    tokenizer when it is 0, and data.tokenizer with the shards' own copy when it is empty. Paths
    become absolute (the written config is unambiguous)."""
    if config.data.source == DataSource.synthetic:
        return None
    allow_pipe = config.data.allow_pipe
    paths = [_absolute(p) for p in data_path_list(config.data.path)]
    config.data.path = paths
    if config.data.source == DataSource.raw:
        return _resolve_raw(config, paths)
    manifests = [Manifest.load(p, allow_pipe) for p in paths]
    valid = Manifest.load(_absolute(config.data.valid_path), allow_pipe) if config.data.valid_path else None
    if valid is not None:
        config.data.valid_path = _absolute(config.data.valid_path)
    everything = list(zip(paths, manifests)) + ([(config.data.valid_path, valid)] if valid else [])

    for path, manifest in everything:
        if manifest.seq_len != config.model.seq_len:
            raise ShardError(f"shards at {path} hold samples of seq_len {manifest.seq_len} but model.seq_len="
                             f"{config.model.seq_len}: set model.seq_len={manifest.seq_len} or rebuild the shards "
                             f"with --seq-len {config.model.seq_len}")
    shas = {manifest.data["tokenizer"]["sha256"] for _, manifest in everything}
    if len(shas) > 1:
        raise ShardError("data.path/data.valid_path shards were built with different tokenizers: "
                         + ", ".join(f"{p} ({m.data['tokenizer']['sha256'][:12]})" for p, m in everything))
    sha = shas.pop()
    copy = next((m.tokenizer_dir() for _, m in everything if m.tokenizer_dir()), None)
    if not config.data.tokenizer and copy is not None:  # the shards carry it: the run records that copy
        if not copy.is_dir():
            raise ShardError(f"{copy} is missing: the shards' manifest names this copy of their tokenizer; restore "
                             "it, or set data.tokenizer to the tokenizer folder the shards were built with")
        config.data.tokenizer = str(copy)
    if config.data.tokenizer:
        tokenizer = Tokenizer.load(config.data.tokenizer)
        if tokenizer.sha256 != sha:
            raise ShardError(f"data.tokenizer {config.data.tokenizer} (sha256 {tokenizer.sha256[:12]}) is not the "
                             f"tokenizer the shards were built with ({sha[:12]}, "
                             f"{manifests[0].data['tokenizer']['path']}): use that one or rebuild the shards")
    vocab = manifests[0].data["tokenizer"]["vocab_size"]
    if config.model.vocab_size == 0:
        config.model.vocab_size = vocab
    elif config.model.vocab_size < vocab:
        raise ShardError(f"model.vocab_size={config.model.vocab_size} is smaller than the shards' tokenizer "
                         f"vocabulary ({vocab}): set model.vocab_size={vocab} or leave it 0 to take it from the data")
    weights = list(config.data.weights) or [1.0] * len(paths)
    return DataInfo(paths, weights, manifests, valid, sha, raw_files=[])


def _resolve_raw(config: Config, paths: list[str]) -> DataInfo:
    if config.data.weights:
        raise ShardError("data.source=raw reads all of data.path as one dataset: leave data.weights empty "
                         "(build tokenized shards with `pretrain data build` to blend datasets)")
    tokenizer = Tokenizer.load(config.data.tokenizer)
    if config.model.vocab_size == 0:
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ShardError(f"model.vocab_size={config.model.vocab_size} is smaller than data.tokenizer's vocabulary "
                         f"({tokenizer.vocab_size}): set model.vocab_size={tokenizer.vocab_size} or leave it 0")
    valid = None
    if config.data.valid_path:
        config.data.valid_path = _absolute(config.data.valid_path)
        valid = Manifest.load(config.data.valid_path, config.data.allow_pipe)
        if valid.data["tokenizer"]["sha256"] != tokenizer.sha256:
            raise ShardError(f"data.valid_path {config.data.valid_path} was built with another tokenizer than "
                             f"data.tokenizer {config.data.tokenizer}")
    raw_files = [file for path in paths for file in raw_shard_files(path)]
    return DataInfo(paths, [1.0], [], valid, tokenizer.sha256, raw_files=raw_files)


def verify_shards(info: DataInfo, rank: int, world_size: int, tolerate: bool) -> None:
    """Check every local shard and index against the manifest's sha256, each by one rank.
    A mismatch stops the run, or is only reported when damaged samples may be skipped."""
    problems = []
    manifests = info.manifests + ([info.valid] if info.valid else [])
    work = [(m, s) for m in manifests for s in m.shards if not is_url(m.root)]
    for manifest, shard in work[rank::world_size]:
        path = Path(manifest.shard_path(shard))
        for file, expected in ((path, shard["sha256"]), (index_path(path), shard["index_sha256"])):
            if not file.is_file():
                problems.append(f"{file} is missing")
            elif file_sha256(file) != expected:
                problems.append(f"{file} does not match the sha256 in its manifest")
    gathered = [None] * world_size if dist.is_initialized() else None
    if gathered is not None:
        dist.all_gather_object(gathered, problems)
        problems = [p for part in gathered for p in part]
    if not problems:
        return
    message = "damaged or replaced shard files: " + "; ".join(problems)
    if not tolerate:
        raise ShardError(message + ". Rebuild or restore them, or set data.skip_corrupt=N to skip damaged samples")
    log.warning("%s (continuing: data.skip_corrupt is set)", message)


def stream_spec(config: Config, info: DataInfo, layout: Layout, dp_rank: int, start_sample: int,
                validation: bool = False) -> StreamSpec:
    return StreamSpec(
        paths=(config.data.valid_path,) if validation else tuple(info.paths),
        weights=(1.0,) if validation else tuple(info.weights),
        seed=config.train.seed, vocab_size=config.model.vocab_size, micro_batch_size=layout.micro_batch_size,
        dp_rank=dp_rank, dp_size=layout.dp, start_sample=start_sample, doc_mask=config.data.doc_mask,
        skip_corrupt=config.data.skip_corrupt, allow_pipe=config.data.allow_pipe,
    )


def training_batches(config: Config, info: DataInfo | None, layout: Layout, dp_rank: int,
                     start_sample: int, pin_memory: bool, raw_state: RawState | None = None) -> Iterator[dict]:
    """This rank's endless stream of micro-batches, starting at the job's `start_sample`
    (data.source=raw: at this rank's `raw_state`)."""
    if info is None:
        return synthetic_batches(config.train.seed, config.model.vocab_size, config.model.seq_len,
                                 layout.micro_batch_size, dp_rank, layout.dp, start_sample)
    if info.raw_files:
        spec = RawSpec(tuple(info.raw_files), config.data.tokenizer, config.model.seq_len, config.train.seed,
                       dp_rank, layout.dp, first_shard=0)
        return raw_batches(spec, raw_state or RawState(), layout.micro_batch_size, config.data.num_workers,
                           config.data.doc_mask)
    if start_sample % layout.micro_batch_size:
        raise ShardError(f"cannot resume at sample {start_sample} with train.micro_batch_size="
                         f"{layout.micro_batch_size}: it must divide the samples already consumed")
    spec = stream_spec(config, info, layout, dp_rank, start_sample)
    return iter(micro_batch_loader(spec, config.data.num_workers, pin_memory))


def context_shards(batches: Iterator[dict], layout: Layout, cp_rank: int) -> Iterator[dict]:
    """This context-parallel rank's chunks of each micro-batch (the batches as they are at cp=1)."""
    return batches if layout.cp == 1 else (shard_batch(batch, layout.cp, cp_rank) for batch in batches)


def validation_batches(config: Config, info: DataInfo, layout: Layout, dp_rank: int,
                       cp_rank: int = 0) -> Iterator[dict]:
    """The first train.eval_steps global batches of the validation shards, this rank's share."""
    spec = stream_spec(config, info, layout, dp_rank, start_sample=0, validation=True)
    stream = iter(micro_batch_loader(spec, num_workers=0, pin_memory=False))
    batches = (next(stream) for _ in range(config.train.eval_steps * layout.grad_accumulation))
    return context_shards(batches, layout, cp_rank)


def batch_fingerprint(tokens: torch.Tensor) -> int:
    return int.from_bytes(hashlib.sha256(tokens.cpu().numpy().astype(np.int64).tobytes()).digest()[:7], "little")


def check_batch_agreement(tokens: torch.Tensor, dp_rank: int, group=None) -> None:
    """Ranks of one model replica (tensor-parallel peers, pipeline stages) must see the same
    batch: all-gather a hash of this rank's first micro-batch and stop on any mismatch."""
    mine = torch.tensor([dp_rank, batch_fingerprint(tokens)], dtype=torch.long)
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    first_of_replica: dict[int, tuple[int, int]] = {}
    for rank, (replica, fingerprint) in enumerate(t.tolist() for t in gathered):
        seen = first_of_replica.setdefault(replica, (rank, fingerprint))
        if seen[1] != fingerprint:
            raise RuntimeError(
                f"ranks {seen[0]} and {rank} belong to data-parallel rank {replica} but received different "
                "batches: the data must be split by data-parallel rank, not by global rank"
            )


class TrainingStream:
    """This rank's endless training micro-batches from the job's `start_sample` (data.source=raw:
    from this rank's `raw_state`), checked at the start to agree within each model replica. It
    keeps the raw stream position after the last batch (checkpointed per rank) and counts damaged
    samples, reported at log steps. Context-parallel ranks read the same micro-batches and keep their
    chunks of them."""

    def __init__(self, config: Config, info: DataInfo | None, layout: Layout, context: "ParallelContext",
                 start_sample: int, raw_state: RawState | None):
        self.config, self.info, self.device = config, info, context.device
        self.raw_state = raw_state
        # each damaged sample is counted once per replica: by its first-stage, TP-rank-0 process
        self.counts_damage = context.is_first_stage and context.tp_rank == 0
        self.window_damaged, self.skipped_corrupt = 0, 0
        batches = training_batches(config, info, layout, context.dp_rank, start_sample,
                                   pin_memory=self.device.type == "cuda", raw_state=raw_state)
        first = next(batches)
        check_batch_agreement(first["tokens"], context.dp_rank)
        self.batches = context_shards(itertools.chain([first], batches), layout, context.cp_rank)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.batches:
            if self.counts_damage:
                self.window_damaged += batch.get("corrupt", 0)
            self.raw_state = batch.get("state", self.raw_state)
            yield batch

    def report_damage(self, step: int, metrics: "MetricsWriter") -> None:
        """At a log step (collective): damaged samples skipped so far, written as
        data/skipped_corrupt; stop once they exceed data.skip_corrupt."""
        damaged = torch.tensor(self.window_damaged, device=self.device)
        dist.all_reduce(damaged)
        self.skipped_corrupt += int(damaged)
        self.window_damaged = 0
        if self.info is not None:
            metrics.write(step, {"skipped_corrupt": self.skipped_corrupt}, group="data", console=False)
        if self.skipped_corrupt > self.config.data.skip_corrupt:
            raise ShardError(f"{self.skipped_corrupt} damaged samples so far, more than data.skip_corrupt="
                             f"{self.config.data.skip_corrupt}: see the warnings above for the shards")
