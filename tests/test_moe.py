"""Mixture of experts (pretrain.model.moe): the grouped path (one matmul per expert on CPU, and
torch._grouped_mm, which also runs on CPU in fp32) against a naive loop over tokens, outputs,
router losses and every gradient; the parameter names; config refusals; configs/moe-tiny.yaml
training in one process and at DP2 (ZeRO-1 and 2) with the same per-step losses, the router
losses in the metrics; Hugging Face: a trained model exported as Qwen3MoeForCausalLM, and
Qwen3-MoE and Mixtral models saved by transformers imported and exported bit for bit, each with
transformers' logits equal to ours; the combinations no architecture holds refused by name."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, hf_check, run_layouts
from pretrain import parallel
from pretrain.cli import main as cli
from pretrain.config import ConfigError, load, validate
from pretrain.convert.hf_export import export
from pretrain.model import moe as moe_module
from pretrain.model.args import LlamaArgs, MoEArgs, RouterScoring
from pretrain.model.hf import UnsupportedModelError, architecture
from pretrain.model.llama import Llama
from pretrain.model.moe import MoE
from pretrain.model.weights import parameter_names
from reference import single_process_model

TOKENS, HIDDEN, EXPERT_FFN = 40, 32, 48


def naive(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, aux loss and z-loss computed token by token, expert by expert, in token order (the
    capacity keeps each expert's first pairs in that order)."""
    args, flat = layer.args, x.reshape(-1, x.shape[-1])
    logits = (flat @ layer.router.weight.t()).float()
    scores = logits.softmax(-1) if args.scoring == RouterScoring.softmax else logits.sigmoid()
    probabilities = scores / scores.sum(-1, keepdim=True)
    capacity = math.ceil(args.capacity_factor * flat.shape[0] * args.top_k / args.num_experts) \
        if args.capacity_factor else flat.shape[0] * args.top_k
    taken, routed, rows = [0] * args.num_experts, [0] * args.num_experts, []
    for token in range(flat.shape[0]):
        weights, chosen = torch.topk(scores[token], args.top_k)
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
    dict(num_experts=8, top_k=2, scoring=RouterScoring.sigmoid),
], ids=["top2", "top3-not-renormalised", "capacity-1.0", "sigmoid"])
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


def test_expert_load_records_the_balance_and_warns_of_idle_experts(tmp_path, capsys):
    from pretrain.expert_load import ExpertLoad
    from pretrain.metrics import MetricsWriter

    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        args = LlamaArgs(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                         moe=MoEArgs(num_experts=4, top_k=2, expert_ffn_hidden_size=16, first_dense_layers=1))
        model = Llama(args, context.tp_group)
        metrics = MetricsWriter(tmp_path, 10, enabled=True)
        load = ExpertLoad(model, metrics, context.replica_group, context.pp_group, 4, idle_intervals=2, warns=True)
        for step in (1, 2):
            model.layers[1].mlp.load.copy_(torch.tensor([5, 3, 0, 0, 2]))  # pairs per expert, then dropped
            load.write(step)
        metrics.close()
    finally:
        parallel.shutdown()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 2, "group": "moe", "layer1/max_over_mean": 2.5, "layer1/dropped": 0.25,
                           "layer1/aux_loss": 0.0, "layer1/z_loss": 0.0}  # no training pass recorded
    out = capsys.readouterr().out
    assert "step 2: expert 2 of block 1 received no token in the last 2 log intervals" in out
    assert "expert 3 of block 1" in out and "step 1:" not in out


