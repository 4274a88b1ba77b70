"""How a built model runs, applied from outside (torchtitan's parallelize step): activation
checkpointing, the output head's loss chunk, and torch.compile of each block. Works on a Llama
and on the pipeline stages cut from one; none of it changes what the model computes."""

from torch import nn

from pretrain.model.args import ExecutionArgs
from pretrain.model.llama import Attention, Block, Llama
from pretrain.model.pipeline import HeadLoss


def apply_execution(model: nn.Module, execution: ExecutionArgs, compile_blocks: bool) -> None:
    """Set `execution` on `model`; `compile_blocks` is execution.compile resolved for this run
    (its `auto` depends on the device and the ZeRO stage)."""
    for module in model.modules():
        if isinstance(module, (Block, Attention)):
            module.recompute = execution.activation_checkpointing
        if isinstance(module, Llama):
            module.loss_chunk_tokens = execution.loss_chunk_tokens
    if isinstance(getattr(model, "loss_fn", None), HeadLoss):
        model.loss_fn.chunk_tokens = execution.loss_chunk_tokens
    if compile_blocks:  # regional compilation: parameter names stay; one graph serves every block of a shape
        for module in model.modules():
            if isinstance(module, Block):
                module.compile()
