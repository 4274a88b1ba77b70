"""Real corpora: the same documents as JSON lines (plain, gzip, zstd), parquet, a Hugging Face
datasets folder, a folder of text files or a glob build byte-identical shards; binary data under a
text name is refused; sentencepiece failures name the setting and a value that works; shards
built in parts and merged are the shards of one build."""

import gzip
import json
import zipfile
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
import zstandard

from pretrain.data.build import build_shards, merge_parts
from pretrain.data.documents import InputError, iter_documents, resolve_inputs
from pretrain.data.loader import MicroBatches, StreamSpec
from pretrain.tokenizer import TokenizerError, train_tokenizer
from test_data import random_documents

SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    documents = random_documents(240, seed=5)
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents)).encode()
    (root / "docs.jsonl").write_bytes(lines)
    train_tokenizer([root / "docs.jsonl"], vocab_size=360, out=root / "tok")
    return {"root": root, "documents": documents, "lines": lines}


def formats(corpus: dict, tmp: Path) -> dict[str, list[str]]:
    """The corpus's documents written in every input format: name -> --input values."""
    documents, lines = corpus["documents"], corpus["lines"]
    (tmp / "dolma").mkdir()
    half = lines.index(b"\n", len(lines) // 2) + 1  # two files, as corpora come
    (tmp / "dolma" / "part-0.json.gz").write_bytes(gzip.compress(lines[:half]))
    (tmp / "dolma" / "part-1.json.gz").write_bytes(gzip.compress(lines[half:]))
    (tmp / "pile.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[:half])
                                         + zstandard.ZstdCompressor().compress(lines[half:]))  # two frames
    (tmp / "docs.jsonl.gz").write_bytes(gzip.compress(lines))
    pyarrow.parquet.write_table(pyarrow.table({"text": documents}), tmp / "fineweb.parquet", row_group_size=64)
    (tmp / "text").mkdir()
    for index, document in enumerate(documents):
        (tmp / "text" / f"{index:04d}.txt").write_text(document)
    result = {"jsonl": [str(corpus["root"] / "docs.jsonl")], "jsonl.gz": [str(tmp / "docs.jsonl.gz")],
              "json.gz folder": [str(tmp / "dolma")], "jsonl.zst": [str(tmp / "pile.jsonl.zst")],
              "parquet": [str(tmp / "fineweb.parquet")], "text folder": [str(tmp / "text")],
              "glob": [str(tmp / "text" / "*.txt")]}
    try:
        import datasets
    except ImportError:
        return result
    datasets.Dataset.from_dict({"text": documents}).save_to_disk(str(tmp / "hf"), num_shards=3)
    return result | {"datasets folder": [str(tmp / "hf")]}


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*"))}


def test_every_format_builds_the_same_shards(corpus, tmp_path):
    inputs = formats(corpus, tmp_path)
    if "datasets folder" not in inputs:
        pytest.skip("`datasets` is not installed: the Hugging Face datasets folder is not checked")
    assert len(resolve_inputs(inputs["datasets folder"])) > 1  # read file by file (parts can split it)
    built = {}
    for name, specs in inputs.items():
        manifest = build_shards(specs, corpus["root"] / "tok", SEQ_LEN, tmp_path / f"out-{name}", shard_samples=40,
                                progress=False)
        assert manifest["documents"] == len(corpus["documents"]), name
        built[name] = shard_files(tmp_path / f"out-{name}")
    reference = built.pop("jsonl")
    assert len(reference) > 2 * 2  # shards and their indexes
    for name, files in built.items():
        assert files == reference, name


def test_a_datasets_folder_needs_its_split_named(corpus, tmp_path):
    datasets = pytest.importorskip("datasets", reason="`datasets` is not installed")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["b"]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match=r"DatasetDict with splits .*: pass one split's folder, e\.g\. .*dict/"):
        resolve_inputs([tmp_path / "dict"])
    assert list(iter_documents(resolve_inputs([tmp_path / "dict" / "test"]))) == ["b"]


@pytest.mark.parametrize("name, payload, message", [
    ("notes.txt", gzip.compress(b"hello"), r"notes\.txt is gzip-compressed data, not text: name it \.jsonl\.gz"),
    ("notes.txt", zstandard.ZstdCompressor().compress(b"hello"), r"notes\.txt is zstd-compressed data, not text"),
    ("notes.txt", b"plain start\0then binary", r"notes\.txt holds NUL bytes: it is binary, not text"),
    ("data.jsonl", gzip.compress(b'{"text": "a"}\n'), r"data\.jsonl is gzip-compressed data, not JSON lines"),
    ("data.jsonl.gz", b'{"text": "not compressed"}\n', r"data\.jsonl\.gz: cannot be read after line 0 .*not what its "
                                                       r"name says"),
])
def test_binary_data_under_a_text_name_is_refused(tmp_path, name, payload, message):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(InputError, match=message):
        list(iter_documents([tmp_path / name]))


