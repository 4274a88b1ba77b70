"""Training metrics: throughput and MFU arithmetic, and the rank-0 writer that sends each
record to TensorBoard, to metrics.jsonl and to the console."""

import json
import resource
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# Dense bf16 peak per GPU (vendor datasheets, without sparsity), matched against the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "A6000": 155e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Datasheet peak of this GPU, or None (CPU, unknown GPU): MFU is then not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def throughput(tokens: int, seconds: float, flops_per_token: int, world_size: int,
               peak: float | None) -> dict[str, float]:
    """tokens/s of the whole job, achieved TFLOP/s per GPU (or process) and MFU when the peak is known."""
    tokens_per_sec = tokens / seconds
    flops_per_gpu = tokens_per_sec * flops_per_token / world_size
    result = {"tokens_per_sec": tokens_per_sec, "tflops_per_gpu": flops_per_gpu / 1e12}
    if peak:
        result["mfu"] = flops_per_gpu / peak
    return result


class MetricsWriter:
    """Writes `train/<name>` scalars on rank 0; other ranks hold a disabled writer."""

    def __init__(self, log_dir: Path, total_steps: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(log_dir))
        path = log_dir / "metrics.jsonl"
        self.jsonl = open(path, "a", encoding="utf-8")
        if self.jsonl.tell() and _last_byte(path) != b"\n":
            self.jsonl.write("\n")  # a killed run left half a line: start the resumed run on a new one
        self.progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, disable=None)

    def write(self, step: int, values: dict[str, float], group: str = "train", console: bool = True) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tensorboard.add_scalar(f"{group}/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, "group": group, **values}) + "\n")
        self.jsonl.flush()
        if console:
            self.progress.write(console_line(group, step, self.progress.total, values))

    def advance(self, steps: int) -> None:
        if self.enabled:
            self.progress.update(steps)

    def close(self) -> None:
        if self.enabled:
            self.progress.close()
            self.tensorboard.close()
            self.jsonl.close()


_CONSOLE_FIELDS = [("ppl", "ppl {:.2f}"), ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3f}"),
                   ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"), ("step_time", "{:.3f} s/step"),
                   ("mem_peak_gib", "mem {:.1f} GiB")]


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def console_line(group: str, step: int, total: int, values: dict[str, float]) -> str:
    head = f"{group} step {step}/{total}" if group != "train" else f"step {step}/{total}"
    parts = [head, f"loss {values['loss']:.4f}"]
    parts += [template.format(values[key]) for key, template in _CONSOLE_FIELDS if key in values]
    return " | ".join(parts)
