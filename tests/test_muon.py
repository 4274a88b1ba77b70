"""Muon and the z-loss: the update of a TP-sharded, ZeRO-partitioned matrix is the whole matrix's
(TP2 and TP4 with sequence parallelism, ZeRO-0/1/2, PP2, TP2 x DP2, TP2 x CP2, matrices straddling
partitions: per-step losses within 1e-5 of TP1), the fused qkv is orthogonalised as q, k and v (against Newton-Schulz on the unfused
matrices), a skipped update changes nothing, resumes are bitwise or refused, `pretrain plan`
counts Muon's memory and Newton-Schulz FLOPs, and the z-loss equals its direct computation."""

import json
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import GENERATE_SEQ, free_port, run_layouts
from memory_check import check as engine_memory
from pretrain import parallel, plan
from pretrain.checkpoint import CheckpointError
from pretrain.config import ConfigError, OptimizerConfig, OptimizerName, load, validate
from pretrain.convert.reshard import reshard
from pretrain.data import stream
from pretrain.model.args import LlamaArgs
from pretrain.model.llama import Llama
from pretrain.model.loss import linear_cross_entropy
from pretrain.muon import Partition, Placed, Matrix, newton_schulz
from pretrain.optim import build_optimizer
from pretrain.train import Trainer
from test_parity import assert_matches

STEPS = 5
# 3 layers: the Muon group's ZeRO partitions at DP2 and DP4 end inside matrices. Clipping is active.
BASE = [
    "data.source=synthetic", "model.vocab_size=300", "model.hidden_size=64", "model.num_layers=3",
    "model.num_heads=8", "model.num_kv_heads=4", "model.ffn_hidden_size=96", "model.seq_len=32", "model.z_loss=1e-3",
    "optimizer.name=muon", "optimizer.muon_ns_dtype=fp32", "train.precision=fp32", "optimizer.lr=1e-2",
    "optimizer.grad_clip=0.5", "schedule.warmup_steps=2", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
    "train.global_batch_size=8", "log.interval=1",
]
TP2, ZERO1 = ["parallel.tp=2"], ["optimizer.zero_stage=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, generate_data) -> dict:
    """One launch of 2 processes, one of 4; `tp1` (DP2, ZeRO-0, whole matrices everywhere) is the
    reference. `*_valid` train on shards and validate."""
    tmp = tmp_path_factory.mktemp("muon")
    valid = ["data.source=shards", f"data.path={generate_data / 'train'}", f"data.valid_path={generate_data / 'valid'}",
             "data.num_workers=0", "model.vocab_size=0", f"model.seq_len={GENERATE_SEQ}",
             f"train.eval_interval={STEPS}", "train.eval_steps=2"]
    two = {"tp1": ["optimizer.zero_stage=0"], "zero1": ZERO1 + [f"checkpoint.dir={tmp / 'dp2'}"],
           "zero2": ["optimizer.zero_stage=2"], "tp2": TP2 + ZERO1, "pp2": ["parallel.pp=2"] + ZERO1,
           "nan": ZERO1 + ["debug.inject_nan_steps=[3]"], "dp2_valid": ZERO1 + valid,
           "pp2_valid": ["parallel.pp=2"] + ZERO1 + valid}
    four = {"tp4": ["parallel.tp=4"] + ZERO1, "tp2_dp2_zero2": TP2 + ["optimizer.zero_stage=2"],
            "dp4_zero2": ["optimizer.zero_stage=2"], "tp2_cp2": TP2 + ["parallel.cp=2"] + ZERO1,
            "full": TP2 + ZERO1 + [f"checkpoint.dir={tmp / 'full'}", "checkpoint.interval=2"],
            "resumed": TP2 + ZERO1 + [f"checkpoint.dir={tmp / 'resumed'}",
                                      f"checkpoint.resume={tmp / 'full' / 'step_00000002'}"]}
    results = run_layouts(tmp, 2, BASE, two) | run_layouts(tmp, 4, BASE, four)
    return {"tmp": tmp, **results}


@pytest.mark.parametrize("layout", ["tp2", "tp4", "zero1", "zero2", "pp2", "tp2_dp2_zero2", "dp4_zero2", "tp2_cp2"])
def test_muon_matches_tp1_per_step(layout, runs):
    reference = runs["tp1"]
    assert reference["loss"][STEPS] < reference["loss"][1] - 0.2  # it learns
    assert max(reference["grad_norm"].values()) > 0.5  # above optimizer.grad_clip
    assert_matches(layout, runs[layout], reference)


def records(log_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines())
            if r["group"] == "train"}


