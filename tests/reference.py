"""Reference implementations the tests compare the package against (not part of the package):
the loss from full vocab-parallel logits, whole state dicts converted to and from Hugging Face
names, and a checkpoint's weights in one process."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from pretrain import parallel
from pretrain.convert.reader import CheckpointReader
from pretrain.model.args import LlamaArgs
from pretrain.model.llama import Llama
from pretrain.model.hf import from_hf_tensor, to_hf_tensors
from pretrain.model.loss import IGNORE_INDEX
from pretrain.model.weights import load_full_state_dict, parameter_names


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                  reduction: str = "mean") -> torch.Tensor:
    """The next-token loss from full vocab-parallel logits [..., vocab/tp] (Llama.forward without
    labels), with megatron-core's vocab_parallel_cross_entropy over its tensor-parallel group;
    padding columns are masked out of the softmax."""
    local_vocab = logits.shape[-1]
    first_column = parallel_state.get_tensor_model_parallel_rank() * local_vocab
    column_ids = torch.arange(first_column, first_column + local_vocab, device=logits.device)
    logits = logits.float().masked_fill(column_ids >= vocab_size, float("-inf"))
    valid = labels != IGNORE_INDEX
    per_token = vocab_parallel_cross_entropy(logits, labels.masked_fill(~valid, 0))
    total = (per_token * valid).sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def to_hf(ours: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Full, unpadded tensors under our names -> Hugging Face names."""
    return {hf: t for name, tensor in ours.items() for hf, t in to_hf_tensors(name, tensor, args)}


def from_hf(hf: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our names (the inverse of to_hf)."""
    return {name: from_hf_tensor(name, hf.__getitem__, args)
            for name in parameter_names(args)}


@contextmanager
def single_process_model(checkpoint: str | Path) -> Iterator[tuple[Llama, CheckpointReader]]:
    """Our model in one process (eval mode) with a checkpoint's weights, and the checkpoint's reader."""
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    try:
        reader = CheckpointReader(checkpoint)
        model = Llama(reader.args, context.tp_group).eval()
        load_full_state_dict(model, {name: reader.tensor(name) for name in reader.names()}, 0, 1)
        yield model, reader
    finally:
        parallel.shutdown()