def test_zip_archives_and_missing_inputs_are_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "corpus.txt", "w") as archive:
        archive.writestr("a.txt", "text")
    with pytest.raises(InputError, match=r"corpus\.txt is a zip archive, not text: unpack it"):
        list(iter_documents([tmp_path / "corpus.txt"]))
    with pytest.raises(InputError, match=r"input file\(s\) not found: .*nothing-\*\.jsonl"):
        resolve_inputs([tmp_path / "nothing-*.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"folder .*empty holds no input files"):
        resolve_inputs([tmp_path / "empty"])


def test_sentencepiece_failures_name_the_setting_and_a_value_that_works(corpus, tmp_path):
    jsonl = corpus["root"] / "docs.jsonl"
    with pytest.raises(TokenizerError, match=r"--vocab-size 100 is too small for this corpus: .* (\d+) in all: use "
                                             r"--vocab-size \1 or more"):
        train_tokenizer([jsonl], vocab_size=100, out=tmp_path / "small")
    with pytest.raises(TokenizerError, match=r"--vocab-size 90000 is more than this corpus yields \(at most (\d+)\): "
                                             r"use --vocab-size \1 or less"):
        train_tokenizer([jsonl], vocab_size=90000, out=tmp_path / "big")
    (tmp_path / "blank.jsonl").write_text('{"text": " "}\n')
    with pytest.raises(TokenizerError, match=r"no text to train on in .*blank\.jsonl"):
        train_tokenizer([tmp_path / "blank.jsonl"], vocab_size=300, out=tmp_path / "blank")
    with pytest.raises(TokenizerError, match=r"--special <tool> is given twice"):
        train_tokenizer([jsonl], vocab_size=360, out=tmp_path / "twice", user_symbols=("<tool>", "<tool>"))
    with pytest.raises(TokenizerError, match=r"--special </s> is one of the built-in specials"):
        train_tokenizer([jsonl], vocab_size=360, out=tmp_path / "builtin", user_symbols=("</s>",))


def stream(shards: Path, count: int) -> list[torch.Tensor]:
    spec = StreamSpec(paths=(str(shards),), weights=(1.0,), seed=3, vocab_size=360, micro_batch_size=4, dp_rank=0,
                      dp_size=1, start_sample=0, doc_mask=False, skip_corrupt=0, allow_pipe=False)
    batches = iter(MicroBatches(spec))
    return [next(batches)["tokens"] for _ in range(count)]


def test_three_parts_merged_are_one_build(corpus, tmp_path):
    inputs = formats(corpus, tmp_path)["text folder"]  # 240 files: units of 2 KB hold several each
    common = dict(tokenizer_dir=corpus["root"] / "tok", seq_len=SEQ_LEN, shard_samples=16, progress=False,
                  unit_bytes=2048)
    one = build_shards(inputs, out=tmp_path / "one", **common)
    assert one["units"] >= 3
    for part in range(3):
        manifest = build_shards(inputs, out=tmp_path / "parts" / f"part-{part}", num_parts=3, part=part, **common)
        assert manifest["part"]["index"] == part and manifest["units"] >= 1
    with pytest.raises(InputError, match=r"the parts given are \[0, 2\] of 3; missing \[1\]"):
        merge_parts([tmp_path / "parts" / "part-0", tmp_path / "parts" / "part-2"], tmp_path / "merged")
    merged = merge_parts([tmp_path / "parts" / f"part-{part}" for part in (2, 0, 1)], tmp_path / "merged")
    assert merged["shards"] == one["shards"] and merged["tokens"] == one["tokens"]
    assert shard_files(tmp_path / "merged") == shard_files(tmp_path / "one")
    assert not (tmp_path / "parts" / "part-0").exists()
    assert all(torch.equal(a, b) for a, b in zip(stream(tmp_path / "merged", 30), stream(tmp_path / "one", 30)))


def test_raw_mode_takes_the_same_inputs_and_text_tars(corpus, tmp_path):
    from pretrain.data.raw import raw_shard_files, read_documents
    from test_raw import write_text_shard

    formats(corpus, tmp_path)
    write_text_shard(tmp_path / "dolma" / "extra.tar", ["from a tar"])
    files = raw_shard_files(str(tmp_path / "dolma"))
    assert [Path(f).name for f in files] == ["extra.tar", "part-0.json.gz", "part-1.json.gz"]
    assert [d for f in files for d in read_documents(f)] == ["from a tar", *corpus["documents"]]
