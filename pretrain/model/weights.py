"""How the model's parameters are split across tensor-parallel ranks, and how full tensors
become this rank's shards: seeded initialisation (identical at any TP size) and loading.

Every parameter is described by its full (unsharded) tensor; a rank holds the contiguous
chunk number `tp_rank` of it along its partition dimension, as megatron-core's layers expect.
"""

import math
import zlib
from collections.abc import Callable, Mapping

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from pretrain.model.args import LlamaArgs

VOCAB_PARAMETERS = ("embedding.weight", "output.weight")
# row-parallel: split along dim 1
OUTPUT_PROJECTIONS = ("attention.o_proj.weight", "mlp.down_proj.weight", "mlp.shared.down_proj.weight")
NORM_SUFFIX = "norm.weight"  # the RMSNorm weights, initialised to 1
ROUTER = "mlp.router.weight"
EXPERTS = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")  # [experts, out, in] each
ROUTER_BIAS = "mlp.router_bias_steps"  # a buffer: aux-loss-free balancing's selection biases
REPLICATED_SUFFIXES = (NORM_SUFFIX, ROUTER, *EXPERTS, ROUTER_BIAS)  # whole on every TP rank
ATTENTION_PARAMETERS = ("attention_norm.weight", "attention.qkv_proj.weight", "attention.o_proj.weight")
QK_NORM_PARAMETERS = ("attention.q_norm.weight", "attention.k_norm.weight")
MLP_PARAMETERS = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
SHARED_EXPERT_PARAMETERS = ("mlp.shared.gate_proj.weight", "mlp.shared.up_proj.weight", "mlp.shared.down_proj.weight")


def block_parameter_names(args: LlamaArgs, layer: int) -> list[str]:
    """The parameters of block `layer`, in its order."""
    if args.moe.is_moe_layer(layer):
        mlp = (ROUTER, *EXPERTS, *(SHARED_EXPERT_PARAMETERS if args.moe.shared_experts else ()))
    else:
        mlp = MLP_PARAMETERS
    return [*ATTENTION_PARAMETERS, *(QK_NORM_PARAMETERS if args.qk_norm else ()), "mlp_norm.weight", *mlp]


def buffer_names(args: LlamaArgs) -> list[str]:
    """The buffers a checkpoint must restore besides the parameters: the router biases of
    aux-loss-free balancing."""
    if not args.moe.bias_update_rate:
        return []
    return [f"layers.{i}.{ROUTER_BIAS}" for i in range(args.num_layers) if args.moe.is_moe_layer(i)]


def parameter_names(args: LlamaArgs) -> list[str]:
    """Every parameter of the single-stage model, in its order."""
    blocks = [f"layers.{i}.{name}" for i in range(args.num_layers) for name in block_parameter_names(args, i)]
    return ["embedding.weight", *blocks, "final_norm.weight", *([] if args.tie_embeddings else ["output.weight"])]

_PARTITION_DIM = {ColumnParallelLinear: 0, RowParallelLinear: 1, VocabParallelEmbedding: 0}


def _partition_dim_of(module: nn.Module) -> int | None:
    return next((dim for kind, dim in _PARTITION_DIM.items() if isinstance(module, kind)), None)


def mark_tensor_parallel(model: nn.Module) -> None:
    """Set megatron's tensor_model_parallel/partition_dim attributes on every parameter.

    DeepSpeed's gradient-norm and megatron's utilities read them to tell sharded parameters
    from replicated ones; without them the clip norm across TP ranks is wrong."""
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            dim = _partition_dim_of(module) if param_name == "weight" else None
            if not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, dim is not None, -1 if dim is None else dim, 1)


def drop_empty_extra_state(model: nn.Module) -> None:
    """Leave megatron's always-empty `_extra_state` entries out of state dicts (DeepSpeed's
    universal-checkpoint converter cannot handle them); megatron's layers re-add them on load."""

    def hook(_module, state_dict, _prefix, _metadata):
        for key in [k for k, v in state_dict.items() if k.endswith("._extra_state") and v is None]:
            del state_dict[key]

    model._register_state_dict_hook(hook)


def partition_dim(name: str) -> int | None:
    """The dimension along which a parameter (by its single-stage name) is split across TP
    ranks: None for the replicated norms, router and experts, 1 for the row-parallel output
    projections, else 0."""
    if name.endswith(REPLICATED_SUFFIXES):
        return None
    return 1 if name.endswith(OUTPUT_PROJECTIONS) else 0


def full_shape(param: torch.Tensor, tp: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if param.tensor_model_parallel:
        shape[param.partition_dim] *= tp
    if hasattr(param, "first_expert"):  # this expert-parallel rank's experts (pretrain.model.expert_parallel)
        shape[0] = param.num_experts
    return tuple(shape)


def shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's slice of a full tensor."""
    if hasattr(param, "first_expert"):
        return full.narrow(0, param.first_expert, param.shape[0])
    if not param.tensor_model_parallel:
        return full
    return full.chunk(tp, dim=param.partition_dim)[tp_rank]


def parameter_seed(seed: int, name: str) -> int:
    """A seed per parameter name, so that each full tensor is the same whatever the layout."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def initialize(model: nn.Module, seed: int, std: float, num_layers: int, tp_rank: int, tp: int,
               canonical: Callable[[str], str] = lambda name: name) -> None:
    """Normal(0, std) weights (output projections, experts' down_proj too, scaled by 1/sqrt(2 x layers)),
    norms at 1.

    The full tensor of each parameter is drawn from a generator seeded by its name, then sliced,
    so TP1 and TP8 start from identical weights. Rows past the vocabulary (padding) are drawn
    last in row-major order, so the real rows do not depend on the padding either. `canonical`
    maps a module's own parameter names (a pipeline stage's) to the single-stage model's."""
    for module_name, param in model.named_parameters():
        name = canonical(module_name)
        if name.endswith(NORM_SUFFIX):
            param.fill_(1.0)
            continue
        scale = std / math.sqrt(2 * num_layers) if name.endswith((*OUTPUT_PROJECTIONS, EXPERTS[2])) else std
        generator = torch.Generator().manual_seed(parameter_seed(seed, name))
        full = torch.empty(full_shape(param, tp)).normal_(0.0, scale, generator=generator)
        param.copy_(shard(full, param, tp_rank, tp))


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full_tensors: Mapping[str, torch.Tensor], tp_rank: int, tp: int,
                         canonical: Callable[[str], str] = lambda name: name) -> None:
    """Copy full (unsharded) tensors, keyed by single-stage names, into this rank's shards (a
    pipeline stage takes only its own). Vocabulary tensors may have fewer rows than the padded
    embedding: the padding rows are zero-filled. Tensors are read one at a time, so a lazy
    mapping keeps memory low. A name this module needs but `full_tensors` lacks is an error."""
    params = {canonical(name): param for name, param in model.named_parameters()}
    missing = params.keys() - full_tensors.keys()
    if missing:
        raise KeyError(f"state dict does not match the model: missing {sorted(missing)}")
    for name, param in params.items():
        expected = full_shape(param, tp)
        full = full_tensors[name]
        if name.endswith(VOCAB_PARAMETERS) and full.shape[0] < expected[0] and full.shape[1:] == expected[1:]:
            full = torch.cat([full, full.new_zeros(expected[0] - full.shape[0], *expected[1:])])
        if tuple(full.shape) != expected:
            raise ValueError(f"{name}: full tensor has shape {tuple(full.shape)}, the model expects {expected}")
        param.copy_(shard(full, param, tp_rank, tp))
