"""Bad input: every case gets an error that names the thing and what to do, or is skipped and
counted when allowed; nothing is silently lost."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, child_env
from pretrain.config import load
from pretrain.data.build import build_shards
from pretrain.data.documents import InputError
from pretrain.data.loader import MicroBatches, StreamSpec
from pretrain.data.stream import resolve, verify_shards
from pretrain.data.shards import ShardError
from pretrain.tokenizer import TokenizerError, train_tokenizer

SEQ_LEN = 16


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " + "word " * (i % 17)}) + "\n" for i in range(120)))
    train_tokenizer([corpus], vocab_size=300, out=root / "tok")
    build_shards([corpus], root / "tok", SEQ_LEN, root / "shards", shard_samples=20, progress=False)
    return root


@pytest.fixture
def shards(built, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(built / "shards", copy)
    return copy


def stream(path, **overrides):
    values = dict(paths=(str(path),), weights=(1.0,), seed=1, vocab_size=300, micro_batch_size=1, dp_rank=0,
                  dp_size=1, start_sample=0, doc_mask=False, skip_corrupt=0, allow_pipe=False)
    values.update(overrides)
    return iter(MicroBatches(StreamSpec(**values)))


def read_all(path, count, **overrides):
    iterator = stream(path, **overrides)
    return [next(iterator) for _ in range(count)]


def total_samples(path) -> int:
    return json.loads((path / "manifest.json").read_text())["samples"]


def test_truncated_shard_names_shard_and_sample(shards):
    shard = shards / "shard-000000-00000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match=r"shard .*shard-000000-00000\.tar, sample 00000000000\d{7}: truncated"):
        read_all(shards, total_samples(shards))


def test_truncated_shard_skipped_and_counted_when_allowed(shards):
    shard = shards / "shard-000000-00000.tar"
    size = shard.stat().st_size // 2
    shard.write_bytes(shard.read_bytes()[:size])
    lost = sum(int(offset) + (SEQ_LEN + 1) * 2 > size for offset in np.fromfile(f"{shard}.idx", dtype="<u8"))
    batches = read_all(shards, total_samples(shards), skip_corrupt=100)
    assert 5 <= lost <= 15 and sum(b["corrupt"] for b in batches) == lost
    assert all((b["labels"] == -100).all() for b in batches if b["corrupt"])  # they train on nothing


def test_damaged_token_bytes_are_detected(shards):
    offsets = np.fromfile(shards / "shard-000000-00001.tar.idx", dtype="<u8")
    with open(shards / "shard-000000-00001.tar", "r+b") as f:
        f.seek(int(offsets[3]))
        f.write(b"\xff\xff")
    with pytest.raises(ShardError, match=r"shard-000000-00001\.tar, sample 000000000010000003: token id 65535 is outside"):
        read_all(shards, total_samples(shards))


def test_index_that_does_not_fit_the_shard_is_detected(shards):
    index = shards / "shard-000000-00000.tar.idx"
    index.write_bytes(np.roll(np.fromfile(index, dtype="<u8"), 1).astype("<u8").tobytes())
    with pytest.raises(ShardError, match=r"shard-000000-00000\.tar, sample 000000000000000\d{3}: expected member "
                                         r"000000000000000\d{3}\.tokens, found '000000000000000\d{3}\.tokens' "
                                         r"\(corrupt tar or wrong index\)"):
        read_all(shards, total_samples(shards))


def test_sha256_mismatch_is_an_error_naming_the_file(shards, tmp_path):
    config = load(None, ["data.source=shards", f"data.path={shards}", f"model.seq_len={SEQ_LEN}"])
    info = resolve(config)
    verify_shards(info, rank=0, world_size=1, tolerate=False)  # intact: passes
    with open(shards / "shard-000000-00002.tar", "r+b") as f:
        f.seek(2000)
        f.write(b"x")
    with pytest.raises(ShardError, match=r"shard-000000-00002\.tar does not match the sha256 in its manifest"):
        verify_shards(info, rank=0, world_size=1, tolerate=False)
    (shards / "shard-000000-00003.tar.idx").unlink()
    with pytest.raises(ShardError, match=r"shard-000000-00003\.tar\.idx is missing"):
        verify_shards(info, rank=0, world_size=1, tolerate=False)


def test_seq_len_mismatch_names_both(shards):
    config = load(None, ["data.source=shards", f"data.path={shards}", "model.seq_len=64"])
    with pytest.raises(ShardError, match=r"seq_len 16 but model.seq_len=64: set model.seq_len=16 or rebuild"):
        resolve(config)


def test_tokenizer_differing_from_the_manifest(built, shards, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("completely different text " * 50)
    train_tokenizer([other], vocab_size=280, out=tmp_path / "other_tok")
    config = load(None, ["data.source=shards", f"data.path={shards}", f"model.seq_len={SEQ_LEN}",
                         f"data.tokenizer={tmp_path / 'other_tok'}"])
    with pytest.raises(ShardError, match="is not the tokenizer the shards were built with"):
        resolve(config)
    config.data.tokenizer = str(built / "tok")
    assert resolve(config).tokenizer_sha256 == json.loads((built / "tok" / "card.json").read_text())["sha256"]


def test_tokenizer_model_replaced_behind_its_card(built, tmp_path):
    shutil.copytree(built / "tok", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="does not match the sha256"):
        build_shards([built / "docs.jsonl"], tmp_path / "tok", SEQ_LEN, tmp_path / "out")


def test_vocabulary_from_data_and_too_small_model_vocab(shards):
    config = load(None, ["data.source=shards", f"data.path={shards}", f"model.seq_len={SEQ_LEN}"])
    resolve(config)
    assert config.model.vocab_size == 300
    config = load(None, ["data.source=shards", f"data.path={shards}", f"model.seq_len={SEQ_LEN}",
                         "model.vocab_size=200"])
    with pytest.raises(ShardError, match="model.vocab_size=200 is smaller than the shards' tokenizer vocabulary"):
        resolve(config)


def test_missing_manifest_and_pipe_urls(tmp_path, shards):
    with pytest.raises(ShardError, match="no manifest.json at"):
        resolve(load(None, ["data.source=shards", f"data.path={tmp_path / 'nowhere'}", f"model.seq_len={SEQ_LEN}"]))
    with pytest.raises(ShardError, match="set data.allow_pipe=true"):
        next(stream("pipe:cat " + str(shards)))
    allowed = read_all("pipe:cat " + str(shards), 5, allow_pipe=True)
    url = read_all(f"file://{shards}", 5)
    local = read_all(shards, 5)
    assert all((a["tokens"] == b["tokens"]).all() and (a["tokens"] == c["tokens"]).all()
               for a, b, c in zip(allowed, url, local))


def test_missing_input_fails_before_any_work(built, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"input file\(s\) not found: .*missing\.jsonl"):
        build_shards([built / "docs.jsonl", tmp_path / "missing.jsonl"], built / "tok", SEQ_LEN, out)
    assert not out.exists()
    with pytest.raises(InputError, match="input file"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "tok")


def test_existing_shards_are_never_overwritten(built):
    with pytest.raises(InputError, match="already holds shards"):
        build_shards([built / "docs.jsonl"], built / "tok", SEQ_LEN, built / "shards")


def test_jsonl_without_the_text_field(built, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: no field 'text' \(choose it with --text-field\)"):
        build_shards([bad], built / "tok", SEQ_LEN, tmp_path / "out", progress=False)


def test_vocab_size_beyond_the_corpus(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("abc abc abc")
    with pytest.raises(TokenizerError, match=r"--vocab-size 5000 is more than this corpus yields \(at most \d+\)"):
        train_tokenizer([small], 5000, tmp_path / "tok")


@pytest.mark.multiprocess
def test_cli_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain", "data", "build", "--input", str(tmp_path / "nope.txt"),
                           "--tokenizer", str(tmp_path), "--seq-len", "8", "--out", str(tmp_path / "o")],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "input file(s) not found" in proc.stderr and "Traceback" not in proc.stderr
