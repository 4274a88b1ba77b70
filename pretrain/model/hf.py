"""Hugging Face causal LMs <-> our parameter names and config: one name table per architecture
(LlamaForCausalLM; Qwen3ForCausalLM for models with qk_norm; for mixtures of experts
Qwen3MoeForCausalLM with qk_norm and MixtralForCausalLM without), the explicit regrouping of the
fused, group-major qkv projection into q/k/v (see Attention) and of our stacked expert tensors
into one tensor per expert, and the config fields, with every variant we do not implement
refused by name."""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

import torch

from pretrain.errors import UserError
from pretrain.model.args import LlamaArgs, MoEArgs, RopeScaling, RopeScalingKind, RouterScoring
from pretrain.model.weights import EXPERTS

# Ours -> Hugging Face, per block ("{i}" = layer number) and for the whole model.
BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
DENSE_MLP_NAMES = {name: BLOCK_NAMES.pop(name) for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight",
                                                             "mlp.down_proj.weight")}
QK_NORM_NAMES = {
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
MODEL_NAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# A mixture of experts' router, and its stacked experts -> one tensor per expert ("{e}").
QWEN3_MOE_NAMES = {
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.experts.gate_proj": "mlp.experts.{e}.gate_proj.weight",
    "mlp.experts.up_proj": "mlp.experts.{e}.up_proj.weight",
    "mlp.experts.down_proj": "mlp.experts.{e}.down_proj.weight",
}
MIXTRAL_NAMES = {
    "mlp.router.weight": "block_sparse_moe.gate.weight",
    "mlp.experts.gate_proj": "block_sparse_moe.experts.{e}.w1.weight",
    "mlp.experts.up_proj": "block_sparse_moe.experts.{e}.w3.weight",
    "mlp.experts.down_proj": "block_sparse_moe.experts.{e}.w2.weight",
}
QKV = "attention.qkv_proj.weight"
REQUIRED_CONFIG = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


@dataclass(frozen=True)
class Architecture:
    """A Hugging Face model class we export to and import from, and what our model must be for it."""

    name: str  # config.json's architectures[0]
    model_type: str
    qk_norm: bool
    moe: bool
    block_names: dict[str, str]  # ours -> Hugging Face, per block ({e}: each expert of a stacked tensor)


LLAMA = Architecture("LlamaForCausalLM", "llama", qk_norm=False, moe=False,
                     block_names=BLOCK_NAMES | DENSE_MLP_NAMES)
QWEN3 = Architecture("Qwen3ForCausalLM", "qwen3", qk_norm=True, moe=False,
                     block_names=BLOCK_NAMES | DENSE_MLP_NAMES | QK_NORM_NAMES)
QWEN3_MOE = Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=True, moe=True,
                         block_names=BLOCK_NAMES | DENSE_MLP_NAMES | QK_NORM_NAMES | QWEN3_MOE_NAMES)
MIXTRAL = Architecture("MixtralForCausalLM", "mixtral", qk_norm=False, moe=True,
                       block_names=BLOCK_NAMES | MIXTRAL_NAMES)
ARCHITECTURES = (LLAMA, QWEN3, QWEN3_MOE, MIXTRAL)


class UnsupportedModelError(UserError, ValueError):
    """A Hugging Face config describes a model this framework does not implement."""


