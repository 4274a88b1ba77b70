"""`pretrain bench data`: the loader's end-to-end throughput on one core beside raw webdataset
iteration of the same shards, and on-the-fly tokenization (data.source=raw) beside raw
sentencepiece encoding of the same documents. Builds everything from a local corpus first."""

import io
import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pretrain.data.build import build_shards
from pretrain.data.documents import iter_documents, resolve_inputs
from pretrain.data.loader import MicroBatches, StreamSpec
from pretrain.data.raw import RawSpec, RawState, raw_batches, raw_shard_files
from pretrain.data.shards import Manifest
from pretrain.tokenizer import Tokenizer, train_tokenizer

GOALS = {"loader_vs_raw_iteration": 0.5, "on_the_fly_tokens_per_sec": 1.5e6}


def stdlib_sources() -> list[str]:
    """The Python standard library's own .py files: a corpus present on every machine."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _rate(count_tokens: Callable[[], int], seconds: float, rounds: int = 3) -> float:
    """Tokens per second of the best of `rounds` rounds, each repeating `count_tokens` for at
    least `seconds` / `rounds`: the machines are shared, the best round is the least disturbed."""
    best = 0.0
    for _ in range(rounds):
        start, tokens = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < seconds / rounds or tokens == 0:
            tokens += count_tokens()
        best = max(best, tokens / elapsed)
    return best


def _write_text_shards(documents: list[str], folder: Path, per_shard: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for shard, first in enumerate(range(0, len(documents), per_shard)):
        with tarfile.open(folder / f"text-{shard:05d}.tar", "w") as tar:
            for index, text in enumerate(documents[first:first + per_shard]):
                payload = text.encode()
                info = tarfile.TarInfo(f"{first + index:08d}.txt")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def run(inputs: list[str], work: Path, seq_len: int = 2048, vocab_size: int = 8000, micro_batch_size: int = 8,
        seconds: float = 3.0) -> dict:
    torch.set_num_threads(1)
    paths = resolve_inputs(inputs)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizer" / "card.json").exists():
        train_tokenizer(paths, vocab_size, work / "tokenizer")
    tokenizer = Tokenizer.load(work / "tokenizer")
    if not (work / "shards" / "manifest.json").exists():
        build_shards(paths, work / "tokenizer", seq_len, work / "shards", shard_samples=1000, workers=2, progress=False)
    documents = list(iter_documents(paths))
    if not (work / "text").exists():
        _write_text_shards(documents, work / "text", per_shard=20)
    manifest = Manifest.load(work / "shards")
    shard_files = [manifest.shard_path(s) for s in manifest.shards]
    dtype = manifest.dtype

    def webdataset_pass() -> int:
        import webdataset

        return sum(len(np.frombuffer(s["tokens"], dtype=dtype))
                   for s in webdataset.WebDataset(shard_files, shardshuffle=False, empty_check=False))

    def loader(doc_mask: bool) -> Callable[[], int]:
        stream = iter(MicroBatches(StreamSpec(
            paths=(str(work / "shards"),), weights=(1.0,), seed=0, vocab_size=tokenizer.vocab_size,
            micro_batch_size=micro_batch_size, dp_rank=0, dp_size=1, start_sample=0, doc_mask=doc_mask,
            skip_corrupt=0, allow_pipe=False)))
        return lambda: next(stream)["tokens"].numel()

    def sentencepiece_pass() -> int:
        return sum(len(ids) for ids in tokenizer.processor.encode(documents, num_threads=1))

    text_shards = tuple(raw_shard_files(str(work / "text")))

    def on_the_fly_epoch() -> int:
        """One pass over every text shard (the same documents sentencepiece_pass encodes) with a
        fresh tokenizer, so its caches start cold. It ends with (and counts) the first batch of
        the next epoch, for which that epoch's whole first shard is tokenized: one shard of ~90
        more than counted, so the figure is ~1% low."""
        stream = raw_batches(RawSpec(text_shards, str(work / "tokenizer"), seq_len, 0, 0, 1, 0), RawState(),
                             micro_batch_size, num_workers=0, doc_mask=False)
        tokens, shards_started = 0, 0
        while shards_started <= len(text_shards):
            batch = next(stream)
            tokens, shards_started = tokens + int((batch["labels"] != -100).sum()), batch["state"].shards_started
        return tokens

    rates = {
        "webdataset_raw_iteration": _rate(webdataset_pass, seconds),
        "loader": _rate(loader(doc_mask=False), seconds),
        "loader_doc_mask": _rate(loader(doc_mask=True), seconds),
        "sentencepiece_encode": _rate(sentencepiece_pass, seconds),
        "on_the_fly_raw": _rate(on_the_fly_epoch, seconds),
    }
    return {
        "tokens_per_sec_one_core": {name: round(rate) for name, rate in rates.items()},
        "loader_vs_raw_iteration": round(rates["loader"] / rates["webdataset_raw_iteration"], 2),
        "on_the_fly_vs_sentencepiece": round(rates["on_the_fly_raw"] / rates["sentencepiece_encode"], 2),
        "goals": GOALS,
        "setup": {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "dtype": dtype.name,
                  "samples": manifest.num_samples, "documents": len(documents)},
    }


def print_table(result: dict) -> None:
    rates = result["tokens_per_sec_one_core"]
    rows = [("webdataset raw iteration (baseline)", "webdataset_raw_iteration", ""),
            ("our loader, torch tensors out", "loader", f"{result['loader_vs_raw_iteration']:.2f}x raw (goal >= 0.5x)"),
            ("our loader + document masking", "loader_doc_mask", ""),
            ("sentencepiece encode (baseline)", "sentencepiece_encode", ""),
            ("on-the-fly tokenize + pack (raw)", "on_the_fly_raw",
             f"{result['on_the_fly_vs_sentencepiece']:.2f}x spm (goal >= 1.5M tok/s)")]
    print(f"{'one core, seq_len ' + str(result['setup']['seq_len']):<40}{'tokens/s':>14}  comparison")
    for label, key, note in rows:
        print(f"{label:<40}{rates[key]:>14,}  {note}")


def main(inputs: list[str] | None, work: str, out: str | None, seq_len: int, seconds: float) -> int:
    result = run(inputs or stdlib_sources(), Path(work), seq_len=seq_len, seconds=seconds)
    print_table(result)
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0
