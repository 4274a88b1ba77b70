"""Text generation: prompts are left-padded into one batch and prefilled, then each step feeds one
token per prompt, attending to a KV cache of the past (or, without a cache, recomputing the whole
sequence); RoPE positions count each prompt's own tokens. Greedy, or sampling with temperature,
top-k and top-p from a seeded generator of its own (training's random state is not touched);
a prompt stops at EOS.

The model runs where it is: `ModelDecoder` on a Llama at any TP size (every TP rank gathers the
logits and samples the same tokens), `PipelineDecoder` on the stages of a pipeline, passing the
hidden states stage to stage and the sampled tokens from the last stage back to all."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from pretrain.errors import UserError
from pretrain.model.args import LlamaArgs
from pretrain.model.llama import Block, KVCache, Llama


class GenerateError(UserError, ValueError):
    """A setting of `pretrain generate` (or a --device) that cannot work; the message names the option."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "--max-new-tokens": (self.max_new_tokens, self.max_new_tokens >= 1, "must be at least 1"),
            "--temperature": (self.temperature, math.isfinite(self.temperature) and self.temperature >= 0,
                              "must be a number >= 0 (0: greedy; e.g. 0.8 to sample)"),
            "--top-k": (self.top_k, self.top_k >= 0, "must be >= 0 (0: no top-k cut)"),
            "--top-p": (self.top_p, 0 < self.top_p <= 1, "must be in (0, 1] (1: no top-p cut; e.g. 0.95)"),
        }
        for option, (value, ok, rule) in checks.items():
            if not ok:
                raise GenerateError(f"{option} {value} {rule}")


def _logits(hidden: torch.Tensor, weight: torch.Tensor, tp_group, vocab_size: int) -> torch.Tensor:
    """The last position's logits over the whole (unpadded) vocabulary, in fp32, on every TP rank."""
    local = (hidden[:, -1] @ weight.t()).float()
    if tp_group.size() > 1:  # megatron's gather assumes CUDA
        slices = [torch.empty_like(local) for _ in range(tp_group.size())]
        dist.all_gather(slices, local, group=tp_group)
        local = torch.cat(slices, dim=-1)
    return local[:, :vocab_size]


class ModelDecoder:
    """Decoding with a whole Llama (at any TP size)."""

    def __init__(self, model: Llama):
        self.model, self.caches = model, None

    @property
    def device(self) -> torch.device:
        return self.model.embedding.weight.device

    def reset(self, batch: int, capacity: int | None) -> None:
        """Fresh caches for `capacity` positions (None: decode without a cache)."""
        weight = self.model.embedding.weight
        self.caches = None if capacity is None else [
            block.new_cache(batch, capacity, weight.dtype, weight.device) for block in self.model.layers]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        x = self.model.embedding(tokens)
        for index, block in enumerate(self.model.layers):
            x = block.decode(x, positions, mask, self.caches[index] if self.caches else None)
        hidden = self.model.final_norm(x)
        return _logits(hidden, self.model.output_weight(), self.model.tp_group, self.model.args.vocab_size)

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # every TP rank sampled the same tokens from the same logits and seed


class PipelineDecoder:
    """Decoding with this rank's stage of a pipeline (pretrain.model.pipeline): its ranks of one
    data-parallel replica call step() and share() together."""

    def __init__(self, stage: nn.Module, args: LlamaArgs, tp_group, head_weight: torch.Tensor | None):
        from pretrain.model.pipeline import EmbeddingStage, FinalNormStage

        self.args, self.tp_group, self.head_weight = args, tp_group, head_weight
        functions = stage.forward_funcs
        self.embedding = next((f.embedding for f in functions if isinstance(f, EmbeddingStage)), None)
        self.blocks = [f for f in functions if isinstance(f, Block)]
        self.final_norm = next((f.final_norm for f in functions if isinstance(f, FinalNormStage)), None)
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        self.dtype = next(stage.parameters()).dtype
        self.device = next(stage.parameters()).device
        self.caches = None

    def reset(self, batch: int, capacity: int | None) -> None:
        self.caches = None if capacity is None else [
            block.new_cache(batch, capacity, self.dtype, self.device) for block in self.blocks]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if self.first:
            x = self.embedding(tokens)
        else:
            x = torch.empty(*tokens.shape, self.args.hidden_size, dtype=self.dtype, device=self.device)
            dist.recv(x, src=parallel_state.get_pipeline_model_parallel_prev_rank())
        for index, block in enumerate(self.blocks):
            x = block.decode(x, positions, mask, self.caches[index] if self.caches else None)
        if not self.last:
            dist.send(x.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return _logits(self.final_norm(x), self.head_weight, self.tp_group, self.args.vocab_size)

    def share(self, tokens: torch.Tensor) -> torch.Tensor:
        dist.broadcast(tokens, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        return tokens


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[batch, vocab] fp32 logits -> [batch] token ids."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        # drop a token when the tokens more likely than it already hold top_p of the mass
        probabilities = ordered.softmax(dim=-1)
        drop = probabilities.cumsum(dim=-1) - probabilities >= sampling.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(decoder, prompts: list[list[int]], sampling: Sampling, eos_id: int, pad_id: int,
             use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each prompt (up to, without, its EOS)."""
    if not prompts or any(not prompt for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    device, batch, longest = decoder.device, len(prompts), max(map(len, prompts))
    total = longest + sampling.max_new_tokens
    tokens = torch.full((batch, total), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at column `longest`
        tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, device=device)
        valid[row, longest - len(prompt):longest] = True
    positions = (valid.cumsum(dim=1) - 1).clamp(min=0)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    itself = torch.eye(total, dtype=torch.bool, device=device)
    generator = torch.Generator(device).manual_seed(sampling.seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    decoder.reset(batch, total if use_cache else None)
    start, end = 0, longest
    for _ in range(sampling.max_new_tokens):
        # queries start..end see keys 0..end that are real tokens; a padding query sees itself
        mask = causal[start:end, :end] & valid[:, None, :end] | itself[start:end, :end]
        logits = decoder.step(tokens[:, start:end], positions[:, start:end], mask[:, None])
        chosen = sample(logits, sampling, generator) if logits is not None else torch.empty(
            batch, dtype=torch.long, device=device)
        chosen = decoder.share(chosen)
        chosen = chosen.masked_fill(finished, pad_id)
        tokens[:, end], valid[:, end] = chosen, ~finished
        positions[:, end] = positions[:, end - 1] + 1
        finished |= chosen == eos_id
        if bool(finished.all()):
            break
        start, end = (end, end + 1) if use_cache else (0, end + 1)
    new = tokens[:, longest:end + 1].tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in new]
