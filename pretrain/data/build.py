"""`pretrain data build`: documents -> token ids (EOS appended) -> samples of seq_len + 1
tokens packed back to back -> tar shards of a fixed number of samples -> manifest.json, and
`pretrain data merge`: parts built apart (on several nodes) -> one manifest.

The input files are grouped, in order, into packing units of about `unit_bytes` of input each;
packing restarts at every unit (its last sample is padded) and a unit's shards are named after
it. A part (`--num-parts N --part I`) builds a contiguous range of units, so merged parts are
the very shards one build makes. Tokenization runs in worker processes in input order, so the
output is byte-identical for the same inputs and settings whatever the number of workers."""

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pretrain.data.documents import DocumentStats, InputError, describe, input_bytes, iter_documents, resolve_inputs
from pretrain.data.shards import (
    FORMAT, MANIFEST, PACKING_UNIT_MB, TOKENIZER_DIR, VERSION, Manifest, ShardError, ShardWriter, file_sha256,
    index_path, sample_key, token_dtype,
)
from pretrain.outputs import MARKER, PARTIAL, Output, fresh
from pretrain.tokenizer import TOKENIZER_FILES, Tokenizer, copy_tokenizer, split_flat

_DOCS_PER_TASK = 64
UNIT_BYTES = PACKING_UNIT_MB * 2**20
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode(task: tuple[int, list[str]]) -> tuple[int, np.ndarray, np.ndarray]:
    unit, texts = task
    return unit, *_worker_tokenizer.encode_flat(texts)


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


def packing_units(paths: list[Path], unit_bytes: int) -> list[list[Path]]:
    """Consecutive input files grouped until each group holds at least unit_bytes (the last may
    hold less); decided by file sizes alone, so every node finds the same units."""
    units, current, size = [], [], 0
    for path in paths:
        current.append(path)
        size += path.stat().st_size
        if size >= unit_bytes:
            units.append(current)
            current, size = [], 0
    return units + ([current] if current else [])


def part_units(units: list[list[Path]], num_parts: int, part: int) -> range:
    """The contiguous units of part `part` of `num_parts`, balanced by input bytes."""
    if not 0 <= part < num_parts:
        raise InputError(f"--part {part} is not in 0..{num_parts - 1} (--num-parts {num_parts})")
    if len(units) < num_parts:
        raise InputError(f"the inputs make {len(units)} packing unit(s), fewer than --num-parts {num_parts}: "
                         f"lower --num-parts to at most {len(units)} or --unit-mb to split the inputs finer")
    starts, total = [], 0
    for unit in units:
        starts.append(total)
        total += sum(p.stat().st_size for p in unit)
    bounds = [0]
    for k in range(1, num_parts):  # part k starts at the first unit past k/N of the bytes, one unit at least each
        first = next((i for i, start in enumerate(starts) if start * num_parts >= total * k), len(units))
        bounds.append(min(max(first, bounds[-1] + 1), len(units) - (num_parts - k)))
    bounds.append(len(units))
    return range(bounds[part], bounds[part + 1])


def _inputs_digest(paths: list[Path], unit_bytes: int) -> str:
    """Identifies the whole input list a part was cut from: names, sizes and the unit size."""
    listing = json.dumps([[str(p.resolve()), p.stat().st_size] for p in paths] + [unit_bytes])
    return hashlib.sha256(listing.encode()).hexdigest()


