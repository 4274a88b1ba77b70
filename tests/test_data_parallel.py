"""Training from shards across processes: TP2 x DP2 and TP2 x PP2 equal one process (document
masking and validation included), and the start-up batch check catches a split by global rank."""

import json

import pytest

from conftest import run_layouts
from pretrain.data.build import build_shards
from pretrain.tokenizer import train_tokenizer
from test_data import random_documents

pytestmark = pytest.mark.multiprocess

STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpdata")
    for name, seed, count in (("train", 1, 400), ("valid", 2, 40)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                    for d in random_documents(count, seed)))
    train_tokenizer([root / "train.jsonl"], vocab_size=300, out=root / "tok")
    for name in ("train", "valid"):
        build_shards([root / f"{name}.jsonl"], root / "tok", 32, root / name, shard_samples=64, progress=False)
    return root


def base(data) -> list[str]:
    return [
        "data.source=shards", f"data.path={data / 'train'}", f"data.valid_path={data / 'valid'}",
        f"data.tokenizer={data / 'tok'}", "data.doc_mask=true", "data.num_workers=1",
        "model.seq_len=32", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=96", "optimizer.lr=3e-3", "optimizer.grad_clip=0.5", "schedule.warmup_steps=2",
        f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "log.interval=1",
        "train.eval_interval=5", "train.eval_steps=2",
    ]


def test_tp2_dp2_from_shards_equals_one_process(data, tmp_path):
    reference = run_layouts(tmp_path / "one", 1, base(data), {"single": []})["single"]
    runs = run_layouts(tmp_path / "four", 4, base(data), {"tp2_dp2": ["parallel.tp=2"],
                                                           "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"]},
                       split_check=["parallel.tp=2"])
    for layout in ("tp2_dp2", "tp2_pp2"):
        run = runs[layout]
        loss_diff = max(abs(run["loss"][s] - reference["loss"][s]) for s in reference["loss"])
        valid_diff = abs(run["valid_loss"][STEPS] - reference["valid_loss"][STEPS])
        print(f"{layout} from shards: max |loss difference| {loss_diff:.3g}, validation {valid_diff:.3g}")
        assert sorted(run["loss"]) == list(range(1, STEPS + 1)) and loss_diff <= 1e-5 and valid_diff <= 1e-5
    assert reference["loss"][STEPS] < reference["loss"][1]

    check = runs["split_check"]
    assert check["by_data_parallel_rank"] == "passed"
    assert "belong to data-parallel rank 0 but received different batches" in check["by_global_rank"]
    assert "split by data-parallel rank, not by global rank" in check["by_global_rank"]
