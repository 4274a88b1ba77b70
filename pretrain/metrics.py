"""Training metrics: throughput and MFU arithmetic, the rank-0 writer that sends each record to
TensorBoard, to metrics.jsonl, to the console and to W&B, and the step log that decides when
train/ records are written and what they hold."""

import json
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretrain.accelerators import peak_flops
from pretrain.config import Config, Layout, run_id
from pretrain.model.llama import LOSS_PARTS


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
    """Writes `train/<name>` scalars on rank 0 (to TensorBoard, metrics.jsonl, the console and,
    with `wandb`, a Weights & Biases run) and samples (TensorBoard text, samples.jsonl); other
    ranks hold a disabled writer."""

    def __init__(self, log_dir: Path, total_steps: int, enabled: bool, wandb: dict | None = None):
        self.enabled = enabled
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(log_dir))
        self.jsonl = _appender(log_dir / "metrics.jsonl")
        self.samples = _appender(log_dir / "samples.jsonl")
        self.progress = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, disable=None)
        self.wandb = _wandb_run(log_dir, wandb) if wandb is not None else None

    def write(self, step: int, values: dict[str, float], group: str = "train", console: bool = True) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tensorboard.add_scalar(f"{group}/{name}", value, step)
        self.jsonl.write(json.dumps({"step": step, "group": group, **values}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({f"{group}/{name}": value for name, value in values.items()}, step=step)
        if console:
            self.progress.write(console_line(group, step, self.progress.total, values))

    def write_samples(self, step: int, prompts: list[str], completions: list[str]) -> None:
        if not self.enabled:
            return
        rows = "\n".join(f"| {json.dumps(p)} | {json.dumps(c)} |" for p, c in zip(prompts, completions))
        self.tensorboard.add_text("samples", f"| prompt | completion |\n|---|---|\n{rows}", step)
        for prompt, completion in zip(prompts, completions):
            self.samples.write(json.dumps({"step": step, "prompt": prompt, "completion": completion}) + "\n")
        self.samples.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Table(columns=["step", "prompt", "completion"],
                                                   data=[[step, p, c] for p, c in zip(prompts, completions)])},
                           step=step)
        self.progress.write(f"samples at step {step}: " + " | ".join(
            json.dumps(p + c)[:120] for p, c in zip(prompts, completions)))

    def advance(self, steps: int) -> None:
        if self.enabled:
            self.progress.update(steps)

    def close(self) -> None:
        if self.enabled:
            self.progress.close()
            self.tensorboard.close()
            self.jsonl.close()
            self.samples.close()
            if self.wandb is not None:
                self.wandb.finish()


class StepLog:
    """train/ records every log.interval steps and at the last step: the mean loss over the steps
    since the last record (summed over data-parallel ranks then), the learning rate and gradient
    norm of the step, throughput, MFU where the accelerator is known, peak memory. With
    model.z_loss or a mixture of experts, `loss` is the cross-entropy and `z_loss`, `moe_aux_loss` and
    `moe_z_loss` (summed over the MoE blocks) what training adds to it."""

    def __init__(self, metrics: MetricsWriter, config: Config, layout: Layout, device: torch.device,
                 replica_group: dist.ProcessGroup, last_step: int):
        self.metrics, self.device, self.replica_group = metrics, device, replica_group
        self.interval, self.last_step = config.log.interval, last_step
        self.tokens_per_step = layout.global_batch_size * config.model.seq_len
        self.flops_per_token, self.peak = config.model.flops_per_token(), peak_flops(device)
        self.world_size, self.loss_divisor = layout.world_size, layout.replicas * layout.grad_accumulation
        logged = {"z_loss": config.model.z_loss > 0, "moe_aux_loss": config.model.moe.num_experts > 0,
                  "moe_z_loss": config.model.moe.num_experts > 0}
        self.logged_parts = [part for part in LOSS_PARTS if logged[part]]
        self.window_loss = torch.zeros(1 + len(LOSS_PARTS), device=device)  # the loss, its parts
        self.window_steps, self.window_start = 0, time.perf_counter()

    def should_log(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last_step

    def add(self, loss: torch.Tensor, parts: torch.Tensor) -> None:
        """A step's contributions of this rank to the loss and its parts (pretrain.step)."""
        self.window_loss[0] += loss
        self.window_loss[1:] += parts
        self.window_steps += 1

    def write(self, step: int, lr: float, grad_norm: float, extra: dict[str, float]) -> dict[str, float]:
        """Write the record of `step` (collective: reduces the loss over data- and context-parallel ranks)."""
        dist.all_reduce(self.window_loss, group=self.replica_group)
        elapsed = time.perf_counter() - self.window_start
        loss, *parts = self.window_loss.tolist()
        steps = self.loss_divisor * self.window_steps
        parts = dict(zip(LOSS_PARTS, parts))
        values = {"loss": (loss - sum(parts.values())) / steps,
                  **{part: parts[part] / steps for part in self.logged_parts},
                  "lr": lr, "grad_norm": grad_norm,
                  **throughput(self.tokens_per_step * self.window_steps, elapsed, self.flops_per_token,
                               self.world_size, self.peak),
                  "step_time": elapsed / self.window_steps, "mem_peak_gib": peak_memory_gib(self.device), **extra}
        self.metrics.write(step, values)
        self.window_loss.zero_()
        self.window_steps, self.window_start = 0, time.perf_counter()
        return values


def wandb_settings(config: Config) -> dict | None:
    """The W&B run of log.wandb=true, identified by the run id so that a resumed run continues it."""
    log = config.log
    if not log.wandb:
        return None
    return {"project": log.wandb_project, "name": log.wandb_run_name, "id": run_id(config),
            "config": OmegaConf.to_container(OmegaConf.structured(config), resolve=True)}


def _appender(path: Path):
    """A JSON-lines file opened for appending; half a line left by a killed run is ended first."""
    stream = open(path, "a", encoding="utf-8")
    if stream.tell() and _last_byte(path) != b"\n":
        stream.write("\n")
    return stream


def _wandb_run(log_dir: Path, settings: dict):
    """A Weights & Biases run in log_dir (resumed when the log folder is resumed)."""
    try:
        import wandb
    except ImportError:
        raise ImportError("log.wandb=true needs Weights & Biases: pip install wandb (or set log.wandb=false)") from None
    return wandb.init(project=settings["project"], name=settings["name"] or log_dir.name, dir=str(log_dir),
                      config=settings["config"], id=settings["id"], resume="allow")


_CONSOLE_FIELDS = [("loss", "loss {:.4f}"), ("acc", "acc {:.4f}"), ("acc_norm", "acc_norm {:.4f}"),
                   ("acc_bytes", "acc_bytes {:.4f}"), ("ppl", "ppl {:.2f}"), ("z_loss", "z-loss {:.2e}"),
                   ("moe_aux_loss", "moe-aux {:.2e}"), ("moe_z_loss", "moe-z {:.2e}"),
                   ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3f}"), ("tokens_per_sec", "{:,.0f} tok/s"),
                   ("mfu", "mfu {:.1%}"), ("step_time", "{:.3f} s/step"), ("mem_peak_gib", "mem {:.1f} GiB"),
                   ("seconds", "{:.1f} s")]


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def console_line(group: str, step: int, total: int, values: dict[str, float]) -> str:
    head = f"{group} step {step}/{total}" if group != "train" else f"step {step}/{total}"
    parts = [head]
    parts += [template.format(values[key]) for key, template in _CONSOLE_FIELDS if key in values]
    return " | ".join(parts)