@pytest.mark.parametrize("override, named", [
    ("model.moe.top_k=9", "model.moe.top_k=9 must be between 1 and model.moe.num_experts=8"),
    ("model.moe.expert_ffn_hidden_size=0", "model.moe.expert_ffn_hidden_size=0 must be at least 1"),
    ("model.moe.first_dense_layers=4", "model.moe.first_dense_layers=4 must be in [0, model.num_layers=4)"),
    ("model.moe.aux_loss_coeff=-1", "model.moe.aux_loss_coeff=-1.0 must be >= 0"),
    ("model.moe.capacity_factor=0.2", "model.moe.capacity_factor=0.2 with top_k=2 would drop most tokens"),
    ("parallel.tp=2 model.moe.capacity_factor=1.0", "cannot be combined with sequence parallelism yet"),
    ("parallel.pp=2 parallel.ep=2", "parallel.ep=2 cannot be combined with parallel.pp=2 yet"),
    ("optimizer.zero_stage=3", "model.moe cannot be combined with optimizer.zero_stage=3"),
    ("optimizer.name=muon", "model.moe cannot be combined with optimizer.name=muon yet"),
    ("model.moe.bias_update_rate=-1", "model.moe.bias_update_rate=-1.0 must be >= 0"),
    ("parallel.ep=3", "parallel.ep=3 needs a mixture of experts whose model.moe.num_experts (8) it divides"),
    ("parallel.ep=4", "parallel.ep=4 must divide the data-parallel size (2)"),
    ("parallel.tp=2 parallel.ep=2", "parallel.ep=2 must divide the data-parallel size (1)"),
    ("parallel.ep=2 optimizer.zero_stage=0", "parallel.ep=2 needs optimizer.zero_stage 1 or 2 (not 0)"),
])
def test_moe_settings_are_checked_by_name(override, named):
    config = load(ROOT / "configs" / "moe-tiny.yaml", override.split())
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(config, 2)


def test_expert_parallelism_composes_with_tensor_parallelism_at_config_load():
    """EP2 x TP2 over 4 processes validates (each TP rank's 2 data-parallel ranks form its expert group)."""
    layout = validate(load(ROOT / "configs" / "moe-tiny.yaml", ["parallel.ep=2", "parallel.tp=2"]), 4)
    assert (layout.ep, layout.tp, layout.dp) == (2, 2, 2)


MOE_TINY = str(ROOT / "configs" / "moe-tiny.yaml")
EXPORTABLE = ["model.moe.shared_experts=0"]  # Qwen3-MoE has none
EP2_TP2 = ["parallel.ep=2", "parallel.tp=2"]  # expert-parallel groups of the same TP rank: ranks {0, 2} and {1, 3}
BALANCED = ["model.moe.scoring=sigmoid", "model.moe.bias_update_rate=0.05", "model.moe.aux_loss_coeff=0"]


