"""`pretrain bench train`: training throughput of this framework end to end (DeepSpeed ZeRO-1
engine, our model, our loader over shards built from a local corpus), eager and with compiled
blocks, beside Hugging Face's LlamaForCausalLM of the same shape, eager (SDPA) and
torch.compile'd, in one run on one device. Prints one table (tokens/s, TFLOP/s per GPU, MFU,
peak memory; on a known GPU also `pretrain plan`'s prediction of the peak allocated memory) and
the speed ratios, and writes them as JSON."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import plan
from pretrain.accelerators import of_device, peak_flops
from pretrain.bench.data import stdlib_sources
from pretrain.config import load
from pretrain.data.build import build_shards
from pretrain.metrics import peak_memory_gib
from pretrain.model.args import LlamaArgs
from pretrain.tokenizer import train_tokenizer


@dataclass(frozen=True)
class Shape:
    model: dict
    seq_len: int
    micro_batch_size: int


SHAPES = {
    "1b": Shape(dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, ffn_hidden_size=5632,
                     vocab_size=32000), 2048, 8),
    "wide": Shape(dict(hidden_size=4096, num_layers=8, num_heads=32, num_kv_heads=32, ffn_hidden_size=11008,
                       vocab_size=32000), 2048, 8),
    "cpu": Shape(dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=704,
                      vocab_size=8000), 256, 8),
    "tiny": Shape(dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=176,
                       vocab_size=512), 64, 4),
    # long sequences on a CPU: attention is most of the work (70% of the FLOPs; 82% for llama-8b-128k)
    "long": Shape(dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=704,
                       vocab_size=8000), 8192, 1),
}
TOKENIZER_VOCAB = 8000  # the larger GPU vocabularies train on the same 8k tokenizer's shards
ROWS = ("hf_eager_sdpa", "hf_compiled", "ours_eager", "ours")
RATIOS = (("ours", "hf_eager_sdpa"), ("ours", "hf_compiled"), ("ours", "ours_eager"))


def prepare_shards(work: Path, shape: Shape, corpus: list[str]) -> Path:
    """Tokenizer and shards of a local corpus (the Python standard library's sources by default)."""
    vocab = min(shape.model["vocab_size"], TOKENIZER_VOCAB)
    tokenizer = work / f"tokenizer-{vocab}"
    if not (tokenizer / "card.json").exists():
        train_tokenizer(corpus, vocab_size=vocab, out=tokenizer, max_chars=2_000_000 if vocab < 1000 else 0)
    shards = work / f"shards-{vocab}-{shape.seq_len}"
    if not (shards / "manifest.json").exists():
        build_shards(corpus, tokenizer, shape.seq_len, shards, shard_samples=1000, workers=2, progress=False)
    return shards


def measure(step, tokens_per_step: int, flops_per_token: int, device: torch.device, warmup: int,
            steps: int) -> dict:
    """Throughput of `step` after `warmup` calls, synchronising only around the timed loop."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return figures(tokens_per_step * steps / (time.perf_counter() - start), flops_per_token, device)


def figures(tokens_per_sec: float, flops_per_token: int, device: torch.device) -> dict:
    peak = peak_flops(device)
    tflops = tokens_per_sec * flops_per_token / 1e12
    return {"tokens_per_sec": round(tokens_per_sec), "tflops_per_gpu": float(f"{tflops:.3g}"),
            "mfu": round(tflops * 1e12 / peak, 4) if peak else None,
            "mem_peak_gib": round(peak_memory_gib(device), 1)}


def run_ours(shape: Shape, shards: Path, work: Path, warmup: int, steps: int, compiled: bool) -> dict:
    """The framework end to end through `train()`, logging every `steps` steps: the last window,
    after at least `warmup` steps, is the measurement."""
    from pretrain.train import train

    total = -(-warmup // steps) * steps + steps
    log_dir = work / ("ours-log" if compiled else "ours-eager-log")
    overrides = [f"model.{k}={v}" for k, v in shape.model.items()] + [
        f"model.seq_len={shape.seq_len}", f"execution.compile={str(compiled).lower()}", "data.source=shards",
        f"data.path={shards}", "data.num_workers=2",
        f"train.micro_batch_size={shape.micro_batch_size}", f"train.global_batch_size={shape.micro_batch_size}",
        f"train.max_steps={total}", f"log.interval={steps}", "optimizer.zero_stage=1",
        f"log.dir={log_dir}", "checkpoint.dir=''", "schedule.warmup_steps=1", "train.eval_interval=0",
    ]
    config = load(None, overrides)
    result = train(config)
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["group"] == "train"][-1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row = figures(last["tokens_per_sec"], LlamaArgs(**shape.model, seq_len=shape.seq_len).flops_per_token(), device)
    row["loss"] = round(result.losses[max(result.losses)], 3)
    gpu = of_device(device)
    if gpu is not None:  # what torch.cuda.max_memory_allocated should read: no CUDA context or fragmentation
        row["plan_mem_gib"] = round(plan.plan(config, 1, gpu).memory_gib["total"] - plan.ALLOWANCE_GIB, 1)
    return row


def run_hugging_face(shape: Shape, compiled: bool, warmup: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = shape.model
    config = LlamaConfig(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                         intermediate_size=m["ffn_hidden_size"], num_hidden_layers=m["num_layers"],
                         num_attention_heads=m["num_heads"], num_key_value_heads=m["num_kv_heads"],
                         max_position_embeddings=shape.seq_len, use_cache=False, attn_implementation="sdpa")
    with device:
        model = LlamaForCausalLM(config)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, m["vocab_size"], (shape.micro_batch_size, shape.seq_len), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = forward(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = LlamaArgs(**m, seq_len=shape.seq_len).flops_per_token()
    return measure(step, shape.micro_batch_size * shape.seq_len, flops, device, warmup, steps)


def run(shape_name: str, work: Path, warmup: int, steps: int, corpus: list[str] | None = None) -> dict:
    shape = SHAPES[shape_name]
    work.mkdir(parents=True, exist_ok=True)
    shards = prepare_shards(work, shape, corpus or stdlib_sources())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    measurements = {"hf_eager_sdpa": lambda: run_hugging_face(shape, False, warmup, steps),
                    "hf_compiled": lambda: run_hugging_face(shape, True, warmup, steps),
                    "ours_eager": lambda: run_ours(shape, shards, work, warmup, steps, compiled=False),
                    "ours": lambda: run_ours(shape, shards, work, warmup, steps, compiled=True)}
    rows = {}
    for name in ROWS:
        rows[name] = measurements[name]()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous model is gone: give its memory back before the next
    ratios = {f"{a}/{b}": round(rows[a]["tokens_per_sec"] / rows[b]["tokens_per_sec"], 3) for a, b in RATIOS}
    return {"shape": shape_name, "device": device, "torch": torch.__version__, "seq_len": shape.seq_len,
            "micro_batch_size": shape.micro_batch_size, "params": LlamaArgs(**shape.model).num_params(),
            "warmup_steps": warmup, "measured_steps": steps, "rows": rows, "ratios": ratios}


def print_table(result: dict) -> None:
    print(f"shape {result['shape']} on {result['device']}: seq {result['seq_len']}, micro-batch "
          f"{result['micro_batch_size']}, {result['params'] / 1e6:.3g}M parameters")
    print(f"{'':<16}{'tokens/s':>12}{'TFLOP/s/GPU':>13}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}")
    for name, row in result["rows"].items():
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        print(f"{name:<16}{row['tokens_per_sec']:>12,}{row['tflops_per_gpu']:>13}{mfu:>8}{row['mem_peak_gib']:>10}"
              f"{row.get('plan_mem_gib', '-'):>10}")
    print("tokens/s ratios: " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in result["ratios"].items()))


def main(shape: str, work: str, out: str | None, warmup: int, steps: int) -> int:
    result = run(shape, Path(work), warmup, steps)
    print_table(result)
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return 0
