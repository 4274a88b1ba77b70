"""The model a rank trains and the DeepSpeed engine around it, both built from the config: the
whole Llama (parallel.pp=1) or this rank's pipeline stage, its initial weights, its execution
settings, the optimizer and schedule, and DeepSpeed's settings, all derived (never edited by
hand)."""

import warnings

import deepspeed
import torch
from torch import nn

from pretrain import parallel
from pretrain.checkpoint import universal_checkpoint_info
from pretrain.config import Config, Layout, OptimizerName, Precision
from pretrain.model.execution import apply_execution
from pretrain.model.expert_parallel import check_deepspeed_groups
from pretrain.model.llama import Llama
from pretrain.model.parallelize import apply_context_parallel, apply_sequence_parallel
from pretrain.model.moe import attach_router_losses
from pretrain.model.pipeline import build_pipeline, canonical_name
from pretrain.muon import Muon
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.update import DEVICE_UPDATE_STAGES


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    if precision == Precision.auto:
        return Precision.bf16 if device.type == "cuda" else Precision.fp32
    return precision


def resolve_compile(config: Config, device: torch.device) -> bool:
    """execution.compile=auto: compiled blocks on GPU, except under ZeRO-3 (its hooks break the graphs) and
    for mixtures of experts (not built yet)."""
    if config.execution.compile == "auto":
        return device.type == "cuda" and config.optimizer.zero_stage != 3 and not config.model.moe.num_experts
    return config.execution.compile


def build_model(config: Config, layout: Layout, context: parallel.ParallelContext) -> nn.Module:
    """This rank's part of the model with its seeded initial weights and execution settings."""
    if layout.pp > 1:
        if layout.grad_accumulation < layout.pp and context.rank == 0:
            warnings.warn(f"{layout.grad_accumulation} micro-batches per step for {layout.pp} pipeline stages: "
                          "most of each step is pipeline bubble; raise train.global_batch_size or lower "
                          "train.micro_batch_size")
        model = build_pipeline(config.model, context.tp_group, context.topology, config.parallel.pp_partition.value,
                               config.train.seed)
        attach_router_losses(model, layout.grad_accumulation)
    else:
        model = Llama(config.model, context.tp_group, context.ep_group)
        model.init_weights(config.train.seed)
    if layout.sequence_parallel:
        apply_sequence_parallel(model, context.tp_group)
    if layout.cp > 1:
        apply_context_parallel(model, context.cp_group)
    apply_execution(model, config.execution, resolve_compile(config, context.device))
    return model


def single_stage_names(config: Config, layout: Layout):
    """Maps the model's own parameter names to the single-stage model's (checkpoints use those)."""
    if layout.pp > 1:
        return lambda name: canonical_name(name, config.model.num_layers)
    return lambda name: name


def deepspeed_config(config: Config, layout: Layout, precision: Precision) -> dict:
    """The DeepSpeed engine settings. At DEVICE_UPDATE_STAGES, pretrain.update.DeviceUpdate
    measures, clips and skips instead of DeepSpeed. DeepSpeed calls optimizers other than the
    ones it lists (pretrain.muon.Muon) untested and wants that allowed."""
    stage = config.optimizer.zero_stage
    device_update = stage in DEVICE_UPDATE_STAGES
    zero = {"stage": stage, "compute_grad_norm": not device_update}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = config.optimizer.zero3_param_persistence_threshold
    settings = {
        "train_batch_size": layout.global_batch_size * layout.cp,  # DeepSpeed counts context-parallel ranks as replicas
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accumulation,
        "gradient_clipping": 0.0 if device_update else config.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == Precision.bf16, "check_grad_overflow": not device_update},
        "timers": {"throughput": {"enabled": False}},  # it synchronises the device twice a step
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": config.optimizer.name == OptimizerName.muon,
    }
    if layout.sequence_parallel:
        # the pipeline engine sends 1/tp of an activation per TP rank, assuming TP peers hold the same
        # one; under sequence parallelism each holds other tokens, so each sends its own whole
        settings["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return settings


def build_engine(model: nn.Module, config: Config, layout: Layout, context: parallel.ParallelContext,
                 precision: Precision, total_steps: int):
    """The DeepSpeed engine training `model` (its pipeline engine for a pipeline stage)."""
    model.universal_checkpoint_info = universal_checkpoint_info(config.model)
    ns_dtype = torch.bfloat16 if resolve_precision(config.optimizer.muon_ns_dtype, context.device) == Precision.bf16 \
        else torch.float32
    optimizer = build_optimizer(model, config.optimizer, config.model, context.tp_group, ns_dtype)
    scheduler = build_scheduler(optimizer, config.schedule, total_steps)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, layout, precision),
        mpu=None if layout.pp > 1 else parallel.MegatronMpu(),  # the pipeline module brings its own grid
    )
    if isinstance(optimizer, Muon) and config.optimizer.zero_stage in (1, 2):
        optimizer.use_zero_partitions(engine.optimizer)
    if layout.ep > 1:
        check_deepspeed_groups(layout.ep, layout.tp)
    return engine