def test_z_loss_is_logged_alike_at_every_layout(runs):
    logged = {name: records(runs["tmp"] / name) for name in ("tp1", "tp2", "tp4", "pp2", "tp2_cp2")}
    for step in range(1, STEPS + 1):
        z = [rows[step]["z_loss"] for rows in logged.values()]
        assert z[0] > 1e-3 and max(z) - min(z) <= 1e-6 * z[0], (step, z)  # log(Z)^2 > 1 at the start


def test_pipeline_validates_with_the_z_loss_on(runs):
    """Evaluation through the pipeline engine with the z-loss reported (and left out of valid/loss)."""
    pipeline, plain = runs["pp2_valid"]["valid_loss"][STEPS], runs["dp2_valid"]["valid_loss"][STEPS]
    assert math.isfinite(plain) and abs(pipeline - plain) <= 1e-5, (pipeline, plain)


def test_resume_is_bitwise(runs):
    full, resumed = runs["full"]["loss"], runs["resumed"]["loss"]
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert all(resumed[step] == full[step] for step in resumed), (resumed, full)


def test_a_non_finite_update_is_skipped(runs):
    nan, clean = runs["nan"], runs["zero1"]
    assert nan["loss"][2] == clean["loss"][2] and math.isnan(nan["loss"][3])
    assert all(math.isfinite(nan["loss"][step]) for step in (4, 5)) and nan["loss"][5] < nan["loss"][1]
    assert records(runs["tmp"] / "nan")[STEPS]["skipped_steps"] == 1


@contextmanager
def one_process():
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        yield context
    finally:
        parallel.shutdown()


def test_resume_at_another_data_parallel_size_or_optimizer_is_refused(runs):
    """The DP2 checkpoint in one process, with Muon and with AdamW."""
    tmp = runs["tmp"]
    for name, message in (("adamw", "was trained with optimizer.name=muon; this run has optimizer.name=adamw"),
                          ("muon", "carries Adam's moments but not Muon's momentum")):
        config = load(None, BASE + ZERO1 + [f"optimizer.name={name}", f"log.dir={tmp / name}",
                                            f"checkpoint.dir={tmp / f'{name}_ckpt'}",
                                            f"checkpoint.resume={tmp / 'dp2' / f'step_{STEPS:08d}'}"])
        with one_process() as context, pytest.raises(CheckpointError, match=message):
            Trainer(config, validate(config, 1), context, stream.resolve(config))
    with pytest.raises(CheckpointError, match="carries Adam's moments but not Muon's momentum"):
        reshard(runs["tmp"] / "dp2", runs["tmp"] / "resharded", tp=1, pp=1)


def test_settings_muon_cannot_work_with_are_refused():
    for overrides, message in ((["optimizer.zero_stage=3"], "ZeRO-3 cuts every matrix"),
                               (["optimizer.zero_stage=0", "train.precision=auto"], "needs train.precision=fp32"),
                               (["optimizer.muon_ns_coefficients=[1.0,2.0]"], "must be three finite numbers")):
        with pytest.raises(ConfigError, match=message):
            validate(load(None, BASE + overrides), 1)


ARGS = LlamaArgs(vocab_size=300, hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=2, ffn_hidden_size=96)


def muon(model: Llama, context, momentum: float = 0.95, ns_dtype: torch.dtype = torch.float32):
    config = OptimizerConfig(name=OptimizerName.muon, lr=1.0, weight_decay=0.0, muon_momentum=momentum)
    return build_optimizer(model, config, ARGS, context.tp_group, ns_dtype)