def build_shards(inputs: list[str | Path], tokenizer_dir: str | Path, seq_len: int, out: str | Path,
                 shard_samples: int = 10_000, workers: int = 1, text_field: str = "text",
                 progress: bool = True, num_parts: int = 1, part: int = 0, unit_bytes: int = UNIT_BYTES) -> dict:
    """Build shards (all, or part `part` of `num_parts`) into `out`, which must not hold shards
    yet; returns the manifest."""
    paths = resolve_inputs(inputs)
    if seq_len < 1 or shard_samples < 1 or workers < 1 or num_parts < 1 or unit_bytes < 1:
        raise InputError("--seq-len, --shard-samples, --workers, --num-parts and --unit-mb must be at least 1")
    units = packing_units(paths, unit_bytes)
    mine = part_units(units, num_parts, part)
    tokenizer = Tokenizer.load(tokenizer_dir)
    out = Path(out)
    if (out / MANIFEST).exists():
        raise InputError(f"{out} already holds shards ({MANIFEST}); choose an empty --out or delete it first")
    with fresh(out, "data build") as output:  # a part that died halfway is built again from the start
        _copy_tokenizer(output, tokenizer.path)

        dtype = token_dtype(tokenizer.vocab_size)
        stats = DocumentStats()
        shards: list[dict] = []
        writer: ShardWriter | None = None
        unit_shards = 0
        tokens = 0

        def write(unit: int, samples: Iterator[tuple[np.ndarray, list[int]]]) -> None:
            nonlocal writer, unit_shards
            for sample, doc_starts in samples:
                if writer is None:
                    name = Path(f"shard-{unit:06d}-{unit_shards:05d}.tar")
                    output.claim(*ShardWriter.files(name))
                    writer = ShardWriter(out / name, f"{unit:06d}{unit_shards:05d}")
                writer.add(sample_key(writer.key_prefix, len(writer.offsets)), sample, doc_starts)
                if len(writer.offsets) == shard_samples:
                    close_shard()

        def close_shard() -> None:
            nonlocal writer, unit_shards
            if writer is not None:
                shards.append(writer.close())
                writer, unit_shards = None, unit_shards + 1

        def unit_batches() -> Iterator[tuple[int, list[str]]]:
            for unit in mine:
                for batch in _batches(iter_documents(units[unit], text_field, stats), _DOCS_PER_TASK):
                    yield unit, batch

        my_paths = [p for unit in mine for p in units[unit]]
        bar = tqdm(desc="data build", total=input_bytes(my_paths), unit="B", unit_scale=True, disable=not progress)
        started, packer, current = time.perf_counter(), None, None
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
            for unit, ids, lengths in pool.imap(_encode, unit_batches()):
                if unit != current:  # a new unit: finish the last one's packing and shard
                    if packer is not None:
                        write(current, packer.finish(tokenizer.pad_id))
                        close_shard()
                    packer, current, unit_shards = Packer(seq_len + 1, tokenizer.eos_id, dtype), unit, 0
                tokens += len(ids) + len(lengths)
                write(unit, packer.add_documents(ids, lengths))
                bar.update(stats.bytes_read - bar.n)
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):,.0f} tokens/s", refresh=False)
        bar.close()
        if packer is not None:
            write(current, packer.finish(tokenizer.pad_id))
            close_shard()
        if not shards:
            raise InputError(f"no non-empty documents in {describe(my_paths)}")

        manifest = {
            "format": FORMAT, "version": VERSION,
            "seq_len": seq_len, "sample_tokens": seq_len + 1, "dtype": dtype.name,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
            "tokenizer": {"path": TOKENIZER_DIR, "source": str(tokenizer.path), "sha256": tokenizer.sha256,
                          "vocab_size": tokenizer.vocab_size},
            "inputs": [{"path": str(p), "sha256": file_sha256(p), "documents": stats.per_file[str(p)]}
                       for p in my_paths],
            "documents": stats.documents, "tokens": tokens, "samples": sum(s["samples"] for s in shards),
            "padding_tokens": sum(s["samples"] for s in shards) * (seq_len + 1) - tokens,
            "empty_documents_skipped": stats.empty_skipped, "invalid_utf8_replaced": stats.invalid_utf8_replaced,
            "shard_samples": shard_samples, "unit_bytes": unit_bytes, "units": len(mine), "shards": shards,
        }
        if num_parts > 1:
            manifest["part"] = {"index": part, "of": num_parts, "units": [mine.start, mine.stop],
                                "inputs_digest": _inputs_digest(paths, unit_bytes)}
        _write_manifest(output, manifest)
    return manifest


