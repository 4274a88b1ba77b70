"""Tokenizer training, shard building and the loader: round trip, determinism, splits,
resume, blending, document masking."""

import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.build import build_shards
from pretrain.data.loader import (
    IGNORE_INDEX, MicroBatches, StreamSpec, make_batch, micro_batch_loader,
)
from pretrain.data.shards import Manifest
from pretrain.tokenizer import Tokenizer, train_tokenizer

SEQ_LEN, MICRO = 32, 2
WORDS = ["alpha", "beta", "gamma", "delta", "def", "return", "    ", "\n", "x = 1", "12345", "é", "中文", "😀"]


def random_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    documents = random_documents(300, seed=1)
    jsonl = root / "docs.jsonl"
    lines = [json.dumps({"text": d}) for d in documents[:200]] + [json.dumps({"text": ""})]
    jsonl.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n')
    text = root / "one.txt"
    text.write_text(documents[200])
    tokenizer_dir = root / "tokenizer"
    card = train_tokenizer([jsonl, text], vocab_size=360, out=tokenizer_dir)
    shards = root / "shards"
    manifest = build_shards([jsonl, text], tokenizer_dir, SEQ_LEN, shards, shard_samples=40, workers=2, progress=False)
    expected_docs = documents[:200] + ["bad \ufffd byte", documents[200]]
    return dict(root=root, inputs=[jsonl, text], tokenizer=Tokenizer.load(tokenizer_dir), card=card,
                shards=shards, manifest=manifest, documents=expected_docs)


