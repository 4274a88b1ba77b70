"""`pretrain data build`: documents -> token ids (EOS appended) -> samples of seq_len + 1
tokens packed back to back -> tar shards of a fixed number of samples -> manifest.json.

Tokenization runs in worker processes in input order, so the output is byte-identical for
the same inputs and settings whatever the number of workers."""

import json
import multiprocessing
import os
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.data.documents import DocumentStats, InputError, check_inputs, iter_documents
from pretrain.data.shards import FORMAT, MANIFEST, VERSION, ShardWriter, file_sha256, sample_key, token_dtype
from pretrain.tokenizer import Tokenizer, split_flat

_DOCS_PER_TASK = 64
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_tokenizer.encode_flat(texts)


def _batches(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(islice(documents, size)):
        yield batch


class Packer:
    """Concatenates documents (each followed by EOS) into samples of `length` tokens."""

    def __init__(self, length: int, eos_id: int, dtype: np.dtype):
        self.length, self.eos_id, self.dtype = length, eos_id, dtype
        self.buffer = np.empty(length, dtype=dtype)
        self.filled = 0
        self.doc_starts: list[int] = []

    def add(self, ids: "list[int] | np.ndarray") -> Iterator[tuple[np.ndarray, list[int]]]:
        """Append one document; yields every sample it completes."""
        document = np.empty(len(ids) + 1, dtype=self.dtype)
        document[:-1], document[-1] = ids, self.eos_id
        self.doc_starts.append(self.filled)
        while len(document):
            take = min(self.length - self.filled, len(document))
            self.buffer[self.filled:self.filled + take] = document[:take]
            self.filled += take
            document = document[take:]
            if self.filled == self.length:
                yield self.buffer.copy(), self.doc_starts
                self.filled, self.doc_starts = 0, []

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray) -> Iterator[tuple[np.ndarray, list[int]]]:
        """Append documents given back to back with their lengths; yields every sample completed."""
        for document in split_flat(ids, lengths):
            yield from self.add(document)

    def finish(self, pad_id: int) -> Iterator[tuple[np.ndarray, list[int]]]:
        """The last, partly filled sample, padded with pad_id."""
        if self.filled:
            self.buffer[self.filled:] = pad_id
            yield self.buffer.copy(), self.doc_starts
            self.filled, self.doc_starts = 0, []


def build_shards(inputs: list[str | Path], tokenizer_dir: str | Path, seq_len: int, out: str | Path,
                 shard_samples: int = 10_000, workers: int = 1, text_field: str = "text",
                 progress: bool = True) -> dict:
    """Build shards into `out` (which must not hold shards yet); returns the manifest."""
    paths = check_inputs(inputs)
    if seq_len < 1 or shard_samples < 1 or workers < 1:
        raise InputError("--seq-len, --shard-samples and --workers must be at least 1")
    tokenizer = Tokenizer.load(tokenizer_dir)
    out = Path(out)
    if (out / MANIFEST).exists():
        raise InputError(f"{out} already holds shards ({MANIFEST}); choose an empty --out or delete it first")
    out.mkdir(parents=True, exist_ok=True)

    dtype = token_dtype(tokenizer.vocab_size)
    packer = Packer(seq_len + 1, tokenizer.eos_id, dtype)
    stats = DocumentStats()
    shards: list[dict] = []
    writer: ShardWriter | None = None
    tokens = 0

    def write(samples: Iterator[tuple[np.ndarray, list[int]]]) -> None:
        nonlocal writer
        for sample, doc_starts in samples:
            if writer is None:
                writer = ShardWriter(out / f"shard-{len(shards):06d}.tar")
            writer.add(sample_key(len(shards), len(writer.offsets)), sample, doc_starts)
            if len(writer.offsets) == shard_samples:
                shards.append(writer.close())
                writer = None

    documents = _batches(iter_documents(paths, text_field, stats), _DOCS_PER_TASK)
    bar = tqdm(desc="documents", unit="doc", disable=not progress)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        for ids, lengths in pool.imap(_encode, documents):
            tokens += len(ids) + len(lengths)
            write(packer.add_documents(ids, lengths))
            bar.update(len(lengths))
    bar.close()
    write(packer.finish(tokenizer.pad_id))
    if writer is not None:
        shards.append(writer.close())
    if not shards:
        raise InputError(f"no non-empty documents in {', '.join(map(str, paths))}")

    manifest = {
        "format": FORMAT, "version": VERSION,
        "seq_len": seq_len, "sample_tokens": seq_len + 1, "dtype": dtype.name,
        "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
        "tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size},
        "inputs": [{"path": str(p), "sha256": file_sha256(p), "documents": stats.per_file[str(p)]} for p in paths],
        "documents": stats.documents, "tokens": tokens, "samples": sum(s["samples"] for s in shards),
        "padding_tokens": sum(s["samples"] for s in shards) * (seq_len + 1) - tokens,
        "empty_documents_skipped": stats.empty_skipped, "invalid_utf8_replaced": stats.invalid_utf8_replaced,
        "shard_samples": shard_samples, "shards": shards,
    }
    partial = out / (MANIFEST + ".partial")
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, out / MANIFEST)
    return manifest
