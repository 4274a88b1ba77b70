"""The training data stream over built shards, exactly resumable and split by data-parallel rank.

The whole job reads one global sequence of samples that depends only on the datasets, their
weights and the seed: position P -> (dataset, that dataset's own sample number) by a fixed
weighted interleave -> (epoch, shard, sample) by a shard order and a within-shard order drawn
from (seed, dataset, epoch). Global micro-batch k holds positions k*m .. k*m+m-1 and belongs to
data-parallel rank k % dp. So the state is one integer, the samples consumed by the job, and a
resume at another data-parallel size continues the same sequence. DataLoader worker w of K
builds this rank's micro-batches j = w, w+K, ...; the DataLoader returns them in order, so the
sequence does not depend on K either."""

import bisect
import io
import logging
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.shards import Manifest, ShardError, index_path, is_url, open_location, sample_key

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
_BLEND_BLOCK = 10_000  # blend weights are honoured exactly within every block of this many samples


class ShardReader:
    """Reads single samples from shards through their .idx offsets. Local shards are read in
    place; remote ones are fetched whole into memory (the most recent few are kept)."""

    def __init__(self, manifest: Manifest, allow_pipe: bool, vocab_size: int, cache: int = 4):
        self.manifest, self.allow_pipe, self.vocab_size = manifest, allow_pipe, vocab_size
        self.sample_bytes = manifest.data["sample_tokens"] * manifest.dtype.itemsize
        self.open_shards: OrderedDict[int, tuple] = OrderedDict()
        self.cache = cache

    def _open(self, shard_index: int) -> tuple:
        if shard_index in self.open_shards:
            self.open_shards.move_to_end(shard_index)
            return self.open_shards[shard_index]
        shard = self.manifest.shards[shard_index]
        location = self.manifest.shard_path(shard)
        index_location = str(index_path(Path(location))) if not is_url(location) else location + ".idx"
        try:
            with open_location(index_location, self.allow_pipe) as index_file:
                offsets = np.frombuffer(index_file.read(), dtype="<u8")
            handle = open_location(location, self.allow_pipe)
            if is_url(location):
                with handle:
                    handle = io.BytesIO(handle.read())
        except OSError as error:
            raise ShardError(f"shard {location} cannot be read ({error}); check data.path and the file") from None
        if len(offsets) != shard["samples"]:
            raise ShardError(f"{index_location} lists {len(offsets)} samples, the manifest {shard['samples']}: "
                             "the index does not belong to this shard; rebuild the shards")
        self.open_shards[shard_index] = (location, handle, offsets)
        if len(self.open_shards) > self.cache:
            _, (_, old, _) = self.open_shards.popitem(last=False)
            old.close()
        return self.open_shards[shard_index]

    def read(self, shard_index: int, member: int) -> np.ndarray:
        """The sample's seq_len + 1 tokens; ShardError names shard and sample when it is damaged."""
        location, handle, offsets = self._open(shard_index)
        key = sample_key(self.manifest.key_prefix(shard_index), member)
        handle.seek(int(offsets[member]) - tarfile.BLOCKSIZE)
        raw = handle.read(tarfile.BLOCKSIZE + self.sample_bytes)
        header_name = raw[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if len(raw) < tarfile.BLOCKSIZE + self.sample_bytes:
            raise ShardError(f"shard {location}, sample {key}: truncated (file ends early)")
        if header_name != f"{key}.tokens":
            raise ShardError(f"shard {location}, sample {key}: expected member {key}.tokens, found "
                             f"'{header_name}' (corrupt tar or wrong index)")
        tokens = np.frombuffer(raw, dtype=self.manifest.dtype, offset=tarfile.BLOCKSIZE)
        if int(tokens.max()) >= self.vocab_size:
            raise ShardError(f"shard {location}, sample {key}: token id {int(tokens.max())} is outside the "
                             f"vocabulary of {self.vocab_size} (corrupt data)")
        return tokens

    def close(self) -> None:
        for _, handle, _ in self.open_shards.values():
            handle.close()
        self.open_shards.clear()


def _permutation(n: int, *seed: int) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(seed)))).permutation(n)