def split_qkv(qkv: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-major [g0: q.., k, v | g1: q.., k, v | ...] -> q [heads*d], k and v [kv_heads*d]."""
    groups, d = args.num_kv_heads, args.head_dim
    per_group = qkv.view(groups, args.num_heads // groups + 2, d, args.hidden_size)
    q, k, v = per_group.split([args.num_heads // groups, 1, 1], dim=1)
    return (q.reshape(-1, args.hidden_size), k.reshape(-1, args.hidden_size), v.reshape(-1, args.hidden_size))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """Inverse of split_qkv: query heads of KV group g are heads g*n .. g*n+n-1 (n = heads/kv_heads)."""
    groups, d = args.num_kv_heads, args.head_dim
    q = q.reshape(groups, args.num_heads // groups, d, args.hidden_size)
    k = k.reshape(groups, 1, d, args.hidden_size)
    v = v.reshape(groups, 1, d, args.hidden_size)
    return torch.cat([q, k, v], dim=1).reshape(-1, args.hidden_size)


def _block_name(name: str) -> tuple[str, str] | None:
    """'layers.3.mlp.up_proj.weight' -> ('model.layers.3.', 'mlp.up_proj.weight')."""
    if not name.startswith("layers."):
        return None
    _, index, rest = name.split(".", 2)
    return f"model.layers.{index}.", rest


def architecture(args: LlamaArgs) -> Architecture:
    """The Hugging Face architecture a model of `args` is exported as: dense, Qwen3 with qk_norm, else
    Llama; a mixture of experts, Qwen3-MoE with qk_norm, else Mixtral. What none of them holds is refused."""
    moe = args.moe
    if not moe.num_experts:
        return QWEN3 if args.qk_norm else LLAMA
    problems = []
    if moe.scoring != RouterScoring.softmax or moe.bias_update_rate:
        problems.append(f"model.moe.scoring={moe.scoring.value} bias_update_rate={moe.bias_update_rate}: Qwen3MoeForCausalLM "
                        "and MixtralForCausalLM choose experts by softmax, without a selection bias")
    if moe.shared_experts:
        problems.append(f"model.moe.shared_experts={moe.shared_experts}: neither Qwen3MoeForCausalLM nor "
                        "MixtralForCausalLM has shared experts")
    if not args.qk_norm and moe.first_dense_layers:
        problems.append(f"model.moe.first_dense_layers={moe.first_dense_layers} without model.qk_norm: "
                        "MixtralForCausalLM has experts in every block (Qwen3MoeForCausalLM, with qk_norm, has "
                        "dense first blocks)")
    if not args.qk_norm and not moe.renormalize:
        problems.append("model.moe.renormalize=false without model.qk_norm: MixtralForCausalLM always renormalises "
                        "the top-k weights (Qwen3MoeForCausalLM, with qk_norm, may not)")
    if problems:
        raise UnsupportedModelError("this mixture of experts has no Hugging Face architecture to export to:\n"
                                    + "\n".join(f"  - {p}" for p in problems))
    return QWEN3_MOE if args.qk_norm else MIXTRAL


def _expert_names(hf: str, args: LlamaArgs) -> list[str]:
    return [hf.format(e=expert) for expert in range(args.moe.num_experts)] if "{e}" in hf else [hf]


def hf_names(name: str, args: LlamaArgs) -> list[str]:
    """The Hugging Face tensors one of our parameters becomes."""
    block = _block_name(name)
    if block is None:
        return [MODEL_NAMES[name]]
    prefix, rest = block
    if rest == QKV:
        return [prefix + hf for hf in HF_QKV]
    return [prefix + hf for hf in _expert_names(architecture(args).block_names[rest], args)]


def _parts(name: str, tensor: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, ...]:
    if name.endswith(QKV):
        return split_qkv(tensor, args)
    return tensor.unbind(0) if name.endswith(EXPERTS) else (tensor,)


def to_hf_tensors(name: str, tensor: torch.Tensor, args: LlamaArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """One of our full, unpadded tensors -> its Hugging Face (name, tensor) pairs."""
    yield from zip(hf_names(name, args), _parts(name, tensor, args), strict=True)


def from_hf_tensor(name: str, hf_tensor: Callable[[str], torch.Tensor], args: LlamaArgs) -> torch.Tensor:
    """Our tensor `name`, built from the Hugging Face tensors that `hf_tensor` returns by name."""
    tensors = [hf_tensor(n) for n in hf_names(name, args)]
    if name.endswith(QKV):
        return merge_qkv(*tensors, args)
    return torch.stack(tensors) if name.endswith(EXPERTS) else tensors[0]


def hf_config(args: LlamaArgs, dtype: torch.dtype, bos_id: int, eos_id: int, pad_id: int | None) -> dict:
    """config.json of the exported model (see architecture)."""
    target = architecture(args)
    return {
        "architectures": [target.name],
        "model_type": target.model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps,
        **rope_config(args),
        "attention_bias": False,
        "attention_dropout": 0.0,
        **ARCHITECTURE_CONFIG[target.name](args),
        "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _moe_config(args: LlamaArgs) -> dict:
    return {"num_experts_per_tok": args.moe.top_k, "output_router_logits": False}


# config.json fields of each architecture beyond the common ones.
ARCHITECTURE_CONFIG = {
    LLAMA.name: lambda args: {"mlp_bias": False, "pretraining_tp": 1},
    QWEN3.name: lambda args: {"use_sliding_window": False, "sliding_window": None, "max_window_layers": args.num_layers},
    QWEN3_MOE.name: lambda args: {
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": args.num_layers,
        "num_experts": args.moe.num_experts, "moe_intermediate_size": args.moe.expert_ffn_hidden_size,
        "norm_topk_prob": args.moe.renormalize, "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(args.moe.first_dense_layers)), **_moe_config(args)},
    MIXTRAL.name: lambda args: {
        "sliding_window": None, "num_local_experts": args.moe.num_experts, "router_jitter_noise": 0.0,
        "intermediate_size": args.moe.expert_ffn_hidden_size, **_moe_config(args)},
}


# Our RoPE scaling fields -> Hugging Face's rope parameters, per kind.
ROPE_FIELDS = {
    RopeScalingKind.llama3: {"factor": "factor", "original_seq_len": "original_max_position_embeddings",
                             "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"},
    RopeScalingKind.yarn: {"factor": "factor", "original_seq_len": "original_max_position_embeddings",
                           "beta_fast": "beta_fast", "beta_slow": "beta_slow"},
}
# YaRN settings of Hugging Face's we do not implement, and the values that mean "not used".
YARN_DEFAULTS = {"attention_factor": None, "mscale": None, "mscale_all_dim": None, "truncate": True}
OPTIONAL_ROPE_FIELDS = ("beta_fast", "beta_slow")  # transformers defaults them to 32 and 1, as RopeScaling does


def _transformers_major() -> int:
    try:
        return int(metadata.version("transformers").split(".")[0])
    except metadata.PackageNotFoundError:
        return 5


def rope_config(args: LlamaArgs) -> dict:
    """config.json's RoPE fields, under the key the installed transformers reads: `rope_parameters`
    (transformers 5, rope_theta inside) or `rope_theta` and `rope_scaling` (before)."""
    scaling = args.rope_scaling
    parameters = {"rope_type": "default" if scaling.kind == RopeScalingKind.none else scaling.kind.value}
    parameters |= {hf: getattr(scaling, ours) for ours, hf in ROPE_FIELDS.get(scaling.kind, {}).items()}
    if _transformers_major() >= 5:
        return {"rope_parameters": {**parameters, "rope_theta": args.rope_theta}}
    return {"rope_theta": args.rope_theta, "rope_scaling": None if scaling.kind == RopeScalingKind.none else parameters}


def _rope_scaling(rope: dict, problems: list[str]) -> RopeScaling:
    """Our RoPE scaling from Hugging Face's parameters (either spelling); what we would only approximate
    is added to `problems`."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return RopeScaling()
    if rope_type not in (kind.value for kind in ROPE_FIELDS):
        problems.append(f"rope scaling type {rope_type!r} is not implemented (only llama3 and yarn)")
        return RopeScaling()
    kind = RopeScalingKind(rope_type)
    missing = [hf for hf in ROPE_FIELDS[kind].values() if rope.get(hf) is None and hf not in OPTIONAL_ROPE_FIELDS]
    if missing:
        problems.append(f"rope scaling type {rope_type!r} gives no {', '.join(missing)}")
        return RopeScaling()
    if kind == RopeScalingKind.yarn:
        problems += [f"yarn's {key}={rope[key]!r} is not implemented (only {default!r})"
                     for key, default in YARN_DEFAULTS.items() if rope.get(key, default) != default]
    values = {ours: float(rope[hf]) for ours, hf in ROPE_FIELDS[kind].items() if rope.get(hf) is not None}
    return RopeScaling(kind=kind, **values | {"original_seq_len": int(values["original_seq_len"])})


def _source_architecture(config: dict, problems: list[str]) -> Architecture:
    """The architecture config.json names, among ARCHITECTURES (else a problem, and Llama's)."""
    by_type = {arch.model_type: arch for arch in ARCHITECTURES}
    source = by_type.get(config.get("model_type"), LLAMA)
    architectures = config.get("architectures") or [source.name]
    if config.get("model_type") not in by_type or architectures != [source.name]:
        supported = ", ".join(f"model_type {arch.model_type!r} with {arch.name}" for arch in ARCHITECTURES)
        problems.append(f"model_type={config.get('model_type')!r} architectures={architectures}: only {supported} "
                        "are supported")
    if config.get("use_sliding_window"):
        problems.append("use_sliding_window=True is not implemented (only full attention)")
    if source == MIXTRAL and config.get("sliding_window") is not None:
        problems.append(f"sliding_window={config['sliding_window']} is not implemented (only full attention)")
    if any(kind != "full_attention" for kind in config.get("layer_types") or ()):
        problems.append(f"layer_types={config['layer_types']}: only full_attention is implemented")
    return source


def _moe_args(config: dict, source: Architecture, problems: list[str]) -> MoEArgs:
    """model.moe of a Qwen3-MoE or Mixtral config (of another architecture: none)."""
    if not source.moe:
        return MoEArgs()
    experts = config.get("num_experts", config.get("num_local_experts"))
    top_k = config.get("num_experts_per_tok")
    if not isinstance(experts, int) or not isinstance(top_k, int):
        problems.append("config.json gives no integer num_experts (num_local_experts) and num_experts_per_tok")
        return MoEArgs()
    if source == MIXTRAL:
        if config.get("router_jitter_noise", 0.0):
            problems.append(f"router_jitter_noise={config['router_jitter_noise']} is not implemented (only 0)")
        return MoEArgs(num_experts=experts, top_k=top_k, expert_ffn_hidden_size=config["intermediate_size"])
    dense = list(config.get("mlp_only_layers") or [])
    if config.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
        problems.append(f"decoder_sparse_step={config.get('decoder_sparse_step')} mlp_only_layers={dense}: only "
                        "experts in every block after the first dense ones (mlp_only_layers = [0 .. n-1]) are "
                        "implemented")
    return MoEArgs(num_experts=experts, top_k=top_k, expert_ffn_hidden_size=config.get("moe_intermediate_size", 0),
                   first_dense_layers=len(dense), renormalize=bool(config.get("norm_topk_prob", False)))


def args_from_hf_config(config: dict) -> LlamaArgs:
    """Our model arguments for a Hugging Face config of an architecture in ARCHITECTURES; anything we
    would only approximate (another architecture, rope scaling other than llama3 and yarn, biases,
    another activation or head size, sliding windows, experts not in every block after the first
    dense ones, router jitter) is refused."""
    problems = []
    source = _source_architecture(config, problems)
    moe = _moe_args(config, source, problems)
    ropes = [config.get(key) or {} for key in ("rope_parameters", "rope_scaling")]  # transformers 5 / 4 spelling
    scaled = [rope for rope in ropes if rope.get("rope_type", rope.get("type", "default")) != "default"]
    if len({json.dumps({k: v for k, v in rope.items() if k != "rope_theta"}, sort_keys=True) for rope in scaled}) > 1:
        problems.append("rope_parameters and rope_scaling describe different RoPE scalings")
    rope_scaling = _rope_scaling(scaled[0] if scaled else {}, problems)
    rope = ropes[0] or ropes[1]
    missing = [key for key in REQUIRED_CONFIG if not isinstance(config.get(key), int)]
    if missing:
        raise UnsupportedModelError(f"config.json gives no integer {', '.join(missing)}: not a complete Llama config")
    for key, supported in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(key, supported) != supported:
            problems.append(f"{key}={config[key]!r} is not implemented (only {supported!r})")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, hidden // heads) or hidden % heads:
        problems.append(f"head_dim={config.get('head_dim')} with hidden_size={hidden} and {heads} heads: only "
                        "head_dim = hidden_size / num_attention_heads is implemented")
    if problems:
        raise UnsupportedModelError("this Hugging Face model cannot be converted exactly:\n"
                                    + "\n".join(f"  - {p}" for p in problems))
    return LlamaArgs(
        vocab_size=config["vocab_size"], hidden_size=hidden, num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden_size=config["intermediate_size"], seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))), rope_scaling=rope_scaling,
        norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=config.get("tie_word_embeddings", False),
        init_std=config.get("initializer_range", 0.02), qk_norm=source.qk_norm, moe=moe)