def read_shards_in_order(shards: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    manifest = Manifest.load(shards)
    samples, starts = [], []
    for shard in manifest.shards:
        with tarfile.open(shards / shard["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".tokens")):
            samples.append(np.frombuffer(members[name], dtype=manifest.dtype))
            starts.append(json.loads(members[name.replace(".tokens", ".json")])["doc_starts"])
    return samples, starts


def spec(path, **overrides) -> StreamSpec:
    values = dict(paths=(str(path),), weights=(1.0,), seed=7, vocab_size=360, micro_batch_size=MICRO, dp_rank=0,
                  dp_size=1, start_sample=0, doc_mask=False, skip_corrupt=0, allow_pipe=False)
    values.update(overrides)
    return StreamSpec(**values)


def take(stream_spec: StreamSpec, count: int, workers: int = 0) -> list[torch.Tensor]:
    iterator = iter(micro_batch_loader(stream_spec, workers, pin_memory=False))
    return [next(iterator)["tokens"] for _ in range(count)]


def global_sequence(path, dp: int, micro_batches_per_rank: int, start_sample: int = 0, workers: int = 0):
    """The job's micro-batches in global order, interleaving the ranks (global k -> rank k % dp)."""
    per_rank = [take(spec(path, dp_rank=r, dp_size=dp, start_sample=start_sample), micro_batches_per_rank, workers)
                for r in range(dp)]
    return [per_rank[k % dp][k // dp] for k in range(dp * micro_batches_per_rank)]


def test_tokenizer_card_and_special_ids(corpus):
    card, tokenizer = corpus["card"], corpus["tokenizer"]
    assert card["vocab_size"] == 360 and card["special_ids"] == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert card["empty_documents_skipped"] == 1 and card["invalid_utf8_replaced"] == 1
    listing = (tokenizer.path / "tokenizer.vocab").read_text().split("\n")[:-1]
    assert len(listing) == 360 and listing[2].split("\t")[1] == "</s>"
    text = "    def f(x):\n\treturn 12345  # é 中文 😀\n\n"
    assert tokenizer.decode(tokenizer.encode([text])[0]) == text  # lossless, whitespace kept
    assert tokenizer.encode([]) == [] and tokenizer.encode(["", " "]) == [[], tokenizer.processor.encode(" ")]


def fuzz_texts(count: int, seed: int) -> list[str]:
    """Strings that stress word splitting: runs of spaces, literal \u2581, tabs, newlines, digits,
    other scripts, emoji, special-token text."""
    rng = random.Random(seed)
    atoms = [" ", "  ", "    ", "\u2581", " \u2581 ", "\t", "\n", "\n\n", "\r\n", "x", "def", "return", "é", "中文",
             "😀", "12345", "</s>", "<s>", "\u3000", "\u00a0", "_", "(", "):", "#", "self.value"]
    return ["".join(rng.choice(atoms) for _ in range(rng.randint(0, 40))) for _ in range(count)]


def stdlib_code(count: int) -> list[str]:
    import sysconfig

    return [path.read_text(encoding="utf-8") for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:count]]


@pytest.mark.parametrize("whitespace_runs", [True, False])
def test_word_cache_gives_sentencepiece_ids(whitespace_runs, corpus, tmp_path):
    """Tokenizer.encode memoises words and their parts; its ids must be sentencepiece's, on code and on fuzz."""
    import io

    import sentencepiece as spm

    from pretrain.tokenizer import WordCache

    code = stdlib_code(60)
    texts = code + fuzz_texts(3000, seed=whitespace_runs) + corpus["documents"]
    if whitespace_runs:  # our trainer's settings, through Tokenizer.load
        tokenizer = corpus["tokenizer"]
        assert tokenizer.word_cache is not None
    else:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(code), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=False, minloglevel=2)
        processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
        tokenizer = Tokenizer(tmp_path, {}, processor, WordCache.for_model(model.getvalue(), processor))
    expected = tokenizer.processor.encode(texts, num_threads=1)
    assert tokenizer.encode(texts) == expected
    assert tokenizer.encode(texts) == expected  # again, from the filled cache


def test_word_cache_is_exact_on_its_rare_paths(corpus):
    """New words holding every control character (no separator left to cut them at seams: they are
    encoded whole), and characters beyond the class table (sharing a class that is never a seam)."""
    from pretrain.tokenizer import _WORD_END, WordCache, _adjacency

    tokenizer = corpus["tokenizer"]
    model = (tokenizer.path / "tokenizer.model").read_bytes()
    texts = stdlib_code(5) + fuzz_texts(500, seed=3)
    expected = tokenizer.processor.encode(texts, num_threads=1)

    whole_words = Tokenizer(tokenizer.path, tokenizer.card, tokenizer.processor,
                            WordCache.for_model(model, tokenizer.processor))
    controls = "".join(map(chr, range(32)))
    assert whole_words.encode([controls] + texts) == [tokenizer.processor.encode(controls)] + expected
    assert whole_words.word_cache.part_ids == {"": _WORD_END}  # no word was cut into parts

    few_classes = WordCache.for_model(model, tokenizer.processor)
    few_classes.char_class, few_classes.adjacent = _adjacency(tokenizer.processor, classes=8)
    assert (few_classes.char_class == len(few_classes.adjacent) - 1).sum() > 10  # characters in the shared class
    assert Tokenizer(tokenizer.path, tokenizer.card, tokenizer.processor, few_classes).encode(texts) == expected


def test_word_cache_is_off_where_words_are_not_independent(corpus):
    import io

    import sentencepiece as spm

    from pretrain.tokenizer import WordCache

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus["documents"]), model_writer=model, vocab_size=100,
                                   model_type="bpe", minloglevel=2)  # defaults: NFKC, dummy prefix
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert WordCache.for_model(model.getvalue(), processor) is None
    texts = corpus["documents"][:20] + ["", "  x"]
    assert Tokenizer(corpus["root"], {}, processor, None).encode(texts) == processor.encode(texts)  # plain sentencepiece


def test_half_surrogate_pairs_in_json_are_replaced_and_counted(tmp_path):
    from pretrain.data.documents import DocumentStats, iter_documents

    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "emoji cut \\ud83d here"}\n{"text": "whole \\ud83d\\ude00 pair"}\n')
    stats = DocumentStats()
    assert list(iter_documents([path], stats=stats)) == ["emoji cut \ufffd here", "whole \U0001f600 pair"]
    assert stats.invalid_utf8_replaced == 1


def test_build_round_trip_gives_back_the_documents(corpus):
    manifest, tokenizer = corpus["manifest"], corpus["tokenizer"]
    samples, starts = read_shards_in_order(corpus["shards"])
    stream = np.concatenate(samples)
    expected = [ids + [tokenizer.eos_id] for ids in tokenizer.encode(corpus["documents"])]
    flat = np.concatenate([np.asarray(ids) for ids in expected])
    assert np.array_equal(stream[:len(flat)], flat)
    assert (stream[len(flat):] == tokenizer.pad_id).all() and len(stream) - len(flat) < SEQ_LEN + 1
    # each sample's document starts are exactly where the documents begin
    boundaries = np.cumsum([0] + [len(ids) for ids in expected])[:-1]
    recorded = [i * (SEQ_LEN + 1) + s for i, sample_starts in enumerate(starts) for s in sample_starts]
    assert recorded == boundaries.tolist()
    assert manifest["documents"] == 202 and manifest["tokens"] == len(flat)
    assert manifest["empty_documents_skipped"] == 1 and manifest["invalid_utf8_replaced"] == 1
    assert all(s["samples"] == 40 for s in manifest["shards"][:-1]) and manifest["shards"][-1]["samples"] <= 40
    assert manifest["dtype"] == "uint16" and manifest["seq_len"] == SEQ_LEN


