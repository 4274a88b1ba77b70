"""The GPU path (`pytest -m gpu`, run by bench/gpu.sh on a lent GPU; skipped without one):
bf16 + compiled blocks training in a world of one NCCL process, a bitwise resume, TP2 (two
gloo ranks on one GPU) against TP1, TP2 with sequence parallelism and CP2 with document masking
(FlexAttention across chunks) against one process, FlexAttention document masking and
context-parallel attention against the dense mask, no host synchronisation inside a training
step (torch.cuda.set_sync_debug_mode), and a mixture of experts' torch._grouped_mm path against
its loop over experts."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, run_layouts
from test_attention import dense_document_attention, output_and_grads, random_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs these)")]

STEPS = 20
MODEL = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
         "model.ffn_hidden_size=704", "model.seq_len=256", "model.vocab_size=0"]
TRAIN = ["optimizer.lr=1e-3", "schedule.warmup_steps=5", f"train.max_steps={STEPS}", "train.micro_batch_size=8",
         "train.global_batch_size=16", "log.interval=1", "data.num_workers=2", "data.doc_mask=true"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of the Python standard library's sources (no download)."""
    from pretrain.bench.train import SHAPES, prepare_shards
    from pretrain.bench.data import stdlib_sources

    return prepare_shards(tmp_path_factory.mktemp("gpu-data"), SHAPES["cpu"], stdlib_sources()[:400])


def train_process(*overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", *overrides], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(log_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["group"] == "train"}


def test_bf16_compiled_training_resumes_bitwise_on_one_gpu(shards, tmp_path):
    """precision and compile on auto (bf16, compiled), NCCL world of one, ZeRO-1, document masking."""
    common = [*MODEL, *TRAIN, f"data.path={shards}", f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.interval=10"]
    train_process(*common, f"log.dir={tmp_path / 'first'}")
    full = losses(tmp_path / "first")
    assert sorted(full) == list(range(1, STEPS + 1)) and all(v == v for v in full.values())
    assert full[STEPS] < full[1] - 1.0
    train_process(*common, f"log.dir={tmp_path / 'resumed'}", f"checkpoint.resume={tmp_path / 'ckpt' / 'step_00000010'}",
                  f"checkpoint.dir={tmp_path / 'ckpt2'}")
    resumed = losses(tmp_path / "resumed")
    assert resumed[11] == full[11]  # the restored weights and data give the same forward, bit for bit
    drift = max(abs(resumed[s] / full[s] - 1) for s in range(11, STEPS + 1))
    print(f"resumed run: step 11 bitwise equal, later steps within {drift:.2e} (non-deterministic kernels)")
    assert drift < 1e-2


def test_tp2_over_gloo_on_one_gpu_matches_tp1(shards, tmp_path):
    base = [*MODEL, *TRAIN, f"data.path={shards}", "train.precision=bf16", "model.compile=true"]
    reference = run_layouts(tmp_path / "one", 1, base, {"tp1": []})["tp1"]["loss"]
    tp2 = run_layouts(tmp_path / "two", 2, base, {"tp2": ["parallel.tp=2"]})["tp2"]["loss"]
    worst = max(abs(tp2[s] / reference[s] - 1) for s in reference)
    print(f"TP2 vs TP1 in bf16: losses within {100 * worst:.2f}%")
    assert worst < 0.02


def test_sequence_and_context_parallel_over_gloo_on_one_gpu_match_one_process(shards, tmp_path):
    base = [*MODEL, *TRAIN, f"data.path={shards}", "train.precision=bf16", "model.compile=true"]
    reference = run_layouts(tmp_path / "one", 1, base, {"tp1": []})["tp1"]["loss"]
    runs = run_layouts(tmp_path / "two", 2, base, {"tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
                                                    "cp2": ["parallel.cp=2"]})
    for name, run in runs.items():
        worst = max(abs(run["loss"][s] / reference[s] - 1) for s in reference)
        print(f"{name} vs TP1 in bf16 (document masking): losses within {100 * worst:.2f}%")
        assert worst < 0.02


def test_context_parallel_attention_equals_the_dense_mask():
    """A context-parallel group of one rank: FlexAttention over the load-balanced chunk order with
    the gathered keys and values released and refilled, against SDPA with the dense mask."""
    import torch.distributed as dist

    from pretrain import parallel
    from pretrain.model.context_parallel import context_parallel_attention

    q, k, v, document_ids = (t.cuda() for t in random_inputs(2, 1024, documents_per_token=1 / 90))
    context = parallel.initialize(tp=1, pp=1)
    try:
        group = dist.new_group([0])
        for documents in (None, document_ids):
            got = output_and_grads(lambda q, k, v: context_parallel_attention(q, k, v, group, documents), q, k, v)
            expected = output_and_grads(
                lambda q, k, v: dense_document_attention(q, k, v, torch.zeros_like(document_ids) if documents is None
                                                         else documents), q, k, v)
            assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected)) < 1e-3
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_flex_document_attention_equals_the_dense_mask(dtype, tolerance, monkeypatch):
    from pretrain.model.attention import attention

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # FlexAttention follows it in fp32

    q, k, v, document_ids = (t.cuda() for t in random_inputs(2, 1000, documents_per_token=1 / 90))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got = output_and_grads(lambda q, k, v: attention(q, k, v, document_ids), q, k, v)
    expected = output_and_grads(lambda q, k, v: dense_document_attention(q, k, v, document_ids), q, k, v)
    assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected)) < tolerance
    seq = 4096
    q, k, v, document_ids = (t.cuda() for t in random_inputs(1, seq, documents_per_token=1 / 300))
    output_and_grads(lambda q, k, v: attention(q, k, v, document_ids), q, k, v)  # compiles for this length
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    output_and_grads(lambda q, k, v: attention(q, k, v, document_ids), q, k, v)
    assert torch.cuda.max_memory_allocated() - before < seq * seq  # no [seq, seq] tensor, not even of bools


