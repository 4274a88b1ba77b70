"""Mixture of experts (pretrain.model.moe): the grouped path (one matmul per expert on CPU, and
torch._grouped_mm, which also runs on CPU in fp32) against a naive loop over tokens, outputs,
router losses and every gradient; the parameter names; config refusals; configs/moe-tiny.yaml
training in one process and at DP2 (ZeRO-1 and 2) with the same per-step losses, the router
losses in the metrics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, run_layouts
from pretrain import parallel
from pretrain.config import ConfigError, load, validate
from pretrain.model import moe as moe_module
from pretrain.model.args import LlamaArgs, MoEArgs
from pretrain.model.llama import Llama
from pretrain.model.moe import MoE
from pretrain.model.weights import parameter_names

TOKENS, HIDDEN, EXPERT_FFN = 40, 32, 48


def naive(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, aux loss and z-loss computed token by token, expert by expert, in token order (the
    capacity keeps each expert's first pairs in that order)."""
    args, flat = layer.args, x.reshape(-1, x.shape[-1])
    logits = (flat @ layer.router.weight.t()).float()
    probabilities = logits.softmax(-1)
    capacity = math.ceil(args.capacity_factor * flat.shape[0] * args.top_k / args.num_experts) \
        if args.capacity_factor else flat.shape[0] * args.top_k
    taken, routed, rows = [0] * args.num_experts, [0] * args.num_experts, []
    for token in range(flat.shape[0]):
        weights, chosen = torch.topk(probabilities[token], args.top_k)
        if args.renormalize:
            weights = weights / weights.sum()
        out = torch.zeros_like(flat[token])
        for weight, expert in zip(weights, chosen.tolist()):
            routed[expert] += 1
            if taken[expert] < capacity:
                taken[expert] += 1
                experts = layer.experts
                hidden = F.silu(experts.gate_proj[expert] @ flat[token]) * (experts.up_proj[expert] @ flat[token])
                out = out + weight * (experts.down_proj[expert] @ hidden)
        rows.append(out)
    share = torch.tensor(routed, dtype=torch.float32) / sum(routed)
    aux = args.aux_loss_coeff * args.num_experts * (share * probabilities.mean(0)).sum()
    z = args.z_loss_coeff * torch.logsumexp(logits, -1).square().mean()
    return torch.stack(rows).view_as(x), aux, z


def moe_layer(args: MoEArgs) -> MoE:
    torch.manual_seed(0)
    layer = MoE(args, HIDDEN, shared=None)
    with torch.no_grad():  # outputs and gradients of order 1, logits spread enough that no top-k nearly ties
        for name, param in layer.named_parameters():
            param.normal_(0.0, 0.5 if name == "router.weight" else 0.1)
    return layer


def gradients(layer: MoE, x: torch.Tensor, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The outputs of `compute(layer, x)` and the gradients of a fixed random function of them."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out, aux, z = compute(layer, x)
    probe = 0.2 * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))  # gradients of order 1
    ((out * probe).sum() + aux + z).backward()
    return torch.cat([out.detach().flatten(), aux.detach()[None], z.detach()[None]]), \
        [x.grad] + [p.grad.clone() for p in layer.parameters()]


def grouped(layer: MoE, x: torch.Tensor):
    out = layer(x)
    return out, layer.aux_loss, layer.z_loss


@pytest.mark.parametrize("grouped_mm", [False, True], ids=["loop", "grouped_mm"])
@pytest.mark.parametrize("settings", [
    dict(num_experts=8, top_k=2),
    dict(num_experts=8, top_k=3, renormalize=False),
    dict(num_experts=6, top_k=2, capacity_factor=1.0),  # drops pairs
], ids=["top2", "top3-not-renormalised", "capacity-1.0"])
def test_grouped_path_equals_a_loop_over_tokens(settings, grouped_mm, monkeypatch):
    monkeypatch.setattr(moe_module, "use_grouped_mm", lambda x: grouped_mm)
    args = MoEArgs(expert_ffn_hidden_size=EXPERT_FFN, aux_loss_coeff=0.01, z_loss_coeff=0.001, **settings)
    layer = moe_layer(args)
    x = torch.randn(2, TOKENS // 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    values, grads = gradients(layer, x, grouped)
    expected_values, expected_grads = gradients(layer, x, naive)
    value_diff = (values - expected_values).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(grads, expected_grads))
    print(f"{settings} grouped_mm={grouped_mm}: max |output/loss diff| {value_diff:.3g}, max |grad diff| {grad_diff:.3g}")
    assert value_diff <= 1e-6 and grad_diff <= 1e-6
    if settings.get("capacity_factor"):  # some pairs were dropped: fewer than tokens x top_k rows computed
        logits = layer.router(x.reshape(-1, HIDDEN)).float()
        assert moe_module.Routing(logits, args).token.numel() < TOKENS * args.top_k