def test_same_input_gives_identical_bytes(corpus, tmp_path):
    again = tmp_path / "again"
    build_shards(corpus["inputs"], corpus["tokenizer"].path, SEQ_LEN, again, shard_samples=40, workers=1,
                 progress=False)
    produced = sorted(str(p.relative_to(again)) for p in again.rglob("*") if p.is_file())
    assert produced == sorted(str(p.relative_to(corpus["shards"])) for p in corpus["shards"].rglob("*") if p.is_file())
    assert "tokenizer/tokenizer.model" in produced  # the shards carry their tokenizer
    for name in produced:
        assert (again / name).read_bytes() == (corpus["shards"] / name).read_bytes(), name


def test_same_sequence_for_any_number_of_workers(corpus):
    reference = take(spec(corpus["shards"]), 25, workers=0)
    for workers in (1, 2, 4):
        assert all(torch.equal(a, b) for a, b in zip(reference, take(spec(corpus["shards"]), 25, workers)))


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_sample_once_per_epoch_with_equal_counts(corpus, dp):
    samples, _ = read_shards_in_order(corpus["shards"])
    total = len(samples)
    per_rank = total // (MICRO * dp)  # whole global micro-batches in one epoch
    epoch = global_sequence(corpus["shards"], dp, per_rank)
    seen = sorted(tuple(row) for batch in epoch for row in torch.as_tensor(batch).tolist())
    labels_seen = len(seen)
    everything = sorted(tuple(s[:-1].tolist()) for s in samples)
    assert labels_seen == per_rank * dp * MICRO
    # no sample twice, and every sample seen (up to the < MICRO*dp left for the next epoch)
    assert len(set(seen)) == len(seen) and set(seen) <= set(everything)
    assert len(everything) - len(seen) < MICRO * dp


def test_order_depends_on_seed_and_epoch(corpus):
    first_epoch = take(spec(corpus["shards"]), 3)
    other_seed = take(spec(corpus["shards"], seed=8), 3)
    total = sum(s["samples"] for s in corpus["manifest"]["shards"])
    first_sample = take(spec(corpus["shards"], micro_batch_size=1), 1)[0]
    next_epoch = take(spec(corpus["shards"], micro_batch_size=1, start_sample=total), 1)[0]
    assert not torch.equal(first_epoch[0], other_seed[0])
    assert torch.equal(first_sample[0], first_epoch[0][0]) and not torch.equal(first_sample, next_epoch)