@pytest.mark.parametrize("doc_mask", [False, True])
def test_no_host_synchronisation_inside_a_training_step(doc_mask, shards, tmp_path):
    """CUDA's sync debug mode raises on any synchronisation in non-log steps after the first."""
    from pretrain import parallel
    from pretrain.config import load, validate
    from pretrain.data import stream
    from pretrain.train import Trainer

    config = load(None, [*MODEL, *TRAIN, f"data.path={shards}", f"data.doc_mask={str(doc_mask).lower()}",
                         "train.max_steps=8", "log.interval=4", f"log.dir={tmp_path}", "train.precision=bf16",
                         "model.compile=true"])
    context = parallel.initialize(tp=1, pp=1)
    original_step = Trainer._step

    def checked_step(self, step, log_step):
        torch.cuda.set_sync_debug_mode("error" if not log_step and step >= 2 else 0)
        return original_step(self, step, log_step)

    try:
        Trainer._step = checked_step
        trainer = Trainer(config, validate(config, 1), context, stream.resolve(config))
        result = trainer.run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        Trainer._step = original_step
        parallel.shutdown()
    assert context.backend == "nccl" and sorted(result.losses) == [4, 8]


def test_train_warns_when_the_plan_exceeds_the_gpu():
    from pretrain import plan
    from pretrain.config import load

    config = load(ROOT / "configs/llama-70b.yaml", ["parallel.tp=1", "parallel.pp=1"])
    line = plan.memory_check(config, 1, torch.device("cuda", 0))
    assert "warning: more than this GPU's" in line and "pretrain plan --search" in line


def test_grouped_mm_path_equals_the_loop_over_experts(monkeypatch):
    """A mixture of experts in bf16: torch._grouped_mm (compute capability >= 9) against one matmul
    per expert, outputs and every gradient (the CPU tests hold both to a loop over tokens)."""
    from pretrain.model import moe
    from pretrain.model.args import MoEArgs

    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm needs compute capability 9.0 or more")
    torch.manual_seed(0)
    layer = moe.MoE(MoEArgs(num_experts=8, top_k=2, expert_ffn_hidden_size=256, aux_loss_coeff=0.01), 512, shared=None)
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.normal_(0.0, 0.5 if name == "router.weight" else 0.05)
    layer = layer.cuda().bfloat16()
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    probe = torch.randn_like(x)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(moe, "use_grouped_mm", lambda _, grouped=grouped: grouped)
        layer.zero_grad()
        inputs = x.clone().requires_grad_()
        out = layer(inputs)
        ((out * probe).float().sum() + layer.aux_loss).backward()
        results.append([out.detach(), inputs.grad] + [p.grad.clone() for p in layer.parameters()])
    for grouped, loop in zip(*results):
        assert (grouped.float() - loop.float()).abs().max() <= 2e-2 * loop.float().abs().max()
