"""The training loop: model + optimizer inside a DeepSpeed engine, fed by a data source split
by data-parallel rank, with metrics every `log.interval` steps and checkpoints."""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from pretrain import parallel
from pretrain.config import Config, Layout, Precision, to_yaml, validate
from pretrain.data.synthetic import synthetic_batches
from pretrain.metrics import MetricsWriter, peak_flops, peak_memory_gib, throughput
from pretrain.model.llama import Llama, cross_entropy
from pretrain.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    """What a finished run reports back (rank-independent values)."""

    steps: int
    tokens: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean loss, at logged steps
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm, likewise


def total_steps(config: Config) -> int:
    """Optimizer steps of the run: train.max_steps, or fewer when the token budget ends first."""
    tokens_per_step = config.train.global_batch_size * config.model.seq_len
    if config.train.max_tokens:
        return min(config.train.max_steps, -(-config.train.max_tokens // tokens_per_step))
    return config.train.max_steps


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    if precision == Precision.auto:
        return Precision.bf16 if device.type == "cuda" else Precision.fp32
    return precision


def deepspeed_config(config: Config, layout: Layout, precision: Precision) -> dict:
    """The DeepSpeed engine settings, all derived from our config (never edited by hand)."""
    zero = {"stage": config.optimizer.zero_stage}
    if config.optimizer.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = config.optimizer.zero3_param_persistence_threshold
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accumulation,
        "gradient_clipping": config.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == Precision.bf16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def data_source(config: Config, context: parallel.ParallelContext):
    return synthetic_batches(config.train.seed, config.model.vocab_size, config.model.seq_len,
                             config.train.micro_batch_size, context.dp_rank, context.dp)


def train(config: Config) -> TrainResult:
    """Run training as this process's share of the job (torchrun sets the world; else 1 process).

    A process group that already exists is used and left running (several runs in one launch)."""
    layout = validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    owns_process_group = not dist.is_initialized()
    context = parallel.initialize(layout.tp, layout.pp, config.parallel.backend.value)
    try:
        return _train(config, layout, context)
    finally:
        parallel.shutdown(destroy_process_group=owns_process_group)


def _train(config: Config, layout: Layout, context: parallel.ParallelContext) -> TrainResult:
    precision = resolve_precision(config.train.precision, context.device)
    if precision == Precision.bf16 and context.device.type != "cuda":
        raise ValueError("train.precision=bf16 needs a GPU; use train.precision=fp32 (or auto) on CPU")
    steps = total_steps(config)
    log_dir = Path(config.log.dir)
    if context.rank == 0:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / "config.yaml").write_text(to_yaml(config))

    torch.manual_seed(config.train.seed)
    model = Llama(config.model, context.tp_group)
    model.init_weights(config.train.seed)
    optimizer = build_optimizer(model, config.optimizer, context.device)
    scheduler = build_scheduler(optimizer, config.schedule, steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, layout, precision), mpu=parallel.MegatronMpu(),
    )
    batches = data_source(config, context)
    metrics = MetricsWriter(log_dir, steps, enabled=context.rank == 0)
    flops_per_token = config.model.flops_per_token()
    peak = peak_flops(context.device)
    tokens_per_step = layout.global_batch_size * config.model.seq_len
    result = TrainResult(steps=0, tokens=0)

    window_start, window_steps = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=context.device)
    # DeepSpeed clips ZeRO-0 fp32 gradients without keeping the norm: measure it ourselves.
    engine_reports_norm = config.optimizer.zero_stage > 0 or precision != Precision.fp32
    for step in range(1, steps + 1):
        lr = engine.get_lr()[0]
        log_step = step % config.log.interval == 0 or step == steps
        for micro in range(layout.grad_accumulation):
            tokens, labels = (t.to(context.device, non_blocking=True) for t in next(batches))
            loss = cross_entropy(engine(tokens), labels, config.model.vocab_size)
            engine.backward(loss)
            if log_step and not engine_reports_norm and micro == layout.grad_accumulation - 1:
                grad_norm = reduced_grad_norm(model, context)
            engine.step()
            loss_sum += loss.detach()
        result.steps, result.tokens = step, result.tokens + tokens_per_step
        window_steps += 1

        if log_step:
            if engine_reports_norm:
                grad_norm = float(engine.get_global_grad_norm())
            mean_loss = _global_mean(loss_sum / layout.grad_accumulation, context)
            elapsed = time.perf_counter() - window_start
            values = {"loss": mean_loss / window_steps, "lr": lr, "grad_norm": grad_norm,
                      **throughput(tokens_per_step * window_steps, elapsed, flops_per_token, context.world_size, peak),
                      "step_time": elapsed / window_steps, "mem_peak_gib": peak_memory_gib(context.device)}
            result.losses[step], result.grad_norms[step] = values["loss"], grad_norm
            metrics.write(step, values)
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
        metrics.advance(1)
        if config.checkpoint.dir and (step == steps or (config.checkpoint.interval
                                                        and step % config.checkpoint.interval == 0)):
            engine.save_checkpoint(config.checkpoint.dir, tag=f"step_{step:08d}",
                                   client_state={"step": step, "tokens": result.tokens})
    metrics.close()
    return result


def reduced_grad_norm(model: torch.nn.Module, context: parallel.ParallelContext) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients; parameters replicated
    across TP ranks are counted once."""
    squares = torch.zeros((), device=context.device)
    for param in model.parameters():
        if param.grad is not None and (param.tensor_model_parallel or context.tp_rank == 0):
            squares += param.grad.float().pow(2).sum()
    dist.all_reduce(squares, group=context.tp_group)
    return squares.sqrt().item()


def _global_mean(value: torch.Tensor, context: parallel.ParallelContext) -> float:
    """Average over data-parallel ranks (TP peers already agree)."""
    value = value.clone()
    dist.all_reduce(value, group=context.dp_group)
    return value.item() / context.dp
