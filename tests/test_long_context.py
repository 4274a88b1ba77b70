"""Long context: sequence parallelism (SP) with TP, context parallelism (CP), RoPE scaling.

Every layout trains like one process (per-step loss over 5 steps with 4 micro-batches a step,
fp32, within 1e-5): TP2+SP, TP4+SP, CP2, CP4, CP2 with document masking (and validation), CP2 x
DP2 with ZeRO-1 and ZeRO-3 (CP2 x TP2(SP) x PP2 shares test_parity.py's launch of 8 processes);
in bf16 TP2+SP and CP2 stay within 2% of
one process over 20 steps. A CP2 (x DP2) checkpoint resumes at CP1, and through `convert
reshard` at TP2+SP, with the next losses of an uninterrupted run; its weights start a context
extension (twice the length, RoPE scaled) at either layout. What a forward saves for
backward equals `pretrain plan`'s prediction (SP: the norms' share falls by tp, CP: all by cp), a
TP2+SP block compiles to one graph, a CP4 process needs a third of one process's activations.
transformers reproduces our logits of a rope-scaled model at 4x its original length."""

import json

import pytest
import torch

from conftest import ROOT, run_layouts
from pretrain import parallel, plan
from pretrain.accelerators import BY_KEY
from pretrain.cli import main as cli
from pretrain.config import load
from pretrain.model.args import LlamaArgs, RopeScaling, RopeScalingKind
from pretrain.model.context_parallel import chunk_positions, shard_batch
from test_data_parallel import data  # noqa: F401 -- the shards fixture

STEPS, BF16_STEPS = 5, 20
# heads 8 / KV heads 4 keep grouped-query attention at TP4; seq 32 = 8 chunks of 4 tokens at CP4.
MODEL = ["model.vocab_size=300", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=8",
         "model.num_kv_heads=4", "model.ffn_hidden_size=96", "model.seq_len=32"]
BASE = ["data.source=synthetic", *MODEL, "optimizer.lr=3e-3", "optimizer.grad_clip=0.5", "schedule.warmup_steps=2",
        f"train.max_steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8", "log.interval=1",
        "optimizer.zero_stage=1"]
BF16 = ["train.precision=bf16", f"train.max_steps={BF16_STEPS}", "train.global_batch_size=4"]
LOSS_TOLERANCE, BF16_RELATIVE_TOLERANCE = 1e-5, 0.02
SAVED_RELATIVE_TOLERANCE = 1e-3  # a few scalars (the loss's token count) are not in the prediction
RESUME_STEP = 3
# a context extension: twice the length, Llama 3.1's RoPE scaling, from the CP2 x DP2 run's weights
EXTENDED = ["model.seq_len=64", "model.rope_scaling.kind=llama3", "model.rope_scaling.factor=2",
            "model.rope_scaling.original_seq_len=32", "train.max_steps=2"]


