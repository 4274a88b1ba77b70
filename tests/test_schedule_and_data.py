"""Learning-rate schedules, token budget, weight-decay groups and the synthetic source's split."""

import math

import torch

from pretrain.config import Schedule, ScheduleConfig, load, total_steps
from pretrain.data.synthetic import synthetic_batches
from pretrain.optim import lr_multiplier, parameter_groups


def test_cosine_warmup_then_decay_to_floor():
    f = lr_multiplier(ScheduleConfig(kind=Schedule.cosine, warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == 0.1 and f(9) == 1.0 and f(10) == 1.0
    assert math.isclose(f(60), 0.1 + 0.9 * 0.5)
    assert math.isclose(f(110), 0.1) and math.isclose(f(500), 0.1)


def test_constant_and_wsd():
    constant = lr_multiplier(ScheduleConfig(kind=Schedule.constant, warmup_steps=4), total_steps=100)
    assert [constant(s) for s in (0, 3, 50, 99)] == [0.25, 1.0, 1.0, 1.0]
    wsd = lr_multiplier(ScheduleConfig(kind=Schedule.wsd, warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2),
                        total_steps=100)
    assert wsd(0) == 1.0 and wsd(79) == 1.0 and math.isclose(wsd(90), 0.5) and wsd(100) == 0.0


def test_token_budget_ends_training_first():
    config = load(None, ["model.seq_len=128", "train.global_batch_size=4", "train.max_steps=100",
                         "train.max_tokens=5000"])
    assert total_steps(config) == 10  # ceil(5000 / 512)
    config.train.max_tokens = 0
    assert total_steps(config) == 100


def test_no_weight_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=True), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_synthetic_split_by_data_parallel_rank_covers_the_global_batch():
    def take(dp_rank, dp_size, micro_batches):
        source = synthetic_batches(7, 100, 16, 2, dp_rank, dp_size)
        return [next(source) for _ in range(micro_batches)]

    single = torch.cat([batch["tokens"] for batch in take(0, 1, 4)])
    split = [torch.cat([batch["tokens"] for batch in take(rank, 2, 2)]) for rank in range(2)]
    assert sorted(map(tuple, single.tolist())) == sorted(map(tuple, torch.cat(split).tolist()))
    assert not torch.equal(split[0], split[1])
    tokens, labels = take(0, 1, 1)[0].values()
    assert torch.equal(tokens[:, 1:], labels[:, :-1]) and tokens.max() < 100
