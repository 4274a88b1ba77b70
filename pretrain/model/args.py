"""Shape and numerics of the Llama model: the only input the model takes besides its TP group.
How it runs (checkpointing, compilation, loss chunks) is applied from outside: pretrain.model.execution."""

from dataclasses import dataclass
from typing import Any


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
    norm_eps: float = 1e-5  # rms_norm_eps
    tie_embeddings: bool = False  # tie_word_embeddings
    init_std: float = 0.02  # initializer_range
    vocab_pad_multiple: int = 128  # embedding rows are padded to a multiple of this times TP
    z_loss: float = 0.0  # PaLM's z-loss: z_loss x log(Z)^2 per token added to the training loss (PaLM: 1e-4)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Embedding rows: the vocabulary rounded up so that every TP rank holds an equal slice."""
        multiple = self.vocab_pad_multiple * tp
        return -(-self.vocab_size // multiple) * multiple

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count of the unpadded model (the output head counts unless tied)."""
        h, kv_dim = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * h * 2 + h * kv_dim * 2
        mlp = 3 * h * self.ffn_hidden_size
        per_layer = attention + mlp + 2 * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        total = self.num_layers * per_layer + h + head
        return total + (self.vocab_size * h if include_embedding else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, PaLM convention: 6 x (weights used in matmuls, head included)
        plus 12 x layers x hidden x seq_len for attention scores and values (causal not halved)."""
        h, kv_dim = self.hidden_size, self.num_kv_heads * self.head_dim
        matmul_weights = self.num_layers * (2 * h * h + 2 * h * kv_dim + 3 * h * self.ffn_hidden_size)
        matmul_weights += self.vocab_size * h
        return 6 * matmul_weights + 12 * self.num_layers * h * self.seq_len


@dataclass
class ExecutionArgs:
    """How the model runs, never what it computes: applied to a built model from outside
    (pretrain.model.execution), like torchtitan's parallelize step."""

    activation_checkpointing: bool = False  # recompute each block in the backward pass
    compile: Any = "auto"  # torch.compile each block: true, false or auto (GPU, unless ZeRO-3)
    loss_chunk_tokens: int = 4096  # tokens whose logits the output head + loss compute at a time