class DatasetOrder:
    """Where a dataset's k-th sample lies: epoch k // N, then a shuffled shard order and a
    shuffled order inside each shard, both drawn from (seed, dataset, epoch)."""

    def __init__(self, sample_counts: list[int], seed: int, dataset_index: int):
        self.counts = np.asarray(sample_counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.dataset_index = seed, dataset_index
        self._epoch_layout = lru_cache(maxsize=2)(self._layout)
        self._member_order = lru_cache(maxsize=64)(self._members)

    def _layout(self, epoch: int) -> tuple[np.ndarray, list[int]]:
        order = _permutation(len(self.counts), self.seed, self.dataset_index, epoch)
        starts = np.concatenate([[0], np.cumsum(self.counts[order])]).tolist()
        return order, starts

    def _members(self, epoch: int, shard: int) -> np.ndarray:
        return _permutation(int(self.counts[shard]), self.seed, self.dataset_index, epoch, shard + 1)

    def locate(self, k: int) -> tuple[int, int, int]:
        """(epoch, shard, member) of this dataset's k-th sample."""
        epoch, offset = divmod(k, self.total)
        order, starts = self._epoch_layout(epoch)
        slot = bisect.bisect_right(starts, offset) - 1
        shard = int(order[slot])
        return epoch, shard, int(self._member_order(epoch, shard)[offset - starts[slot]])


class Blend:
    """A fixed interleave of datasets by weight: in every block of _BLEND_BLOCK positions,
    dataset d takes round(weight_d x block) of them, spread evenly."""

    def __init__(self, weights: list[float]):
        total = sum(weights)
        block = 1 if len(weights) == 1 else _BLEND_BLOCK
        exact = [w / total * block for w in weights]
        counts = [int(x) for x in exact]
        for d in sorted(range(len(weights)), key=lambda d: counts[d] - exact[d])[: block - sum(counts)]:
            counts[d] += 1
        if min(counts) == 0:
            raise ShardError(f"data.weights={weights}: a weight this small gets no samples; raise it or drop the dataset")
        keyed = sorted(((i + 0.5) / n, d) for d, n in enumerate(counts) for i in range(n))
        self.block, self.counts = block, counts
        self.pattern = np.array([d for _, d in keyed], dtype=np.int64)
        self.before = np.zeros((block + 1, len(weights)), dtype=np.int64)  # samples of d before slot i
        for i, d in enumerate(self.pattern):
            self.before[i + 1] = self.before[i]
            self.before[i + 1, d] += 1

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset, that dataset's sample number) of a global position."""
        blocks, slot = divmod(position, self.block)
        dataset = int(self.pattern[slot])
        return dataset, blocks * self.counts[dataset] + int(self.before[slot, dataset])


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker process needs to rebuild the stream (picklable)."""

    paths: tuple[str, ...]
    weights: tuple[float, ...]
    seed: int
    vocab_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int
    start_sample: int
    doc_mask: bool
    skip_corrupt: int
    allow_pipe: bool


class MicroBatches(IterableDataset):
    """This rank's micro-batches, endless: dicts of tokens, labels (padding -> IGNORE_INDEX),
    position_ids and document_ids (per-document positions when doc_mask), and `corrupt`, the
    number of damaged samples replaced by all-ignored labels in this micro-batch."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec

    def __iter__(self):
        spec = self.spec
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        manifests = [Manifest.load(p, spec.allow_pipe) for p in spec.paths]
        readers = [ShardReader(m, spec.allow_pipe, spec.vocab_size) for m in manifests]
        orders = [DatasetOrder([s["samples"] for s in m.shards], spec.seed, d) for d, m in enumerate(manifests)]
        blend = Blend(list(spec.weights))
        eos, pad = manifests[0].data["eos_id"], manifests[0].data["pad_id"]
        first_micro_batch = spec.start_sample // spec.micro_batch_size
        local = worker_id
        try:
            while True:
                k = first_micro_batch + local * spec.dp_size + spec.dp_rank
                samples, corrupt = [], 0
                for position in range(k * spec.micro_batch_size, (k + 1) * spec.micro_batch_size):
                    dataset, number = blend.locate(position)
                    _, shard, member = orders[dataset].locate(number)
                    try:
                        samples.append(readers[dataset].read(shard, member))
                    except ShardError as error:
                        if not spec.skip_corrupt:
                            raise
                        log.warning("skipping damaged sample: %s", error)
                        corrupt += 1
                        samples.append(np.full(manifests[dataset].data["sample_tokens"], pad, dtype=np.int64))
                yield make_batch(np.stack(samples).astype(np.int64), eos, pad, spec.doc_mask) | {"corrupt": corrupt}
                local += workers
        finally:
            for reader in readers:
                reader.close()


def make_batch(samples: np.ndarray, eos_id: int, pad_id: int, doc_mask: bool) -> dict[str, torch.Tensor]:
    """[m, seq_len + 1] token ids -> inputs, shifted labels, and per-document positions."""
    samples = torch.from_numpy(samples)
    tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].clone()
    labels[labels == pad_id] = IGNORE_INDEX
    batch = {"tokens": tokens, "labels": labels}
    if doc_mask:
        # a document starts at position 0 and after every EOS
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = tokens[:, :-1] == eos_id
        document_ids = starts.long().cumsum(dim=1)
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        start_of_each = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=1).values
        batch["position_ids"] = positions - start_of_each
        batch["document_ids"] = document_ids
    return batch


def micro_batch_loader(spec: StreamSpec, num_workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(MicroBatches(spec), batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