def _copy_tokenizer(output: Output, source: Path) -> None:
    output.claim(*(Path(TOKENIZER_DIR) / name for name in TOKENIZER_FILES))
    copy_tokenizer(source, output.root / TOKENIZER_DIR)


def _write_manifest(output: Output, manifest: dict) -> None:
    partial, final = output.claim(MANIFEST + PARTIAL, MANIFEST)
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, final)


SUMMED = ("documents", "tokens", "samples", "padding_tokens", "empty_documents_skipped", "invalid_utf8_replaced",
          "units")
SHARED = ("seq_len", "sample_tokens", "dtype", "eos_id", "pad_id", "shard_samples", "unit_bytes")


def merge_parts(part_dirs: list[str | Path], out: str | Path) -> dict:
    """Move the shards of parts 0..N-1 of one build into `out` and write its manifest: the
    shards and manifest one build would have made. What the build made in the part folders is
    removed afterwards (anything else stays, and is named); an interrupted merge can be run again."""
    out = Path(out)
    if (out / MANIFEST).exists():
        raise InputError(f"{out} already holds shards ({MANIFEST}); choose an empty --out or delete it first")
    parts = []
    for folder in map(Path, part_dirs):
        manifest = Manifest.load(folder).data
        if "part" not in manifest:
            raise InputError(f"{folder} is not a part of a build (built without --num-parts)")
        parts.append((manifest["part"]["index"], folder, manifest))
    parts.sort(key=lambda part: part[0])
    first = parts[0][2]
    count = first["part"]["of"]
    found = [index for index, _, _ in parts]
    if found != list(range(count)):
        missing = sorted(set(range(count)) - set(found))
        raise InputError(f"the parts given are {found} of {count}" + (f"; missing {missing}" if missing else
                         "; some part is given twice") + ": pass every part's folder once")
    for index, folder, manifest in parts:
        differences = [key for key in SHARED if manifest[key] != first[key]]
        if manifest["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            differences.append("tokenizer")
        if manifest["part"]["inputs_digest"] != first["part"]["inputs_digest"] or manifest["part"]["of"] != count:
            differences.append("inputs")
        if differences:
            raise InputError(f"part {index} ({folder}) was built with other {', '.join(differences)} than part 0 "
                             f"({parts[0][1]}): rebuild it with the same command and --part {index}")
    output = Output.open(out, "data merge", allow=[folder for _, folder, _ in parts])  # resumes its own
    shards = []
    for _, folder, manifest in parts:
        for shard in manifest["shards"]:
            for name in (shard["name"], index_path(Path(shard["name"])).name):
                [target] = output.claim(name)
                if (folder / name).exists():
                    shutil.move(folder / name, target)
                elif not target.exists():
                    raise ShardError(f"{folder / name} is missing (and not in {out} already): rebuild that part")
            shards.append(shard)
    _copy_tokenizer(output, parts[0][1] / TOKENIZER_DIR)
    merged = {key: value for key, value in first.items() if key != "part"}
    merged.update({key: sum(m[key] for _, _, m in parts) for key in SUMMED})
    merged["inputs"] = [entry for _, _, m in parts for entry in m["inputs"]]
    merged["shards"] = shards
    _write_manifest(output, merged)
    for _, folder, _ in parts:
        _remove_part(folder)
        holder = folder.resolve().parent  # e.g. OUT/parts, where slurm-data builds them
        if holder != out.resolve() and holder.is_relative_to(out.resolve()) and not any(holder.iterdir()):
            holder.rmdir()
    return merged


def _remove_part(folder: Path) -> None:
    """Delete what `data build` made in a merged part's folder; name what it leaves there."""
    part = Output.find(folder, "data build")
    if part is None:
        print(f"pretrain: {folder} has no record ({MARKER}) of the files `pretrain data build` made there: "
              "left as it is; delete it yourself", file=sys.stderr)
        return
    left = part.remove()
    if left:
        print(f"pretrain: left {folder} with {', '.join(p.name for p in left)} in it: not made by "
              "`pretrain data build`", file=sys.stderr)