@pytest.fixture(scope="module")
def moe_runs(generate_data, tmp_path_factory) -> dict:
    """configs/moe-tiny.yaml on conftest's shards for 5 steps of 4 micro-batches, validated at the end:
    in one process; at DP2 and EP2 with ZeRO-1 and 2, TP2 with and without sequence parallelism
    (experts whole on each rank, shared experts TP-sharded), and at DP2 without shared experts with
    checkpoints every 2 steps (to export), then resumed from step 2, and likewise at EP2 with ZeRO-2 (one
    launch); at EP4, EP2 x expert-DP2 and EP2 x TP2 without sequence parallelism (each with checkpoints,
    then resumed from step 2), EP2 x TP2 with it, and the DP2 checkpoint resumed at DP4 (one launch of 4)."""
    root, data = tmp_path_factory.mktemp("moe"), generate_data
    base = [f"data.path={data / 'train'}", f"data.valid_path={data / 'valid'}", "data.num_workers=0",
            "data.source=shards", "model.vocab_size=0", "model.seq_len=32", "train.max_steps=5", "log.interval=1",
            "train.global_batch_size=8", "train.micro_batch_size=2", "optimizer.grad_clip=0.5",
            "train.eval_interval=5", "train.eval_steps=2"]
    runs = run_layouts(root / "one", 1, base, {"single": ["optimizer.zero_stage=0"],
                                               **{f"{precision}_20": [f"train.precision={precision}", "train.max_steps=20",
                                                                      "train.eval_interval=20"]
                                                  for precision in ("fp32", "bf16")}}, config=MOE_TINY)
    runs |= run_layouts(root / "two", 2, base, {
        **{f"dp2_zero{stage}": [f"optimizer.zero_stage={stage}"] for stage in (1, 2)},
        **{f"ep2_zero{stage}": [f"optimizer.zero_stage={stage}", "parallel.ep=2"] for stage in (1, 2)},
        "tp2": ["parallel.tp=2", "parallel.sequence_parallel=false"],
        "tp2_sp": ["parallel.tp=2"],
        "pp2": ["parallel.pp=2"],  # 4 micro-batches in flight per step over 2 stages
        "exportable": EXPORTABLE + [f"checkpoint.dir={root / 'checkpoint'}", "checkpoint.interval=2",
                                    "checkpoint.keep_last=0"],
        "resumed": EXPORTABLE + [f"checkpoint.dir={root / 'resumed'}",
                                 f"checkpoint.resume={root / 'checkpoint' / 'step_00000002'}"],
        "balanced": BALANCED + [f"checkpoint.dir={root / 'balanced'}", "checkpoint.interval=2", "checkpoint.keep_last=0"],
        "ep2_saved": EXPORTABLE + ["parallel.ep=2", "optimizer.zero_stage=2", f"checkpoint.dir={root / 'ep2'}",
                                   "checkpoint.interval=2", "checkpoint.keep_last=0"],
        "ep2_resumed": EXPORTABLE + ["parallel.ep=2", "optimizer.zero_stage=2", f"checkpoint.dir={root / 'ep2_resumed'}",
                                     f"checkpoint.resume={root / 'ep2' / 'step_00000002'}"],
        "balanced_resumed": BALANCED + [f"checkpoint.dir={root / 'balanced_resumed'}",
                                        f"checkpoint.resume={root / 'balanced' / 'step_00000002'}"]}, config=MOE_TINY)
    runs |= run_layouts(root / "four", 4, base, {
        "ep4": ["parallel.ep=4"],
        "ep2_dp4": ["parallel.ep=2", f"checkpoint.dir={root / 'ep2_dp4'}", "checkpoint.interval=2", "checkpoint.keep_last=0"],
        "ep2_dp4_resumed": ["parallel.ep=2", f"checkpoint.dir={root / 'ep2_dp4_resumed'}",
                            f"checkpoint.resume={root / 'ep2_dp4' / 'step_00000002'}"],
        "ep2_tp2": EP2_TP2 + ["parallel.sequence_parallel=false", f"checkpoint.dir={root / 'ep2_tp2'}",
                              "checkpoint.interval=2", "checkpoint.keep_last=0"],
        "ep2_tp2_resumed": EP2_TP2 + ["parallel.sequence_parallel=false", f"checkpoint.dir={root / 'ep2_tp2_resumed'}",
                                      f"checkpoint.resume={root / 'ep2_tp2' / 'step_00000002'}"],
        "ep2_tp2_sp": EP2_TP2,
        "resumed_dp4": EXPORTABLE + [f"checkpoint.dir={root / 'resumed_dp4'}",
                                     f"checkpoint.resume={root / 'checkpoint' / 'step_00000002'}"]}, config=MOE_TINY)
    return {"runs": runs, "root": root}


