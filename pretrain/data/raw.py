"""`data.source=raw`: documents tokenized and packed while training, for users who skip
`pretrain data build`. data.path is what `data build --input` takes (files, folders, globs of
JSON lines, parquet, datasets folders, text) plus tar shards of raw text (webdataset style, one
`<key>.txt` member per document); each file is a shard here.

Each epoch shuffles the shard list with (seed, epoch); data-parallel rank r reads the shards
at positions r, r + dp, ... of it. DataLoader workers tokenize whole shards (worker w takes
this rank's shards w, w + K, ...) and the main process packs them in order, so the sample
sequence does not depend on the number of workers. Packing restarts at every shard (its last
sample is padded). The state of a rank is (shards started, samples taken from the current one);
it can only be restored at the same data-parallel size."""

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.build import Packer
from pretrain.data.documents import TEXT_TAR, InputError, iter_documents, resolve_inputs, suffix_of
from pretrain.data.loader import make_batch
from pretrain.data.shards import ShardError
from pretrain.tokenizer import Tokenizer


def raw_shard_files(location: str) -> list[str]:
    """The input files data.path names (a folder's sorted), each a shard of documents."""
    try:
        return [str(p) for p in resolve_inputs([location], text_tars=True)]
    except InputError as error:
        raise ShardError(f"data.path {location} (data.source=raw): {error}") from None


def read_documents(shard: str) -> list[str]:
    """The documents of one shard, in order; invalid UTF-8 replaced. In a tar of .txt members a
    damaged header is an error: tarfile alone would end the archive there and drop the rest."""
    if suffix_of(Path(shard)) != TEXT_TAR:
        try:
            return list(iter_documents([Path(shard)]))
        except InputError as error:
            raise ShardError(f"raw shard {shard} cannot be read: {error}") from None
    try:
        data = Path(shard).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            documents = [tar.extractfile(m).read().decode("utf-8", errors="replace")
                         for m in tar if m.isfile() and m.name.endswith(".txt")]
            end = tar.offset
    except (tarfile.TarError, OSError) as error:
        raise ShardError(f"raw shard {shard} cannot be read ({error}): repair or remove it") from None
    if data[end:].strip(b"\0"):
        raise ShardError(f"raw shard {shard} cannot be read (damaged tar header at byte {end}, after "
                         f"{len(documents)} documents): repair or remove it")
    return documents


@dataclass(frozen=True)
class RawState:
    shards_started: int = 0  # this rank's shards begun (the current one included)
    samples_taken: int = 0  # samples already yielded from the current shard


@dataclass(frozen=True)
class RawSpec:
    files: tuple[str, ...]
    tokenizer: str
    seq_len: int
    seed: int
    dp_rank: int
    dp_size: int
    first_shard: int  # index into this rank's endless shard sequence


class TokenizedShards(IterableDataset):
    """This rank's shards in order, from `first_shard` on, each as a list of token-id lists."""

    def __init__(self, spec: RawSpec):
        self.spec = spec

    def shard_at(self, ordinal: int) -> str:
        """The rank's ordinal-th shard: epochs are passes over its share of the shuffled list."""
        spec = self.spec
        per_epoch = len(range(spec.dp_rank, len(spec.files), spec.dp_size))
        epoch, slot = divmod(ordinal, per_epoch)
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([spec.seed, epoch]))).permutation(
            len(spec.files))
        return spec.files[order[spec.dp_rank + slot * spec.dp_size]]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per shard: all token ids back to back, and each document's length."""
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        tokenizer = Tokenizer.load(self.spec.tokenizer)
        ordinal = self.spec.first_shard + worker_id
        while True:
            ids, lengths = tokenizer.encode_flat([d for d in read_documents(self.shard_at(ordinal)) if d.strip()])
            yield ids.astype(np.int64), lengths
            ordinal += workers


def packed_samples(tokens: np.ndarray, lengths: np.ndarray, packer: Packer, pad_id: int) -> Iterator[np.ndarray]:
    for sample, _ in chain(packer.add_documents(tokens, lengths), packer.finish(pad_id)):
        yield sample


def raw_batches(spec: RawSpec, state: RawState, micro_batch_size: int, num_workers: int,
                doc_mask: bool) -> Iterator[dict]:
    """Endless micro-batches packed from this rank's shards, resuming at `state`. Each batch
    carries `state`, the RawState after it, for checkpoints."""
    if len(spec.files) < spec.dp_size:
        raise ShardError(f"data.source=raw needs at least one shard per data-parallel rank: {len(spec.files)} "
                         f"shards for {spec.dp_size} ranks; split the text into more shards")
    tokenizer = Tokenizer.load(spec.tokenizer)
    first = max(state.shards_started - 1, 0)
    tokenized = TokenizedShards(RawSpec(**{**spec.__dict__, "first_shard": first}))
    shards = DataLoader(tokenized, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
    skip = state.samples_taken if state.shards_started else 0
    samples = []
    for ordinal, (tokens, lengths) in enumerate(shards, start=first):
        packer = Packer(spec.seq_len + 1, tokenizer.eos_id, np.dtype(np.int64))
        for index, sample in enumerate(packed_samples(tokens.numpy(), lengths.numpy(), packer, tokenizer.pad_id)):
            if index < skip:
                continue
            samples.append(sample)
            if len(samples) == micro_batch_size:
                batch = make_batch(np.stack(samples), tokenizer.eos_id, tokenizer.pad_id, doc_mask)
                yield batch | {"state": RawState(ordinal + 1, index + 1)}
                samples = []
        skip = 0
