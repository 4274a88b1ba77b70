"""`pretrain plan` against the real thing: per-rank weights, gradients and optimizer state against
the tensors a DeepSpeed engine holds (TP2, PP2, DP2 with ZeRO 0-3, fp32 and bf16, a tiny and a
125M-like model), activations against the bytes autograd saves in a real forward, and --search
proposing only layouts that validation accepts."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TESTS, child_env, launch
from pretrain import parallel, plan
from pretrain.config import load, validate
from pretrain.model.args import ExecutionArgs, LlamaArgs, MoEArgs
from pretrain.model.execution import apply_execution
from pretrain.model.llama import Llama

TOLERANCE = 0.02
TINY = ["data.source=synthetic", "model.vocab_size=300", "model.hidden_size=64", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=96", "model.seq_len=32",
        "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=8", "log.interval=1"]
ODD = ["model.hidden_size=60", "model.num_heads=6", "model.ffn_hidden_size=98"]  # partitions pad and straddle
MODEL_125M = ["model.vocab_size=32000", "model.hidden_size=768", "model.num_layers=12", "model.num_heads=12",
              "model.num_kv_heads=12", "model.ffn_hidden_size=2048", "train.micro_batch_size=1",
              "train.global_batch_size=4"]
BF16, FP32 = ["train.precision=bf16"], ["train.precision=fp32"]
MOE = ["model.qk_norm=true", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=32",
       "model.moe.shared_experts=1", "model.moe.first_dense_layers=1"]
TWO = {
    "tp2_zero1_bf16": ["parallel.tp=2", "optimizer.zero_stage=1", *BF16],
    "dp2_zero0_fp32": ["optimizer.zero_stage=0", *FP32],
    "dp2_zero0_bf16": ["optimizer.zero_stage=0", *BF16],
    "dp2_zero1_bf16_odd": ["optimizer.zero_stage=1", *BF16, *ODD],
    "dp2_zero2_fp32_odd": ["optimizer.zero_stage=2", *FP32, *ODD],
    "dp2_zero3_bf16": ["optimizer.zero_stage=3", *BF16],
    "dp2_zero3_fp32_threshold0": ["optimizer.zero_stage=3", *FP32, "optimizer.zero3_param_persistence_threshold=0"],
    "pp2_zero1_bf16_tied": ["parallel.pp=2", "optimizer.zero_stage=1", *BF16, "model.tie_embeddings=true"],
    "pp2_zero1_fp32": ["parallel.pp=2", "optimizer.zero_stage=1", *FP32],
    "125m_dp2_zero1_bf16": ["optimizer.zero_stage=1", *BF16, *MODEL_125M],
    "125m_dp2_zero3_bf16": ["optimizer.zero_stage=3", *BF16, *MODEL_125M],
    "moe_dp2_zero1_bf16": ["optimizer.zero_stage=1", *BF16, *MOE],
    "moe_ep2_zero2_fp32": ["optimizer.zero_stage=2", *FP32, *MOE, "parallel.ep=2"],
}
FOUR = {
    "tp2_dp2_zero2_bf16_odd": ["parallel.tp=2", "optimizer.zero_stage=2", *BF16, *ODD],
    "tp2_pp2_zero1_bf16_tied": ["parallel.tp=2", "parallel.pp=2", "optimizer.zero_stage=1", *BF16,
                                "model.tie_embeddings=true"],
    "pp2_dp2_zero1_fp32_odd": ["parallel.pp=2", "optimizer.zero_stage=1", *FP32, *ODD],
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    results = {}
    for nproc, runs in ((2, TWO), (4, FOUR)):
        tmp = tmp_path_factory.mktemp(f"memory{nproc}")
        spec, out = tmp / "spec.json", tmp / "out.json"
        spec.write_text(json.dumps({"base": TINY + [f"log.dir={tmp / 'log'}"], "runs": runs}))
        launch(nproc, str(TESTS / "memory_check.py"), str(spec), str(out))
        results |= json.loads(out.read_text())
    return results


@pytest.mark.multiprocess
@pytest.mark.parametrize("run", [*TWO, *FOUR])
def test_weights_gradients_and_optimizer_equal_what_the_engine_holds(run, engines):
    for rank, result in enumerate(engines[run]):
        planned, held = result["parameters"]
        assert planned == held, f"rank {rank}: the plan counts {planned} parameters, the engine holds {held}"
        for category in ("weights", "gradients", "optimizer", "buffers"):
            predicted, measured = result["predicted"][category], result["measured"][category]
            print(f"{run} rank {rank} {category}: predicted {predicted:,} measured {measured:,}")
            if category == "buffers" and predicted == 0:
                assert measured < 2**20  # small leftovers (pipeline buffers of a tiny model)
            else:
                assert abs(predicted - measured) <= TOLERANCE * measured, (category, predicted, measured)


def saved_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in a forward with labels, each storage once, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, labels=torch.roll(tokens, -1, 1))
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["saved", "checkpointed"])
@pytest.mark.parametrize("tied", [False, True, "moe"], ids=["untied", "tied", "moe"])
def test_activations_equal_what_a_forward_saves(dtype, checkpointing, tied):
    """"moe": qk_norm, a dense first block, then 8 experts (top 2) and a shared expert."""
    moe = MoEArgs(num_experts=8, top_k=2, expert_ffn_hidden_size=96, shared_experts=1, first_dense_layers=1) \
        if tied == "moe" else MoEArgs()
    args = LlamaArgs(vocab_size=1000, hidden_size=128, num_layers=3, num_heads=8, num_kv_heads=2,
                     ffn_hidden_size=352, seq_len=64, tie_embeddings=tied is True, qk_norm=tied == "moe", moe=moe)
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        model = Llama(args, context.tp_group)
        apply_execution(model, ExecutionArgs(activation_checkpointing=checkpointing), compile_blocks=False)
        model.init_weights(seed=0)
        measured = saved_bytes(model.to(dtype), torch.randint(0, 1000, (2, 64)))
    finally:
        parallel.shutdown()
    predicted = plan.activation_bytes(args, 1, 1, 0, 2, dtype.itemsize, checkpointing)
    print(f"activations: predicted {predicted:,.0f} measured {measured:,}")
    assert abs(predicted - measured) <= 0.1 * measured


@pytest.mark.multiprocess
def test_tensor_parallel_activations_equal_what_a_forward_saves(tp2_model_checks):
    for rank in tp2_model_checks:
        for case, (predicted, measured) in rank["activations"].items():
            assert abs(predicted - measured) <= 0.1 * measured, case


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pretrain", "plan", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.multiprocess
@pytest.mark.parametrize("preset, gpus", [("llama-1b", 16), ("llama-7b", 64), ("tiny", 4), ("olmoe-1b-7b-like", 64),
                                          ("qwen3-30b-a3b-like", 64)])
def test_search_proposes_only_layouts_that_validation_accepts(preset, gpus):
    config = ROOT / "configs" / f"{preset}.yaml"
    proposals = json.loads(plan_cli("--config", str(config), "--gpus", str(gpus), "--search", "--top", "1000",
                                    "--json").stdout)
    assert len(proposals) > 3
    for proposal in proposals:
        layout = load(config, proposal["overrides"].split() + ["data.source=synthetic"])
        validate(layout, gpus)  # raises ConfigError if the proposal were not a valid layout
        assert proposal["fits"]
    speeds = [p["tokens_per_sec"] for p in proposals]
    assert speeds == sorted(speeds, reverse=True)


@pytest.mark.multiprocess
def test_plan_json_has_memory_speed_and_fit():
    result = json.loads(plan_cli("--config", str(ROOT / "configs/llama-1b.yaml"), "--gpus", "8", "--gpu", "h200",
                                 "--json").stdout)
    assert set(result["memory_gib"]) >= {"weights", "gradients", "optimizer", "activations", "total"}
    assert result["fits"] and 0 < result["mfu"] < 1 and result["tokens_per_sec"] > 0 and result["step_time_s"] > 0
    memory = result["memory_gib"]
    assert abs(sum(v for k, v in memory.items() if k != "total") - memory["total"]) < 0.05
    text = plan_cli("--config", str(ROOT / "configs/llama-70b.yaml"), "--gpus", "8", "parallel.pp=1").stdout
    assert "DOES NOT FIT" in text  # 70B does not fit on one node of 80 GB GPUs
