"""Tensor- and data-parallel training equals one process: same initial weights (seeded per
parameter), same global batch, accumulation >= 2, clipping active, per-step loss within 1e-5."""

import pytest

from conftest import run_layouts

STEPS = 6
# vocab 300 pads to 384 rows at TP1 and to 512 at TP2: the padding must not change the loss.
BASE = [
    "data.source=synthetic", "model.vocab_size=300", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
    "model.num_kv_heads=2", "model.ffn_hidden_size=96", "model.seq_len=32",
    "optimizer.lr=3e-3", "optimizer.grad_clip=0.5", "schedule.warmup_steps=2",
    f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "log.interval=1",
]
LOSS_TOLERANCE = 1e-5
GRAD_NORM_RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict[int, float]]:
    """One process, 4 micro-batches per step."""
    return run_layouts(tmp_path_factory.mktemp("ref"), 1, BASE, {"single": ["optimizer.zero_stage=0"]})["single"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> dict[str, dict[str, dict[int, float]]]:
    return run_layouts(tmp_path_factory.mktemp("two"), 2, BASE, {
        "tp2": ["parallel.tp=2", "optimizer.zero_stage=1"],
        **{f"dp2_zero{stage}": [f"optimizer.zero_stage={stage}", "optimizer.zero3_param_persistence_threshold=0"]
           for stage in range(4)},
    })


def test_reference_learns_with_clipping_active(reference):
    losses = reference["loss"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.1
    assert max(reference["grad_norm"].values()) > 0.5  # above optimizer.grad_clip: clipping changes updates


@pytest.mark.parametrize("layout", ["tp2", "dp2_zero0", "dp2_zero1", "dp2_zero2", "dp2_zero3"])
def test_layout_matches_one_process(layout, reference, two_process_runs):
    run = two_process_runs[layout]
    assert sorted(run["loss"]) == sorted(reference["loss"])
    loss_diff = max(abs(run["loss"][s] - reference["loss"][s]) for s in reference["loss"])
    norm_diff = max(abs(run["grad_norm"][s] / reference["grad_norm"][s] - 1) for s in reference["grad_norm"])
    print(f"{layout}: max |loss difference| {loss_diff:.3g}, max relative grad-norm difference {norm_diff:.3g}")
    assert loss_diff <= LOSS_TOLERANCE
    assert norm_diff <= GRAD_NORM_RELATIVE_TOLERANCE
