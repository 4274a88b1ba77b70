"""Pretrain Llama-style language models with tensor, pipeline and data parallelism."""

import warnings

__version__ = "0.1.0"

# megatron-core announces at import that it falls back to plain PyTorch without Apex and
# TransformerEngine; that is our intended setup, not something users should act on.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