def with_gradients(model: Llama, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def polar_update(gradient: torch.Tensor) -> torch.Tensor:
    """Muon's update of one logical matrix, directly: Newton-Schulz, scaled to RMS 0.2."""
    return newton_schulz(gradient, 5, (3.4445, -4.7750, 2.0315), torch.float64) * 0.2 * math.sqrt(max(gradient.shape))


def test_fused_qkv_is_orthogonalised_as_q_k_and_v():
    """One step (lr 1, no momentum, no decay) against Muon on the unfused q/k/v, o, gate, up, down."""
    with one_process() as context:
        model = Llama(ARGS, context.tp_group)
        model.init_weights(seed=0)
        optimizer = muon(model, context, momentum=0.0, ns_dtype=torch.float64)
        before = with_gradients(model, seed=1)
        grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        optimizer.step()
    update = {name: before[name] - param.detach() for name, param in model.named_parameters()}
    # group-major rows: for KV group g, its 4 query heads, then key g, then value g (8 rows each)
    rows = torch.arange(ARGS.num_kv_heads * 6 * 8).view(ARGS.num_kv_heads, 6, 8)
    q, k, v = rows[:, :4].flatten(), rows[:, 4].flatten(), rows[:, 5].flatten()
    qkv_name = "layers.0.attention.qkv_proj.weight"
    expected = torch.empty_like(grads[qkv_name])
    for part in (q, k, v):
        expected[part] = polar_update(grads[qkv_name][part])
    assert (update[qkv_name] - expected).abs().max() < 1e-6
    assert (update[qkv_name] - polar_update(grads[qkv_name])).abs().max() > 1e-2  # not one fused block
    for name in ("attention.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        name = f"layers.0.{name}.weight"
        assert (update[name] - polar_update(grads[name])).abs().max() < 1e-6, name
    for name in ("embedding.weight", "output.weight", "final_norm.weight"):  # AdamW's first step: lr x sign
        assert (update[name].abs() - 1).abs().max() < 1e-3, name


def test_newton_schulz_approaches_u_v_transposed():
    generator = torch.Generator().manual_seed(0)
    for shape in ((32, 80), (80, 32)):
        u, _ = torch.linalg.qr(torch.randn(shape[0], 32, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], 32, generator=generator, dtype=torch.float64))
        matrix = u @ torch.diag(torch.linspace(0.05, 3.0, 32, dtype=torch.float64)) @ v.T
        classic = newton_schulz(matrix, 40, (15 / 8, -10 / 8, 3 / 8), torch.float64)  # converges to U V^T
        assert (classic - u @ v.T).abs().max() < 1e-9
        singular = torch.linalg.svdvals(newton_schulz(matrix.float(), 5, (3.4445, -4.7750, 2.0315), torch.float32))
        assert 0.6 < singular.min() and singular.max() < 1.25  # Muon's quintic: fast, roughly orthogonal


def test_a_skipped_step_changes_nothing_and_grad_scale_divides():
    with one_process() as context:
        models = [Llama(ARGS, context.tp_group) for _ in range(2)]
        optimizers = [muon(model, context) for model in models]
        for model, optimizer in zip(models, optimizers):
            model.init_weights(seed=0)
            with_gradients(model, seed=1)
            optimizer.step()
        halved, scaled = models
        with_gradients(scaled, seed=2)
        for target, source in zip(halved.parameters(), scaled.parameters()):
            target.grad = source.grad / 2
        optimizers[1].grad_scale, optimizers[1].found_inf = torch.tensor(2.0), torch.tensor(0.0)
        for optimizer in optimizers:
            optimizer.step()
        for a, b in zip(halved.parameters(), scaled.parameters()):
            assert torch.equal(a, b)
        state = {name: [t.clone() for t in optimizers[1].state[param].values()] for name, param in
                 scaled.named_parameters()}
        weights = with_gradients(scaled, seed=3)
        for param in scaled.parameters():
            param.grad[0] = float("nan")
        optimizers[1].found_inf = torch.tensor(1.0)
        optimizers[1].step()
        for name, param in scaled.named_parameters():
            assert torch.equal(param, weights[name]), name
            assert all(torch.equal(a, b) for a, b in zip(optimizers[1].state[param].values(), state[name])), name


class Ranks:
    """A stand-in process group: only its size and this rank."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_partitions_rebuild_matrices_that_span_several_ranks():
    """Matrices of 14, 40, 6 and 20 elements in 4 partitions of 20: the second spans three ranks.
    The all_to_all is played here from the send and receive tables of every rank."""
    shapes = [(2, 7), (5, 8), (3, 2), (4, 5)]
    placed, offset = [], 0
    for shape in shapes:
        placed.append(Placed(Matrix(0), offset, torch.Size(shape)))
        offset += math.prod(shape)
    flat = torch.arange(float(offset))
    partitions = [Partition(placed, 20, Ranks(4, rank)) for rank in range(4)]
    for rank, mine in enumerate(partitions):
        assert [b - a for a, b in (other.sends[rank] for other in partitions)] == mine.receives
        received = torch.cat([flat[slice(*other.sends[rank])] for other in partitions if other is not mine])
        before = max(mine.start - mine.window[0], 0)
        own = flat[mine.start:mine.end]
        for matrix in mine.touched:
            shard = mine.shard(own, received[:before], received[before:], matrix)
            assert torch.equal(shard, flat[matrix.offset:matrix.end]), (rank, matrix.offset)
    assert [len(p.touched) for p in partitions] == [2, 1, 2, 1] and partitions[1].window == (14, 54)


def test_plan_counts_the_newton_schulz_flops_of_a_step():
    with one_process() as context:
        model = Llama(ARGS, context.tp_group)
        optimizer = muon(model, context)
        with_gradients(model, seed=1)
        with FlopCounterMode(display=False) as counter:
            optimizer.step()
    tensors = plan.stage_tensors(ARGS, 1, 1)[0]
    predicted = plan.muon_work(tensors, ARGS, dp=1, zero_stage=0, steps=5).flops
    print(f"Newton-Schulz FLOPs: planned {predicted:,.0f}, counted {counter.get_total_flops():,}")
    assert predicted == counter.get_total_flops()


@pytest.mark.parametrize("overrides", [["optimizer.zero_stage=0"], ZERO1 + ["train.precision=bf16"],
                                       ["optimizer.zero_stage=2"]], ids=["zero0", "zero1_bf16", "zero2"])
def test_plan_memory_equals_what_the_engine_holds(overrides, tmp_path):
    """One process: Muon's momentum beside the fp32 master weights, no step counter (2% as in test_plan)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        result = engine_memory(load(None, BASE + [f"log.dir={tmp_path}", "train.max_steps=2", *overrides]))
    finally:
        dist.destroy_process_group()
    for category in ("weights", "gradients", "optimizer"):
        predicted, measured = result["predicted"][category], result["measured"][category]
        print(f"{category}: predicted {predicted:,} measured {measured:,}")
        assert abs(predicted - measured) <= 0.02 * measured


@pytest.mark.parametrize("chunk_tokens", [7, 64])
def test_z_loss_equals_its_direct_computation(chunk_tokens):
    """Loss, z-loss part and gradients against cross-entropy + z_loss x logsumexp^2 of the full logits
    (padded vocabulary rows excluded, ignored labels), and the cross-entropy alone without gradients."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 10, 16, generator=generator, requires_grad=True)
    weight = torch.randn(40, 16, generator=generator).mul_(0.5).requires_grad_()  # 40 rows: 36 + padding
    labels = torch.randint(0, 36, (3, 10), generator=generator)
    labels[0, :4] = -100
    with one_process() as context:
        loss, z_part = linear_cross_entropy(hidden, labels, weight, 36, context.tp_group, chunk_tokens, z_loss=0.01)
        grads = torch.autograd.grad(loss, (hidden, weight))
        with torch.no_grad():
            plain, no_z = linear_cross_entropy(hidden, labels, weight, 36, context.tp_group, chunk_tokens, z_loss=0.01)
    logits = (hidden @ weight.T)[..., :36].reshape(-1, 36)
    valid = labels.reshape(-1) != -100
    cross_entropy = F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    z_direct = 0.01 * logits.logsumexp(-1)[valid].square().mean()
    expected = torch.autograd.grad(cross_entropy + z_direct, (hidden, weight))
    assert abs(loss.item() - (cross_entropy + z_direct).item()) < 1e-5 and abs(z_part.item() - z_direct.item()) < 1e-6
    assert z_direct.item() > 0.05 and not z_part.requires_grad
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(grads, expected))
    assert abs(plain.item() - cross_entropy.item()) < 1e-5 and no_z.item() == 0.0
