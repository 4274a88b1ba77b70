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
                      dp_rank: int, dp_size: int, start_sample: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless {"tokens", "labels"} micro-batches for one data-parallel rank.

    Global micro-batch k holds samples k*m .. k*m+m-1 and belongs to rank k % dp, as for shards."""
    micro_batch = start_sample // micro_batch_size + dp_rank
    while True:
        first = micro_batch * micro_batch_size
        samples = torch.stack([synthetic_sample(seed, first + i, vocab_size, seq_len + 1)
                               for i in range(micro_batch_size)])
        yield {"tokens": samples[:, :-1], "labels": samples[:, 1:]}
        micro_batch += dp_size
