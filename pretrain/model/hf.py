"""Hugging Face LlamaForCausalLM <-> our parameter names: one table, plus the explicit
regrouping of the fused, group-major qkv projection into q/k/v (see Attention)."""

import torch

from pretrain.model.args import LlamaArgs

# Ours -> Hugging Face, per block ("{i}" = layer number) and for the whole model.
BLOCK_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
MODEL_NAMES = {
    "embedding.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
QKV = "attention.qkv_proj.weight"
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


def split_qkv(qkv: torch.Tensor, args: LlamaArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-major [g0: q.., k, v | g1: q.., k, v | ...] -> q [heads*d], k and v [kv_heads*d]."""
    groups, d = args.num_kv_heads, args.head_dim
    per_group = qkv.view(groups, args.num_heads // groups + 2, d, args.hidden_size)
    q, k, v = per_group.split([args.num_heads // groups, 1, 1], dim=1)
    return (q.reshape(-1, args.hidden_size), k.reshape(-1, args.hidden_size), v.reshape(-1, args.hidden_size))


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """Inverse of split_qkv: query heads of KV group g are heads g*n .. g*n+n-1 (n = heads/kv_heads)."""
    groups, d = args.num_kv_heads, args.head_dim
    q = q.view(groups, args.num_heads // groups, d, args.hidden_size)
    k = k.view(groups, 1, d, args.hidden_size)
    v = v.view(groups, 1, d, args.hidden_size)
    return torch.cat([q, k, v], dim=1).reshape(-1, args.hidden_size)


def to_hf(ours: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Full, unpadded tensors under our names -> Hugging Face names."""
    hf = {MODEL_NAMES[name]: ours[name] for name in MODEL_NAMES if name in ours}
    for i in range(args.num_layers):
        for name, hf_name in BLOCK_NAMES.items():
            hf[f"model.layers.{i}.{hf_name}"] = ours[f"layers.{i}.{name}"]
        for hf_name, tensor in zip(HF_QKV, split_qkv(ours[f"layers.{i}.{QKV}"], args)):
            hf[f"model.layers.{i}.{hf_name}"] = tensor
    return hf


def from_hf(hf: dict[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our names (the inverse of to_hf)."""
    ours = {name: hf[hf_name] for name, hf_name in MODEL_NAMES.items()
            if not (name == "output.weight" and args.tie_embeddings)}
    for i in range(args.num_layers):
        for name, hf_name in BLOCK_NAMES.items():
            ours[f"layers.{i}.{name}"] = hf[f"model.layers.{i}.{hf_name}"]
        q, k, v = (hf[f"model.layers.{i}.{hf_name}"] for hf_name in HF_QKV)
        ours[f"layers.{i}.{QKV}"] = merge_qkv(q, k, v, args)
    return ours