def test_a_moe_model_names_its_parameters_as_the_checkpoints_do():
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        args = LlamaArgs(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                         moe=MoEArgs(num_experts=4, top_k=2, expert_ffn_hidden_size=16, shared_experts=1,
                                     first_dense_layers=1))
        model = Llama(args, context.tp_group)
        model.init_weights(seed=1)
        names = [name for name, _ in model.named_parameters()]
        assert names == parameter_names(args)
        assert sum(p.numel() for p in model.parameters()) == args.num_params()  # vocabulary 128: no padding
        assert "layers.0.mlp.gate_proj.weight" in names and "layers.1.mlp.experts.down_proj" in names
        experts = model.layers[1].mlp.experts
        assert experts.gate_proj.shape == (4, 16, 32) and experts.down_proj.shape == (4, 32, 16)
        assert 0.02 / 6**0.5 / 1.3 < experts.down_proj.std().item() < 0.02 / 6**0.5 * 1.3  # scaled like down_proj
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("override, named", [
    ("model.moe.top_k=9", "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    ("model.moe.expert_ffn_hidden_size=0", "model.moe.expert_ffn_hidden_size=0 must be at least 1"),
    ("model.moe.first_dense_layers=4", "model.moe.first_dense_layers=4 must be in [0, model.num_layers=4)"),
    ("model.moe.aux_loss_coeff=-1", "model.moe.aux_loss_coeff=-1.0 must be >= 0"),
    ("model.moe.capacity_factor=0.2", "model.moe.capacity_factor=0.2 with top_k=2 would drop most tokens"),
    ("parallel.tp=2", "cannot be combined with parallel.tp=2 yet"),
    ("optimizer.zero_stage=3", "model.moe cannot be combined with optimizer.zero_stage=3"),
    ("optimizer.name=muon", "model.moe cannot be combined with optimizer.name=muon yet"),
])
def test_moe_settings_are_checked_by_name(override, named):
    config = load(ROOT / "configs" / "moe-tiny.yaml", [override])
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(config, 2)


@pytest.mark.multiprocess
def test_moe_tiny_trains_alike_in_one_process_and_at_dp2(tmp_path):
    """configs/moe-tiny.yaml, 2 micro-batches a step on each of 2 replicas or 4 in one process: the
    router losses are per micro-batch, so every layout has the same losses."""
    base = ["train.max_steps=5", "log.interval=1", "train.global_batch_size=8", "train.micro_batch_size=2",
            "optimizer.grad_clip=0.5"]
    config = str(ROOT / "configs" / "moe-tiny.yaml")
    single = run_layouts(tmp_path / "one", 1, base, {"single": ["optimizer.zero_stage=0"]}, config=config)["single"]
    layouts = run_layouts(tmp_path / "two", 2, base, {f"dp2_zero{stage}": [f"optimizer.zero_stage={stage}"]
                                                      for stage in (1, 2)}, config=config)
    records = [json.loads(line) for line in (tmp_path / "one" / "single" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["group"] == "train"]
    assert len(train_records) == 5 and all(r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0 for r in train_records)
    assert single["loss"][5] < single["loss"][1]
    for name, run in layouts.items():
        diff = max(abs(run["loss"][step] - single["loss"][step]) for step in range(1, 6))
        print(f"{name} vs one process: max |loss diff| over 5 steps {diff:.3g}")
        assert diff <= 1e-5