@pytest.mark.multiprocess
def test_moe_tiny_trains_alike_in_one_process_and_at_dp2(moe_runs):
    """4 micro-batches a step in one process, 2 on each of 2 replicas, 1 on each of 4: the router losses
    are per micro-batch, so every layout, expert-parallel ones included, routes alike (the per-block
    load records are equal) and has the same losses and gradient norms."""
    runs, root = moe_runs["runs"], moe_runs["root"]
    single = runs["single"]
    records = [json.loads(line) for line in (root / "one" / "single" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["group"] == "train"]
    assert len(train_records) == 5 and all(r["moe_aux_loss"] > 0 and r["moe_z_loss"] > 0 for r in train_records)
    load_records = [r for r in records if r["group"] == "moe"]  # blocks 1-3 have experts (first_dense_layers=1)
    assert len(load_records) == 5 and all(r.keys() >= {"layer1/max_over_mean", "layer3/dropped"} for r in load_records)
    assert all(r["layer1/max_over_mean"] >= 1 and r["layer1/dropped"] == 0 for r in load_records)  # dropless
    for train, load in zip(train_records, load_records):  # log.interval=1: the blocks' losses add up to the step's
        for part in ("aux_loss", "z_loss"):
            per_block = [load[f"layer{i}/{part}"] for i in (1, 2, 3)]
            assert min(per_block) > 0 and abs(sum(per_block) / train[f"moe_{part}"] - 1) <= 1e-5, (part, per_block)
    assert single["loss"][5] < single["loss"][1]
    folders = {"one": ["single"], "two": ["dp2_zero1", "dp2_zero2", "ep2_zero1", "ep2_zero2", "tp2", "tp2_sp", "pp2"],
               "four": ["ep4", "ep2_dp4", "ep2_tp2", "ep2_tp2_sp"]}
    for launch, names in folders.items():
        for name in names:  # the busiest expert's pairs (integers, summed over the ranks) agree at every step
            logged = [json.loads(line) for line in (root / launch / name / "metrics.jsonl").read_text().splitlines()]
            theirs = [r for r in logged if r["group"] == "moe"]
            assert [{k: v for k, v in r.items() if "loss" not in k} for r in theirs] == \
                [{k: v for k, v in r.items() if "loss" not in k} for r in load_records], name
            assert all(abs(a[k] / b[k] - 1) <= 1e-5 for a, b in zip(theirs, load_records) for k in a if "loss" in k)
            for part in ("moe_aux_loss", "moe_z_loss"):  # the router losses too
                theirs = [r[part] for r in logged if r["group"] == "train"]
                assert max(abs(a / b - 1) for a, b in zip(theirs, [r[part] for r in train_records])) <= 1e-5, name
    for name in ("dp2_zero1", "dp2_zero2", "ep2_zero1", "ep2_zero2", "ep4", "ep2_dp4", "ep2_tp2", "ep2_tp2_sp", "tp2",
                 "tp2_sp", "pp2"):
        diff = max(abs(runs[name]["loss"][step] - single["loss"][step]) for step in range(1, 6))
        norm_diff = max(abs(runs[name]["grad_norm"][step] / single["grad_norm"][step] - 1) for step in range(1, 6))
        valid_diff = abs(runs[name]["valid_loss"][5] - single["valid_loss"][5])
        print(f"{name} vs one process: max |loss diff| over 5 steps {diff:.3g}, grad norm relative {norm_diff:.3g}, "
              f"validation loss {valid_diff:.3g}")
        assert diff <= 1e-5 and norm_diff <= 1e-4 and valid_diff <= 1e-5


@pytest.mark.multiprocess
def test_a_moe_run_resumes_at_another_data_parallel_size(moe_runs):
    """The DP2 checkpoint of step 2 resumed at DP4: the same losses up to the order of the sums."""
    runs = moe_runs["runs"]
    diff = max(abs(runs["resumed_dp4"]["loss"][step] - runs["exportable"]["loss"][step]) for step in (3, 4, 5))
    print(f"DP2 -> DP4 resume: max |loss diff| over steps 3-5 {diff:.3g}")
    assert sorted(runs["resumed_dp4"]["loss"]) == [3, 4, 5] and diff <= 1e-5


@pytest.mark.multiprocess
def test_bf16_moe_trains_within_2_percent_of_fp32(moe_runs):
    """20 steps (ZeRO-1): DeepSpeed's bf16 weights, the routers' softmax in fp32."""
    fp32, bf16 = moe_runs["runs"]["fp32_20"], moe_runs["runs"]["bf16_20"]
    relative = max(abs(bf16["loss"][step] / fp32["loss"][step] - 1) for step in range(1, 21))
    valid = abs(bf16["valid_loss"][20] / fp32["valid_loss"][20] - 1)
    print(f"bf16 vs fp32 over 20 steps: max relative loss difference {relative:.3g}, validation {valid:.3g}")
    assert relative <= 0.02 and valid <= 0.02 and fp32["loss"][20] < fp32["loss"][1] - 0.5


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["exportable", "balanced", "ep2_saved", "ep2_dp4", "ep2_tp2"])
def test_a_moe_run_resumes_bit_for_bit(name, moe_runs, tmp_path, capsys):
    """Softmax routing, sigmoid routing with aux-loss-free balancing (its biases restored), and expert
    parallelism, EP2, EP2 x expert-DP2 and EP2 x TP2 (each expert-parallel rank's experts restored from its
    own file, which TP rank 0 of the rank's first expert-data-parallel group wrote)."""
    from pretrain.convert.reader import CheckpointReader

    runs = moe_runs["runs"]
    resumed = runs[{"exportable": "resumed", "balanced": "balanced_resumed", "ep2_saved": "ep2_resumed",
                    "ep2_dp4": "ep2_dp4_resumed", "ep2_tp2": "ep2_tp2_resumed"}[name]]
    assert sorted(resumed["loss"]) == [3, 4, 5]
    assert all(resumed["loss"][step] == runs[name]["loss"][step] for step in (3, 4, 5))
    assert resumed["valid_loss"][5] == runs[name]["valid_loss"][5]
    if name == "balanced":  # the biases moved (one step of 0.05 up or down per optimizer step) and were saved
        assert cli(["convert", "reshard", "--checkpoint", str(moe_runs["root"] / name), "--tp", "1", "--pp", "1",
                    "--out", str(tmp_path / "resharded")]) == 1
        assert "does not carry the routers' balancing biases yet" in capsys.readouterr().err
        reader = CheckpointReader(moe_runs["root"] / name)  # the last step
        module = torch.load(reader.path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        biases = torch.stack([module[f"layers.{i}.mlp.router_bias_steps"] for i in (1, 2, 3)])
        assert reader.step == 5 and biases.abs().max() >= 1
        from pretrain.inference import load_model  # pretrain generate/eval restore them too

        try:
            model = load_model(reader, torch.device("cpu"), torch.float32)
            assert all(torch.equal(model.layers[i].mlp.router_bias_steps, biases[i - 1]) for i in (1, 2, 3))
        finally:
            parallel.shutdown()


@pytest.mark.multiprocess
def test_an_expert_parallel_checkpoint_exports_like_a_data_parallel_one(moe_runs, tmp_path, capsys):
    """`convert to-hf` of the EP2 checkpoint of step 2 assembles whole expert tensors from the experts
    files: the export of the DP2 run's checkpoint of the same step, up to the order of the sums; the
    marker lists the experts files, the trust check reads them; `convert reshard` refuses it by name."""
    import shutil

    from safetensors.torch import load_file

    from pretrain.checkpoint import CheckpointError, experts_file, read_marker, verify_files

    root = moe_runs["root"]
    step = root / "ep2" / "step_00000002"
    marker = read_marker(step)
    assert marker["layout"]["ep"] == 2 and {experts_file(0), experts_file(1)} <= marker["files"].keys()
    shutil.copytree(step, tmp_path / "tampered")
    class Code:
        def __reduce__(self):
            return exec, ("",)

    torch.save({"layers.1.mlp.experts.gate_proj": Code()}, tmp_path / "tampered" / experts_file(1))
    with pytest.raises(CheckpointError, match=rf"{experts_file(1)} holds more than tensors and settings \(exec\)"):
        verify_files(tmp_path / "tampered")
    for name, folder in (("ep2", step), ("dp2", root / "checkpoint" / "step_00000002")):
        export(folder, tmp_path / name, dtype="fp32", tokenizer="none")
    ep2, dp2 = (load_file(tmp_path / name / "model.safetensors") for name in ("ep2", "dp2"))
    assert ep2.keys() == dp2.keys() and all(ep2[k].shape == dp2[k].shape for k in ep2)
    diff = max((ep2[k] - dp2[k]).abs().max().item() for k in ep2)
    print(f"EP2 vs DP2 export after 2 steps: max |tensor diff| {diff:.3g} over {len(ep2)} tensors")
    assert diff <= 1e-5
    assert cli(["convert", "reshard", "--checkpoint", str(step), "--tp", "1", "--pp", "1",
                "--out", str(tmp_path / "resharded")]) == 1
    assert "was saved with parallel.ep=2: resharding does not handle expert-parallel checkpoints" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_an_ep2_tp2_checkpoint_reads_like_an_ep2_expert_dp2_one(moe_runs):
    """The reader joins EP2 x TP2's experts files and TP shards into the tensors the EP2 x expert-DP2
    run saved at step 2, up to the order of the sums."""
    from pretrain.convert.reader import CheckpointReader

    ep2_tp2, ep2_dp4 = (CheckpointReader(moe_runs["root"] / name / "step_00000002") for name in ("ep2_tp2", "ep2_dp4"))
    assert ep2_tp2.layout["tp"] == 2 and ep2_tp2.names() == ep2_dp4.names()
    diff = max((ep2_tp2.tensor(name) - ep2_dp4.tensor(name)).abs().max().item() for name in ep2_tp2.names())
    print(f"EP2 x TP2 vs EP2 x expert-DP2 checkpoint after 2 steps: max |tensor diff| {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("saved, current, named", [
    (dict(dp=2, ep=2), dict(dp=2, ep=1), "resume with parallel.ep=2 and 2 processes"),
    (dict(dp=2, ep=2), dict(dp=4, ep=2), "resume with parallel.ep=2 and 2 processes"),
    (dict(dp=2, ep=1), dict(dp=2, ep=2), "resume with parallel.ep=1 and 2 processes"),
    (dict(tp=2, dp=2, ep=2), dict(dp=2, ep=2), "parallel.tp=2 parallel.pp=1; this run has parallel.tp=1 parallel.pp=1. "
                                               "Resume with the saved sizes, or start from its weights alone"),
])
def test_an_expert_parallel_resume_in_another_layout_is_refused_by_name(saved, current, named, tmp_path):
    from pretrain.checkpoint import CheckpointError, layout_record
    from pretrain.checkpointer import check_layout
    from pretrain.config import OptimizerConfig

    with pytest.raises(CheckpointError, match=named):
        check_layout(tmp_path, layout_record(**{"tp": 1, "pp": 1} | saved), layout_record(**{"tp": 1, "pp": 1} | current),
                     OptimizerConfig())