def test_resume_at_cut_points_continues_identically(corpus):
    total = sum(s["samples"] for s in corpus["manifest"]["shards"])
    uninterrupted = global_sequence(corpus["shards"], 2, 120)  # 480 samples: crosses the epoch end
    rng = random.Random(3)
    cuts = [rng.randrange(1, 60) * 2, (total // (2 * MICRO) - 1) * 2, rng.randrange(60, 110) * 2]  # in global micro-batches
    for index, cut in enumerate(cuts):
        workers = 2 if index == 1 else 0  # one resume with another worker count
        resumed = global_sequence(corpus["shards"], 2, 120 - cut // 2, start_sample=cut * MICRO, workers=workers)
        assert all(torch.equal(a, b) for a, b in zip(uninterrupted[cut:], resumed)), f"cut at {cut}"
    assert any(cut * MICRO < total < (cut + 20) * MICRO for cut in cuts)  # one cut sits just before the epoch end


def test_elastic_resume_from_two_to_four_ranks(corpus):
    single = global_sequence(corpus["shards"], 1, 80)
    before = global_sequence(corpus["shards"], 2, 20)
    after = global_sequence(corpus["shards"], 4, 10, start_sample=40 * MICRO)
    assert all(torch.equal(a, b) for a, b in zip(single, before + after))


def test_blending_follows_the_weights(corpus, tmp_path):
    other = tmp_path / "other"
    build_shards([corpus["inputs"][1]], corpus["tokenizer"].path, SEQ_LEN, other, shard_samples=5, progress=False)
    blended = spec(corpus["shards"], paths=(str(corpus["shards"]), str(other)), weights=(3.0, 1.0),
                   micro_batch_size=1)
    other_samples = {tuple(s[:-1].tolist()) for s in read_shards_in_order(other)[0]}
    drawn = [tuple(t[0].tolist()) for t in take(blended, 400)]
    from_other = sum(sample in other_samples for sample in drawn)
    assert 90 <= from_other <= 110  # 1/4 of 400, spread evenly
    assert drawn == [tuple(t[0].tolist()) for t in take(blended, 400, workers=2)]


def test_document_positions_and_mask():
    eos, pad = 2, 3
    sample = np.array([[10, 11, eos, 20, 21, 22, eos, 30, pad, pad]])
    batch = make_batch(sample, eos, pad, doc_mask=True)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch["labels"].tolist() == [[11, eos, 20, 21, 22, eos, 30, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["document_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 3, 3]]  # what attention stays within


def test_doc_mask_makes_documents_independent(corpus):
    from pretrain import parallel
    from pretrain.model.args import LlamaArgs
    from pretrain.model.llama import Llama

    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        args = LlamaArgs(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48)
        model = Llama(args, context.tp_group)
        model.init_weights(seed=0)
        first, second = [5, 6, 7, 2], [8, 9, 10, 11, 12]
        batch = make_batch(np.array([first + second + [13]]), eos_id=2, pad_id=3, doc_mask=True)
        packed = model(batch["tokens"], batch["position_ids"], batch["document_ids"])
        alone = model(torch.tensor([second]))
        assert (packed[0, 4:] - alone[0]).abs().max() < 1e-5
    finally:
        parallel.shutdown()


def test_micro_batches_is_reiterable_from_its_state(corpus):
    stream = MicroBatches(spec(corpus["shards"], start_sample=10))
    assert torch.equal(next(iter(stream))["tokens"], next(iter(stream))["tokens"])


@pytest.mark.multiprocess
def test_cli_tokenizer_and_build_from_parquet(tmp_path):
    import subprocess
    import sys

    import pyarrow
    import pyarrow.parquet

    from conftest import child_env

    documents = random_documents(120, seed=4)
    pyarrow.parquet.write_table(pyarrow.table({"body": documents}), tmp_path / "docs.parquet")

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "pretrain", *map(str, args)], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = cli("tokenizer", "train", "--input", "docs.parquet", "--text-field", "body", "--vocab-size", 320,
              "--special", "<tool>", "<think>")
    assert "tokenizer written to tokenizers/bpe-320" in out  # the default home of tokenizers
    card = json.loads((tmp_path / "tokenizers/bpe-320/card.json").read_text())
    assert card["special_ids"]["<tool>"] == 4 and card["special_ids"]["<think>"] == 5
    tokenizer = Tokenizer.load(tmp_path / "tokenizers/bpe-320")
    assert 4 not in tokenizer.encode(["<tool>"])[0]  # control symbols are never produced from text
    cli("data", "build", "--input", "docs.parquet", "--text-field", "body", "--tokenizer", "tokenizers/bpe-320",
        "--seq-len", 16, "--out", "shards", "--workers", 2)
    manifest = json.loads((tmp_path / "shards/manifest.json").read_text())
    assert manifest["documents"] == 120 and manifest["inputs"][0]["documents"] == 120


def test_word_cache_starts_afresh_when_full(corpus):
    from pretrain.tokenizer import WordCache

    processor = corpus["tokenizer"].processor
    cache = WordCache.for_model((corpus["tokenizer"].path / "tokenizer.model").read_bytes(), processor)
    cache.limit = 50
    for text in corpus["documents"][:40]:
        ids, lengths = cache.encode([text])
        assert ids.tolist() == processor.encode(text) and lengths.tolist() == [len(ids)]
        assert len(cache.word_ids) <= max(50, len(set(cache.words.findall(text))))


def test_hf_export_refuses_a_tokenizer_with_other_settings(corpus, tmp_path):
    """A Llama-2-style sentencepiece model (NFKC, dummy prefix) would not export exactly."""
    import io

    import sentencepiece as spm

    from pretrain.tokenizer import TokenizerError, describe_model

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus["documents"]), model_writer=model, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    (tmp_path / "src.model").write_bytes(model.getvalue())
    describe_model(tmp_path / "src.model", tmp_path / "tok", source="test")
    with pytest.raises(TokenizerError, match="normalization_rule_name=identity, add_dummy_prefix=false, "
                                             "remove_extra_whitespaces=false"):
        Tokenizer.load(tmp_path / "tok").export_hf(tmp_path / "hf", 64)
    assert not (tmp_path / "hf").exists()
