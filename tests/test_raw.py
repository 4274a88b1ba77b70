"""data.source=raw: text shards tokenized and packed while training."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import ROOT, launch
from pretrain.data.raw import RawSpec, RawState, TokenizedShards, raw_batches, raw_shard_files
from pretrain.data.shards import ShardError
from pretrain.tokenizer import Tokenizer, train_tokenizer
from test_data import random_documents

SEQ_LEN, MICRO = 24, 2


def write_text_shard(path, documents: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for index, text in enumerate(documents):
            payload = text.encode()
            info = tarfile.TarInfo(f"{index:06d}.txt")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    documents = random_documents(240, seed=9)
    (root / "text").mkdir()
    for shard in range(6):
        write_text_shard(root / "text" / f"part-{shard:03d}.tar", documents[shard * 40:(shard + 1) * 40])
    (root / "all.txt").write_text("\n".join(documents))
    train_tokenizer([root / "all.txt"], vocab_size=300, out=root / "tok")
    return root


def spec(raw, dp_rank=0, dp_size=1) -> RawSpec:
    return RawSpec(tuple(raw_shard_files(str(raw / "text"))), str(raw / "tok"), SEQ_LEN, 5, dp_rank, dp_size, 0)


def take(raw, count, workers=0, state=RawState(), dp_rank=0, dp_size=1):
    stream = raw_batches(spec(raw, dp_rank, dp_size), state, MICRO, workers, doc_mask=False)
    return [next(stream) for _ in range(count)]


def test_same_sequence_for_any_number_of_workers(raw):
    reference = [b["tokens"] for b in take(raw, 40)]
    for workers in (1, 2):
        assert all(torch.equal(a, b["tokens"]) for a, b in zip(reference, take(raw, 40, workers)))


def test_packing_gives_back_each_shards_documents(raw):
    tokenizer = Tokenizer.load(raw / "tok")
    shards = TokenizedShards(spec(raw))
    first = shards.shard_at(0)
    with tarfile.open(first) as tar:
        texts = [tar.extractfile(m).read().decode() for m in tar]
    expected = np.concatenate([ids + [tokenizer.eos_id] for ids in tokenizer.encode(texts)])
    samples_in_first = -(-len(expected) // (SEQ_LEN + 1))
    batches = take(raw, -(-samples_in_first // MICRO))
    rows = [np.concatenate([b["tokens"][i].numpy(), b["labels"][i, -1:].numpy()]) for b in batches for i in range(MICRO)]
    stream = np.concatenate(rows[:samples_in_first])
    assert np.array_equal(stream[:len(expected)], expected)
    assert (batches[-1]["labels"] == -100).any() or samples_in_first % MICRO == 0  # padded end of the shard


def test_ranks_read_disjoint_shards_and_all_of_them_each_epoch(raw):
    for dp in (1, 2, 3):
        per_epoch = 6 // dp
        seen = [TokenizedShards(spec(raw, r, dp)).shard_at(i) for r in range(dp) for i in range(per_epoch)]
        assert sorted(seen) == raw_shard_files(str(raw / "text"))
    epoch0 = [TokenizedShards(spec(raw)).shard_at(i) for i in range(6)]
    epoch1 = [TokenizedShards(spec(raw)).shard_at(i) for i in range(6, 12)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_resume_from_any_batch_state(raw):
    uninterrupted = take(raw, 120)  # several shards and past the first epoch
    for cut in (1, 17, 59, 101):
        resumed = take(raw, 10, workers=2 if cut == 59 else 0, state=uninterrupted[cut - 1]["state"])
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(uninterrupted[cut:cut + 10], resumed)), cut


def test_too_few_shards_for_the_ranks(raw):
    with pytest.raises(ShardError, match="needs at least one shard per data-parallel rank: 6 shards for 8 ranks"):
        take(raw, 1, dp_size=8)


def test_damaged_raw_shard_is_named(raw, tmp_path):
    (tmp_path / "text").mkdir()
    good = (raw / "text" / "part-000.tar").read_bytes()
    (tmp_path / "text" / "a.tar").write_bytes(good[:1000] + b"\x13" * 600 + good[1600:])
    stream = raw_batches(RawSpec((str(tmp_path / "text" / "a.tar"),), str(raw / "tok"), SEQ_LEN, 5, 0, 1, 0),
                         RawState(), MICRO, 0, doc_mask=False)
    with pytest.raises(ShardError, match=r"raw shard .*a\.tar cannot be read"):
        next(stream)


@pytest.mark.multiprocess
def test_training_from_raw_text(raw, tmp_path):
    launch(1, "-m", "pretrain", "train", "--config", str(ROOT / "configs/tiny.yaml"), "data.source=raw",
           f"data.path={raw / 'text'}", f"data.tokenizer={raw / 'tok'}", "model.vocab_size=0",
           f"model.seq_len={SEQ_LEN}", "train.max_steps=20", "log.interval=10", f"log.dir={tmp_path}",
           "data.num_workers=1")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["group"] == "train"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert "vocab_size: 300" in (tmp_path / "config.yaml").read_text()


def test_data_benchmark_runs_and_reports_every_figure(raw, tmp_path):
    from pretrain.bench.data import run

    result = run([str(raw / "all.txt")], tmp_path, seq_len=SEQ_LEN, vocab_size=300, seconds=0.05)
    rates = result["tokens_per_sec_one_core"]
    assert set(rates) == {"webdataset_raw_iteration", "loader", "loader_doc_mask", "sentencepiece_encode",
                          "on_the_fly_raw"}
    assert all(rate > 0 for rate in rates.values())
    assert result["loader_vs_raw_iteration"] == round(rates["loader"] / rates["webdataset_raw_iteration"], 2)
