"""Sequence and context parallelism, applied to a built model from outside (as execution.py applies
the execution settings): which modules hold seq/tp tokens per TP rank, and which attend across a
context-parallel group. Works on a Llama and on the pipeline stages cut from one; neither changes
what the model computes."""

import torch.distributed as dist
from torch import nn

from pretrain.model.llama import Attention, Llama, RMSNorm, SwiGLU
from pretrain.model.moe import MoE
from pretrain.model.pipeline import EmbeddingStage, HeadLoss


def apply_sequence_parallel(model: nn.Module, tp_group: dist.ProcessGroup) -> None:
    """Outside the tensor-parallel layers each rank of `tp_group` holds seq/tp of the tokens; the
    replicated norm weights sum their gradients over the group."""
    for module in model.modules():
        if isinstance(module, (Attention, SwiGLU, MoE, Llama, EmbeddingStage)):
            module.sequence_parallel = True
        if isinstance(module, RMSNorm):
            module.grad_reduce_group = tp_group
    if isinstance(getattr(model, "loss_fn", None), HeadLoss):
        model.loss_fn.sequence_parallel = True


def apply_context_parallel(model: nn.Module, cp_group: dist.ProcessGroup) -> None:
    """Each rank of `cp_group` holds its chunks of every sequence: attention reads the keys and
    values of all of them, and the loss is the mean over the whole sequence."""
    for module in model.modules():
        if isinstance(module, (Attention, Llama)):
            module.cp_group = cp_group
    if isinstance(getattr(model, "loss_fn", None), HeadLoss):
        model.loss_fn.cp_group = cp_group