def doc_mask(data) -> list[str]:
    """Shards of 32-token samples packing many short documents (test_data_parallel's), masked."""
    return ["data.source=shards", f"data.path={data / 'train'}", f"data.valid_path={data / 'valid'}",
            "data.doc_mask=true", "data.num_workers=0", f"train.eval_interval={STEPS}", "train.eval_steps=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict:
    """Every run, in one launch per world size. The CP2 x DP2 run saves the checkpoint that the
    single-process launch resumes at CP1 and the 2-process launch, resharded, at TP2+SP."""
    root = tmp_path_factory.mktemp("long")
    saved = root / "cp2_dp2_ckpt"
    results = run_layouts(root / "four", 4, BASE, {
        "tp4_sp": ["parallel.tp=4"], "cp4": ["parallel.cp=4"],
        "cp2_dp2_zero1": ["parallel.cp=2", f"checkpoint.dir={saved}", f"checkpoint.interval={RESUME_STEP}"],
        "cp2_dp2_zero3": ["parallel.cp=2", "optimizer.zero_stage=3", "optimizer.zero3_param_persistence_threshold=0"],
    }, checks="long_context_checks")
    results |= run_layouts(root / "one", 1, BASE, {
        "single": [], "single_doc_mask": doc_mask(data), "single_bf16": BF16,
        "cp1_resumed": [f"checkpoint.dir={root / 'cp1_ckpt'}", f"checkpoint.resume={saved}/step_0000000{RESUME_STEP}"],
        "extended_fresh": EXTENDED, "extended_cp1": [*EXTENDED, f"checkpoint.init_from={saved}"],
    })
    assert cli(["convert", "reshard", "--checkpoint", str(saved), "--step", str(RESUME_STEP), "--tp", "2", "--pp", "1",
                "--out", str(root / "resharded")]) == 0
    results |= run_layouts(root / "two", 2, BASE, {
        "tp2_sp": ["parallel.tp=2"], "cp2": ["parallel.cp=2"], "cp2_doc_mask": ["parallel.cp=2", *doc_mask(data)],
        "tp2_sp_bf16": ["parallel.tp=2", *BF16], "cp2_bf16": ["parallel.cp=2", *BF16],
        "tp2_sp_resumed": ["parallel.tp=2", f"checkpoint.dir={root / 'resharded'}"],
        "extended_tp2_sp": ["parallel.tp=2", *EXTENDED, f"checkpoint.init_from={saved}"],
    })
    return results


def loss_difference(run: dict, reference: dict, steps) -> float:
    return max(abs(run["loss"][s] - reference["loss"][s]) for s in steps)


@pytest.mark.parametrize("layout", ["tp2_sp", "tp4_sp", "cp2", "cp4", "cp2_doc_mask", "cp2_dp2_zero1", "cp2_dp2_zero3"])
def test_layout_trains_like_one_process(layout, runs):
    reference = runs["single_doc_mask" if "doc_mask" in layout else "single"]
    run = runs[layout]
    assert sorted(run["loss"]) == list(range(1, STEPS + 1))
    difference = loss_difference(run, reference, range(1, STEPS + 1))
    print(f"{layout}: max |loss difference| {difference:.3g}")
    assert difference <= LOSS_TOLERANCE
    assert reference["loss"][STEPS] < reference["loss"][1] - 0.1
    if "doc_mask" in layout:
        assert abs(run["valid_loss"][STEPS] - reference["valid_loss"][STEPS]) <= LOSS_TOLERANCE


@pytest.mark.parametrize("layout", ["tp2_sp_bf16", "cp2_bf16"])
def test_bf16_layout_stays_within_two_percent(layout, runs):
    reference, run = runs["single_bf16"], runs[layout]
    worst = max(abs(run["loss"][s] / reference["loss"][s] - 1) for s in range(1, BF16_STEPS + 1))
    print(f"{layout}: max relative loss difference {worst:.3g} over {BF16_STEPS} steps")
    assert worst <= BF16_RELATIVE_TOLERANCE
    assert reference["loss"][BF16_STEPS] < reference["loss"][1] - 0.1


@pytest.mark.parametrize("resumed, uninterrupted", [("cp1_resumed", "single"), ("tp2_sp_resumed", "tp2_sp")])
def test_cp2_checkpoint_resumes_at_another_layout(resumed, uninterrupted, runs):
    run, reference = runs[resumed], runs[uninterrupted]
    assert sorted(run["loss"]) == list(range(RESUME_STEP + 1, STEPS + 1))
    difference = loss_difference(run, reference, range(RESUME_STEP + 1, STEPS + 1))
    print(f"CP2 x DP2 -> {resumed}: max |loss difference| {difference:.3g}")
    assert difference <= LOSS_TOLERANCE


def test_context_extension_starts_from_a_short_runs_weights_at_any_layout(runs):
    """checkpoint.init_from: the CP2 x DP2 run's newest weights, at twice the length with RoPE scaled,
    at CP1 and at TP2+SP: the same losses from step 1 on, far below a fresh start's."""
    fresh, cp1, tp2 = runs["extended_fresh"], runs["extended_cp1"], runs["extended_tp2_sp"]
    assert sorted(cp1["loss"]) == sorted(tp2["loss"]) == [1, 2]
    assert loss_difference(tp2, cp1, [1, 2]) <= LOSS_TOLERANCE
    assert cp1["loss"][1] < fresh["loss"][1] - 0.1


@pytest.fixture(scope="module")
def checks(runs) -> list[dict]:
    return runs["checks"]


@pytest.mark.parametrize("layout", ["tp2_sp", "tp4_sp", "cp2", "cp4"])
def test_saved_activations_equal_the_plan(layout, checks):
    for rank, result in enumerate(checks):
        for case, (predicted, measured) in result["saved"].items():
            if case.startswith(layout + ","):
                print(f"rank {rank} {case}: predicted {predicted:,.0f} measured {measured:,}")
                assert abs(predicted - measured) <= SAVED_RELATIVE_TOLERANCE * measured, case


def test_sequence_and_context_parallelism_cut_activations():
    """What the plan predicts (checked above against what a forward saves), on a first pipeline stage (the
    head keeps its weight's gradient, the same at any sequence length)."""
    args = LlamaArgs(**{k.split(".")[1]: int(v) for k, v in (o.split("=") for o in MODEL)})
    tp2 = plan.activation_bytes(args, 2, 2, 0, 2, 4, False)
    norms = 2 * (4 * args.hidden_size + 4 + 2 * 4 * args.hidden_size) * 2 * args.seq_len * args.num_layers // 2
    assert tp2 - plan.activation_bytes(args, 2, 2, 0, 2, 4, False, sequence_parallel=True) == norms / 2
    one_rank = plan.activation_bytes(args, 1, 2, 0, 2, 4, False)
    assert plan.activation_bytes(args, 1, 2, 0, 2, 4, False, cp=4) == one_rank / 4


def test_tp2_sequence_parallel_block_is_one_graph(checks):
    for result in checks[:2]:
        assert result["graph_breaks"] == {"breaks": 0, "graphs": 1}


def test_cp4_process_needs_a_third_of_one_process_activations(checks):
    for rank, result in enumerate(checks):
        memory = result["memory"]
        print(f"rank {rank}: CP4 peak {memory['cp4_peak'] / 2**20:.1f} MiB above baseline (predicted activations "
              f"{memory['cp4_activations'] / 2**20:.1f} + working {memory['cp4_working'] / 2**20:.1f}); one process's "
              f"activations {memory['single_activations'] / 2**20:.1f} MiB")
        assert 3 * memory["cp4_peak"] <= memory["single_activations"]
        assert memory["cp4_peak"] >= memory["cp4_activations"]


def test_shard_batch_gives_each_rank_its_balanced_chunks():
    tokens = torch.arange(16)[None]
    assert chunk_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert chunk_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    batch = {"tokens": tokens, "labels": tokens + 1, "document_ids": tokens // 5}
    shards = [shard_batch(batch, 4, rank) for rank in range(4)]
    assert sorted(torch.cat([s["tokens"] for s in shards], 1)[0].tolist()) == list(range(16))
    for shard in shards:
        assert torch.equal(shard["position_ids"], shard["tokens"]) and torch.equal(shard["labels"], shard["tokens"] + 1)
        assert torch.equal(shard["document_ids"], tokens // 5)  # whole: keys of every chunk need them


@pytest.mark.parametrize("change, message", [
    (["parallel.cp=3"], "divisible by 2 x parallel.cp = 6"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["parallel.tp=4", "parallel.cp=2", "model.seq_len=36"], "tokens per context-parallel rank must be divisible"),
    (["model.rope_scaling.kind=yarn"], "needs model.rope_scaling.original_seq_len"),
])
def test_invalid_layouts_are_refused_with_the_reason(change, message):
    from pretrain.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(load(None, BASE + change), 12)


def search(config: str, gpus: int, *overrides: str) -> list[plan.Plan]:
    return plan.search(load(ROOT / "configs" / config, list(overrides)), gpus, BY_KEY["h100"])


def test_plan_search_uses_context_and_sequence_parallelism_for_128k():
    ranked = search("llama-8b-128k.yaml", 64)
    best = ranked[0]
    assert best.layout.cp > 1 and best.layout.sequence_parallel and not best.activation_checkpointing
    assert best.mfu > 0.4 and best.fits
    assert max(p.tokens_per_sec for p in ranked if p.layout.cp == 1) < 0.85 * best.tokens_per_sec
    shipped = plan.plan(load(ROOT / "configs/llama-8b-128k.yaml"), 64, BY_KEY["h100"])
    assert shipped.overrides() == best.overrides() == search("llama-8b-128k.yaml", 16)[0].overrides()


def test_plan_finds_the_longest_sequence_that_fits():
    seq_len, best = plan.longest_seq_len(load(ROOT / "configs/llama-8b-128k.yaml"), 8, BY_KEY["h100"])
    assert seq_len >= 131072 and best.fits and best.layout.sequence_parallel
    assert not search("llama-8b-128k.yaml", 8, f"model.seq_len={2 * seq_len}")


@pytest.mark.parametrize("scaling", [
    RopeScaling(RopeScalingKind.llama3, factor=4.0, original_seq_len=16, low_freq_factor=1.0, high_freq_factor=2.0),
    RopeScaling(RopeScalingKind.yarn, factor=4.0, original_seq_len=16, beta_fast=8.0, beta_slow=1.0),
], ids=["llama3", "yarn"])
def test_transformers_reproduces_rope_scaled_logits_at_four_times_the_length(scaling, tmp_path):
    from transformers import LlamaForCausalLM

    from pretrain.convert.hf_export import write_safetensors
    from pretrain.model.hf import hf_config, to_hf_tensors
    from pretrain.model.llama import Llama, rope_frequencies

    args = LlamaArgs(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                     seq_len=64, rope_theta=100.0, rope_scaling=scaling)  # theta 100: every frequency band is met
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        model = Llama(args, context.tp_group).eval()
        model.init_weights(seed=5)
        tokens = torch.randint(0, args.vocab_size, (2, 4 * scaling.original_seq_len),
                               generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = model(tokens)[..., :args.vocab_size]
        tensors = ((hf, t[:args.vocab_size] if name.endswith(("embedding.weight", "output.weight")) else t)
                   for name, param in model.named_parameters() for hf, t in to_hf_tensors(name, param.detach(), args))
        write_safetensors(tensors, tmp_path, 2**30)
    finally:
        parallel.shutdown()
    (tmp_path / "config.json").write_text(json.dumps(hf_config(args, torch.float32, 1, 2, 3)))
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = theirs(tokens).logits
    difference = (logits - ours).abs().max().item()
    print(f"{scaling.kind.value}: max |logit difference| at {tokens.shape[1]} tokens {difference:.3g}")
    assert difference <= 1e-5
    scaled, unscaled = rope_frequencies(16, 100.0, scaling), rope_frequencies(16, 100.0, RopeScaling())
    assert (scaled[0] - unscaled[0]).abs().max() > 0.01 * unscaled[0].max()  # the scaling changes the model
