"""The optimizer (AdamW, or Muon on the hidden matrices), its parameter groups, and learning-rate
schedules."""

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pretrain.config import OptimizerConfig, OptimizerName, Schedule, ScheduleConfig
from pretrain.model.args import LlamaArgs
from pretrain.model.hf import QKV, merge_qkv, split_qkv
from pretrain.model.weights import VOCAB_PARAMETERS
from pretrain.muon import Matrix, Muon, MuonSettings


def parameter_groups(model: nn.Module, weight_decay: float,
                     muon: Mapping[nn.Parameter, Matrix] | None = None) -> list[dict]:
    """Weight decay on matrices (projections, embeddings) only, never on norms or biases. The
    matrices in `muon` form a first group of their own, marked for Muon; with them, groups left
    empty (a pipeline stage without embedding or head) are dropped."""
    own, decay, no_decay = [], [], []
    for param in model.parameters():
        if param.requires_grad:
            (own if muon is not None and param in muon else decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if muon is None:
        return groups
    groups = [{"params": own, "weight_decay": weight_decay, "muon": True}] + [{**g, "muon": False} for g in groups]
    return [group for group in groups if group["params"]]


def muon_matrices(model: nn.Module, args: LlamaArgs) -> dict[nn.Parameter, Matrix]:
    """The matrices Muon trains: every 2-D parameter but the vocabulary's (embedding, output
    head), the fused qkv projection orthogonalised as q, k and v."""
    qkv = Matrix(0, split=partial(split_qkv, args=args), merge=partial(merge_qkv, args=args))
    return {param: qkv if name.endswith(QKV) else Matrix(param.partition_dim)
            for name, param in model.named_parameters()
            if param.requires_grad and param.ndim == 2 and not name.endswith(VOCAB_PARAMETERS)}


def build_optimizer(model: nn.Module, config: OptimizerConfig, args: LlamaArgs, tp_group: dist.ProcessGroup,
                    ns_dtype: torch.dtype) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel; pretrain.update relies on its grad_scale/found_inf inputs),
    or Muon, which takes both too, on the hidden matrices with that AdamW on the rest."""
    betas = (config.beta1, config.beta2)
    if config.name == OptimizerName.adamw:
        groups = parameter_groups(model, config.weight_decay)
        if any(is_moe_param(param) for param in model.parameters()):  # expert parallelism: DeepSpeed's MoE groups
            named = [{**group, "name": name} for group, name in zip(groups, ("decay", "no_decay"))]
            groups = [group for group in split_params_into_different_moe_groups_for_optimizer(named) if group["params"]]
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas, eps=config.eps, fused=True)
    matrices = muon_matrices(model, args)
    settings = MuonSettings(momentum=config.muon_momentum, nesterov=config.muon_nesterov, ns_steps=config.muon_ns_steps,
                            ns_coefficients=tuple(config.muon_ns_coefficients), update_rms=config.muon_update_rms,
                            ns_dtype=ns_dtype)
    return Muon(parameter_groups(model, config.weight_decay, matrices), matrices, settings, tp_group, lr=config.lr,
                betas=betas, eps=config.eps)


def lr_multiplier(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr for the optimizer step with 0-based index `step`."""
    warmup, floor = schedule.warmup_steps, schedule.min_lr_ratio
    decay_start = total_steps - schedule.decay_fraction * total_steps

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.kind == Schedule.constant:
            return 1.0
        if schedule.kind == Schedule.wsd:
            if step < decay_start:
                return 1.0
            progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
            return 1.0 - (1.0 - floor) * progress
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(schedule, total_steps))