def transformers_moe(kind: str, folder) -> None:
    """A small Qwen3-MoE (top-k weights not renormalised, a dense first block) or Mixtral with random
    weights, saved by transformers."""
    import transformers

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=32, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **shape, num_experts=4, moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0]))
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**shape, num_local_experts=4))
    torch.manual_seed(0)
    with torch.no_grad():  # routers spread enough that no top-k nearly ties
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5 if name.endswith("gate.weight") else 0.1)
    model.save_pretrained(folder)


def ours(checkpoint, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Our single-process model with the checkpoint's weights: its logits of `tokens`, and the 6 tokens
    it decodes greedily (with the KV cache) after the first 8 of tokens[0], up to EOS (2)."""
    from pretrain.generate import ModelDecoder, Sampling, generate

    with single_process_model(checkpoint) as (model, reader), torch.no_grad():
        logits = model(tokens)[..., : reader.args.vocab_size]
        return logits, generate(ModelDecoder(model), [tokens[0, :8].tolist()], Sampling(max_new_tokens=6), 2, 0)[0]


@pytest.mark.multiprocess
def test_hugging_face_exports_and_imports_of_mixtures_of_experts(moe_runs, tmp_path):
    """Logits within 1e-5 of transformers' (fp32) and the same greedy generation, for the trained model
    exported and for the two imported ones; import -> export bit for bit."""
    from safetensors.torch import load_file

    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    exported = tmp_path / "trained"
    export(moe_runs["root"] / "checkpoint", exported, dtype="fp32", tokenizer="none")
    checks = {"trained": (exported, moe_runs["root"] / "checkpoint")}
    for kind in ("qwen3_moe", "mixtral"):
        transformers_moe(kind, tmp_path / kind)
        assert cli(["convert", "from-hf", "--model", str(tmp_path / kind), "--out", str(tmp_path / f"{kind}-ours")]) == 0
        export(tmp_path / f"{kind}-ours", tmp_path / f"{kind}-again", dtype="fp32", tokenizer="none")
        first, second = (load_file(tmp_path / name / "model.safetensors") for name in (kind, f"{kind}-again"))
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), kind
        checks[kind] = (tmp_path / kind, tmp_path / f"{kind}-ours")
    specs = [{"model": str(folder), "logits_tokens": tokens.tolist(), "loss_batches": []} for folder, _ in checks.values()]
    results = dict(zip(checks, hf_check(specs, tmp_path)))
    assert [results[name]["class"] for name in checks] == ["Qwen3MoeForCausalLM"] * 2 + ["MixtralForCausalLM"]
    for name, (_, checkpoint) in checks.items():
        logits, generated = ours(checkpoint, tokens)
        diff = (logits - results[name]["logits"]).abs().max().item()
        print(f"{name}: max |logit diff| against {results[name]['class']} {diff:.3g}, greedy {generated}")
        assert diff <= 1e-5
        theirs = results[name]["generated"][0, 8:].tolist()
        assert generated == (theirs[:theirs.index(2)] if 2 in theirs else theirs), name


@pytest.mark.multiprocess
@pytest.mark.parametrize("name, folder", [("exportable", "checkpoint"), ("balanced", "balanced"), ("ep2_saved", "ep2"),
                                          ("ep2_tp2", "ep2_tp2")])
def test_pretrain_eval_of_a_moe_checkpoint_gives_the_trainers_validation_loss(name, folder, moe_runs, generate_data,
                                                                              tmp_path):
    """Softmax routing, aux-loss-free biases, and expert-parallel checkpoints (experts joined by the reader);
    `pretrain generate` completes from each."""
    from pretrain.generate import Sampling
    from pretrain.inference import run_eval, run_generate

    result = run_eval(str(moe_runs["root"] / folder), None, str(generate_data / "valid"), batches=2,
                      out=str(tmp_path / "eval.json"), device="cpu")
    expected = moe_runs["runs"][name]["valid_loss"][5]
    print(f"{name}: pretrain eval {result['loss']:.6f}, the trainer's validation loss {expected:.6f}")
    assert abs(result["loss"] - expected) < 1e-5
    [completion] = run_generate(str(moe_runs["root"] / folder), None, ["def "], Sampling(max_new_tokens=4),
                                tokenizer=None, device="cpu")
    assert 1 <= len(completion) <= 4


@pytest.mark.parametrize("rate", [0.0, 0.02])
def test_aux_loss_free_balancing_evens_out_a_router_that_favours_two_experts(rate):
    """A router whose weights point two experts at the inputs' mean direction, the bias alone adapting
    (no gradient steps): after 60 steps the busiest expert takes under 1.5x the mean, without balancing
    over 3x."""
    from pretrain.model.moe import update_router_biases

    args = MoEArgs(num_experts=8, top_k=2, expert_ffn_hidden_size=16, scoring=RouterScoring.sigmoid,
                   bias_update_rate=rate if rate else 1e-9)  # 1e-9: the same code path, no effective balancing
    layer = moe_layer(args)
    generator = torch.Generator().manual_seed(4)
    direction = torch.randn(HIDDEN, generator=generator)
    with torch.no_grad():
        layer.router.weight[:2] += direction
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        for _ in range(60):
            layer(direction + torch.randn(4, 16, HIDDEN, generator=generator))
            layer.record_load()
            load = layer.step_load.clone()
            update_router_biases(layer, context.replica_group)
    finally:
        parallel.shutdown()
    max_over_mean = (load.max() / load.float().mean()).item()
    print(f"bias_update_rate={rate}: max/mean pairs per expert at step 60 {max_over_mean:.2f}")
    assert max_over_mean < 1.5 if rate else max_over_mean > 3


@pytest.mark.parametrize("moe, qk_norm, named", [
    (MoEArgs(num_experts=4, scoring=RouterScoring.sigmoid), True, "model.moe.scoring=sigmoid"),
    (MoEArgs(num_experts=4, shared_experts=1), True, "model.moe.shared_experts=1"),
    (MoEArgs(num_experts=4, first_dense_layers=1), False, "model.moe.first_dense_layers=1 without model.qk_norm"),
    (MoEArgs(num_experts=4, renormalize=False), False, "model.moe.renormalize=false without model.qk_norm"),
])
def test_mixtures_no_hugging_face_architecture_holds_are_refused(moe, qk_norm, named):
    with pytest.raises(UnsupportedModelError, match=named):
        architecture(LlamaArgs(qk_norm=qk_norm, moe=moe))


@pytest.mark.parametrize("kind, change, named", [
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not implemented"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ("mixtral", {"sliding_window": 16}, "sliding_window=16 is not implemented"),
])
def test_from_hf_refuses_mixtures_we_do_not_implement(kind, change, named, tmp_path, capsys):
    transformers_moe(kind, tmp_path / kind)
    config = json.loads((tmp_path / kind / "config.json").read_text())
    (tmp_path / kind / "config.json").write_text(json.dumps({**config, **change}))
    assert cli(["convert", "from-hf", "--model", str(tmp_path / kind), "--out", str(tmp_path / "out")]) == 2
    assert named in capsys.readouterr().err
