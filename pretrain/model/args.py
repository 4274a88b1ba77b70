"""Shape and numerics of the Llama model: the only input the model takes besides its TP group.
How it runs (checkpointing, compilation, loss chunks) is applied from outside: pretrain.model.execution."""

import enum
from dataclasses import dataclass, field
from typing import Any


class RopeScalingKind(str, enum.Enum):
    none = "none"  # plain RoPE
    llama3 = "llama3"  # Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between
    yarn = "yarn"  # YaRN: per-frequency ramp between interpolation and extrapolation, cos/sin scaled


@dataclass
class RopeScaling:
    """RoPE scaling for context extension (Hugging Face's rope_parameters / rope_scaling)."""

    kind: RopeScalingKind = RopeScalingKind.none  # rope_type
    factor: float = 1.0  # factor: the new length over original_seq_len
    original_seq_len: int = 0  # original_max_position_embeddings: the length the model was trained at
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_seq_len / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_seq_len / this are kept
    beta_fast: float = 32.0  # yarn: rotations within original_seq_len above which a frequency is kept
    beta_slow: float = 1.0  # yarn: rotations below which a frequency is interpolated


class RouterScoring(str, enum.Enum):
    softmax = "softmax"  # Mixtral, Qwen3-MoE: a softmax over the experts
    sigmoid = "sigmoid"  # DeepSeek-V3: each expert's own sigmoid


@dataclass
class MoEArgs:
    """Mixture of experts in the MLP of every block after the first `first_dense_layers`
    (pretrain.model.moe); num_experts=0 is a dense model. Hugging Face names in comments."""

    num_experts: int = 0  # num_experts / num_local_experts; 0 = dense
    top_k: int = 2  # num_experts_per_tok: experts each token is routed to
    expert_ffn_hidden_size: int = 0  # moe_intermediate_size: each expert's SwiGLU width
    shared_experts: int = 0  # experts every token also passes through, unweighted (DeepSeek): one SwiGLU this many wide
    first_dense_layers: int = 0  # mlp_only_layers = [0 .. n-1]: blocks with the dense MLP (model.ffn_hidden_size)
    scoring: RouterScoring = RouterScoring.softmax  # how router logits become expert scores
    renormalize: bool = True  # norm_topk_prob: the top-k scores divided by their sum
    # aux-loss-free balancing (DeepSeek-V3: 1e-3): experts are chosen by score + a bias that, after each step,
    # moves by this towards the mean load (up for experts below it, down above); 0 = off
    bias_update_rate: float = 0.0
    aux_loss_coeff: float = 0.0  # load-balancing loss (Switch): coeff x experts x sum_e f_e P_e per MoE block
    z_loss_coeff: float = 0.0  # router z-loss (ST-MoE): coeff x mean logsumexp(router logits)^2 per MoE block
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes ceil(factor x tokens x top_k / experts)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer >= self.first_dense_layers


@dataclass
class LlamaArgs:
    """Llama hyper-parameters, named after what they mean (Hugging Face names in comments)."""

    vocab_size: int = 0  # vocab_size; 0 = the data's tokenizer's (the embedding is padded beyond it)
    hidden_size: int = 2048  # hidden_size
    num_layers: int = 22  # num_hidden_layers
    num_heads: int = 32  # num_attention_heads
    num_kv_heads: int = 4  # num_key_value_heads
    ffn_hidden_size: int = 5632  # intermediate_size
    seq_len: int = 2048  # training sequence length (max_position_embeddings on export)
    rope_theta: float = 10000.0  # rope_theta
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)  # rope_parameters (rope_scaling before v5)
    norm_eps: float = 1e-5  # rms_norm_eps
    tie_embeddings: bool = False  # tie_word_embeddings
    init_std: float = 0.02  # initializer_range
    vocab_pad_multiple: int = 128  # embedding rows are padded to a multiple of this times TP
    z_loss: float = 0.0  # PaLM's z-loss: z_loss x log(Z)^2 per token added to the training loss (PaLM: 1e-4)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3, OLMo 2): q_norm, k_norm
    moe: MoEArgs = field(default_factory=MoEArgs)  # mixture-of-experts MLPs

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Embedding rows: the vocabulary rounded up so that every TP rank holds an equal slice."""
        multiple = self.vocab_pad_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def _mlp_weights(self, active: bool) -> int:
        """Matmul weights of all blocks' MLPs: every expert, or (`active`) those a token passes through."""
        h, moe = self.hidden_size, self.moe
        moe_layers = sum(moe.is_moe_layer(layer) for layer in range(self.num_layers))
        experts = (moe.top_k if active else moe.num_experts) + moe.shared_experts
        moe_mlp = 3 * h * moe.expert_ffn_hidden_size * experts + moe.num_experts * h  # experts, router
        return (self.num_layers - moe_layers) * 3 * h * self.ffn_hidden_size + moe_layers * moe_mlp

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the unpadded model (the output head counts unless tied; every expert)."""
        h, kv_dim = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h * 2 + h * kv_dim * 2
        per_layer = attention + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        head = 0 if self.tie_embeddings else self.vocab_size * h
        total = self.num_layers * per_layer + self._mlp_weights(active=False) + h + head
        return total + (self.vocab_size * h if include_embedding else 0)

    def num_active_params(self) -> int:
        """num_params() counting, of a mixture of experts, only the experts a token passes through."""
        return self.num_params() - self._mlp_weights(active=False) + self._mlp_weights(active=True)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM convention: 6 x (weights used in matmuls, head included;
        of a mixture of experts those a token passes through) plus 12 x layers x hidden x seq_len for
        attention scores and values (causal not halved)."""
        h, kv_dim = self.hidden_size, self.num_kv_heads * self.head_dim
        matmul_weights = self.num_layers * (2 * h * h + 2 * h * kv_dim) + self._mlp_weights(active=True)
        matmul_weights += self.vocab_size * h
        return 6 * matmul_weights + 12 * self.num_layers * h * self.seq_len


@dataclass
class ExecutionArgs:
    """How the model runs, never what it computes: applied to a built model from outside
    (pretrain.model.execution), like torchtitan's parallelize step."""

    activation_checkpointing: bool = False  # recompute each block in the backward pass
    compile: Any = "auto"  # torch.compile each block: true, false or auto (GPU, unless ZeRO-3)
    loss_chunk_tokens: int = 4096  # tokens whose logits the output head + loss compute at a time
