"""A synthetic token source for tests and benchmarks (`data.source=synthetic`).

Each sequence repeats a random motif of skewed token ids, so a model can learn the unigram
skew at once and the repetition through attention: the loss falls. Sample number g depends
only on (seed, g), so any data-parallel split of a global batch sees the same samples."""

from collections.abc import Iterator

import torch


def synthetic_sample(seed: int, index: int, vocab_size: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    motif_length = int(torch.randint(8, 33, (1,), generator=generator))
    skewed = torch.rand(motif_length, generator=generator) ** 3
    motif = (skewed * vocab_size).long().clamp(max=vocab_size - 1)
    return motif.repeat(-(-length // motif_length))[:length]


def synthetic_batches(seed: int, vocab_size: int, seq_len: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (tokens, labels) micro-batches for one data-parallel rank.

    Micro-batch k of the whole job holds samples k*micro*dp .. (k+1)*micro*dp - 1; this rank
    takes its contiguous share of them."""
    micro_batch = 0
    while True:
        first = (micro_batch * dp_size + dp_rank) * micro_batch_size
        samples = torch.stack([synthetic_sample(seed, first + i, vocab_size, seq_len + 1)
                               for i in range(micro_batch_size)])
        yield samples[:, :-1], samples[:, 1:]
        micro_batch += 1
