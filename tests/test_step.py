"""The training step: no host synchronisation on non-log steps (ZeRO-1/2, fp32 and bf16, TP2,
PP2, compiled blocks), and DeepSpeed's bf16 path on CPU training like fp32 at TP2 and PP2."""

import json

import pytest

from conftest import TESTS, launch, run_layouts

pytestmark = pytest.mark.multiprocess

BASE = [
    "data.source=synthetic", "model.vocab_size=300", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.ffn_hidden_size=96", "model.seq_len=32", "optimizer.lr=3e-3",
    "optimizer.grad_clip=0.5", "schedule.warmup_steps=2", "train.micro_batch_size=2", "train.global_batch_size=8",
]
BF16_STEPS = 20
BF16_RELATIVE_TOLERANCE = 0.02
TP2, PP2 = ["parallel.tp=2", "optimizer.zero_stage=1"], ["parallel.pp=2", "optimizer.zero_stage=1"]
BF16 = ["train.precision=bf16"]


def test_no_host_synchronisation_in_non_log_steps(tmp_path):
    runs = {"dp2_zero1_fp32": ["optimizer.zero_stage=1"],
            "dp2_zero2_bf16": ["optimizer.zero_stage=2", *BF16],
            "tp2_zero1_bf16_compiled": [*TP2, *BF16, "model.compile=true"],
            "pp2_zero1_bf16": [*PP2, *BF16],
            "zero0_control": ["optimizer.zero_stage=0"]}  # checks its loss on the host every step (update.StopOnNonFinite)
    spec, out = tmp_path / "spec.json", tmp_path / "sites.json"
    base = BASE + ["train.max_steps=8", "log.interval=4", f"log.dir={tmp_path / 'log'}"]
    spec.write_text(json.dumps({"base": base, "runs": runs}))
    launch(2, str(TESTS / "sync_count.py"), str(spec), str(out))
    sites = json.loads(out.read_text())
    control = sites.pop("zero0_control")
    assert all(any("step_finished" in site for site in rank) for rank in control)  # the count sees syncs
    assert set(sites) == set(runs) - {"zero0_control"}
    assert all(ranks == [[], []] for ranks in sites.values()), json.dumps(sites, indent=1)


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory) -> dict:
    base = BASE + [f"train.max_steps={BF16_STEPS}", "log.interval=1"]
    return run_layouts(tmp_path_factory.mktemp("bf16"), 2, base, {
        "tp2_fp32": TP2, "tp2_bf16": TP2 + BF16, "pp2_fp32": PP2, "pp2_bf16": PP2 + BF16})


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_bf16_on_cpu_trains_within_2_percent_of_fp32(layout, bf16_runs):
    fp32, bf16 = bf16_runs[f"{layout}_fp32"]["loss"], bf16_runs[f"{layout}_bf16"]["loss"]
    assert sorted(bf16) == list(range(1, BF16_STEPS + 1))
    worst = max(abs(bf16[step] / fp32[step] - 1) for step in fp32)
    print(f"{layout}: bf16 losses within {100 * worst:.2f}% of fp32 over {BF16_STEPS} steps "
          f"({fp32[1]:.3f} -> {fp32[BF16_STEPS]:.3f})")
    assert worst <= BF16_RELATIVE_TOLERANCE
    assert fp32[BF16_STEPS] < fp32[1] - 0.5  # the comparison is over a falling loss
