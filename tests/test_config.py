"""Configuration loading and validation: every rule's error and message."""

import subprocess
import sys

import pytest

from conftest import ROOT, child_env
from pretrain.config import ConfigError, Schedule, load, validate

TINY = ROOT / "configs" / "tiny.yaml"


def error_of(overrides: list[str], world_size: int = 1, path=TINY) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(load(path, overrides), world_size)
    return str(caught.value)


def test_yaml_then_overrides_and_derived_layout():
    config = load(TINY, ["parallel.tp=2", "train.global_batch_size=32", "schedule.kind=wsd"])
    assert config.model.hidden_size == 64 and config.parallel.tp == 2 and config.schedule.kind == Schedule.wsd
    layout = validate(config, world_size=4)
    assert (layout.tp, layout.pp, layout.dp) == (2, 1, 2)
    assert layout.grad_accumulation == 32 // (config.train.micro_batch_size * 2)


def test_vocab_padding_to_multiple_of_128_times_tp():
    assert load(TINY, ["model.vocab_size=512"]).model.padded_vocab_size(tp=2) == 512
    assert load(TINY, ["model.vocab_size=1000"]).model.padded_vocab_size(tp=1) == 1024
    assert load(TINY, ["model.vocab_size=1100"]).model.padded_vocab_size(tp=2) == 1280
    assert "model.vocab_pad_multiple=0 must be at least 1" in error_of(["model.vocab_pad_multiple=0"])


def test_unknown_key_and_wrong_type_name_the_key():
    assert "unknown setting 'model.hiden_size'" in error_of(["model.hiden_size=5"])
    assert "setting 'train.max_steps'" in error_of(["train.max_steps=many"])
    assert "setting 'schedule.kind'" in error_of(["schedule.kind=linear"])


def test_unknown_key_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_step: 5\n")
    assert "unknown setting 'train.max_step'" in error_of([], path=path)


def test_missing_config_file(tmp_path):
    assert "does not exist" in error_of([], path=tmp_path / "nope.yaml")


@pytest.mark.parametrize("overrides, world_size, expected", [
    (["parallel.tp=3"], 3, "model.num_heads=4 is not divisible by parallel.tp=3: choose parallel.tp among [1, 2, 4]"),
    (["parallel.tp=4"], 4, "model.num_kv_heads=2 is not divisible by parallel.tp=4"),
    (["model.ffn_hidden_size=175", "parallel.tp=2"], 2, "model.ffn_hidden_size=175 is not divisible by parallel.tp=2"),
    (["model.num_heads=3"], 1, "model.hidden_size=64 must be divisible by model.num_heads=3"),
    (["model.hidden_size=96", "model.num_heads=32", "model.num_kv_heads=32"], 1, "must be even for RoPE"),
    (["model.num_kv_heads=3"], 1, "model.num_heads=4 must be a multiple of model.num_kv_heads=3"),
    (["parallel.pp=8"], 8, "parallel.pp=8 exceeds model.num_layers=4"),
    (["parallel.pp=2", "optimizer.zero_stage=0"], 2,
     "optimizer.zero_stage=0 cannot be combined with parallel.pp=2: DeepSpeed then computes the gradient-clipping"),
    (["parallel.pp=2", "parallel.pp_partition=layers"], 2, "setting 'parallel.pp_partition'"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp x parallel.pp = 2 x 1"),
    (["train.global_batch_size=12"], 2,
     "train.global_batch_size=12 must be a multiple of train.micro_batch_size (4) x data-parallel size (2) = 8"),
    (["optimizer.zero_stage=4"], 1, "optimizer.zero_stage=4 must be 0, 1, 2 or 3"),
    (["optimizer.lr=0"], 1, "optimizer.lr=0.0 must be positive"),
    (["optimizer.grad_clip=-1"], 1, "optimizer.grad_clip=-1.0 must be >= 0"),
    (["schedule.min_lr_ratio=2"], 1, "schedule.min_lr_ratio=2.0 must be in [0, 1]"),
    (["schedule.decay_fraction=0"], 1, "schedule.decay_fraction=0.0 must be in (0, 1]"),
    (["schedule.warmup_steps=-1"], 1, "schedule.warmup_steps=-1 must be >= 0"),
    (["train.max_tokens=-5"], 1, "train.max_tokens=-5 must be >= 0"),
    (["train.max_steps=0"], 1, "train.max_steps=0 must be at least 1"),
    (["log.interval=0"], 1, "log.interval=0 must be at least 1"),
    (["checkpoint.interval=-1"], 1, "checkpoint.interval=-1 must be >= 0"),
])
def test_rule_messages(overrides, world_size, expected):
    assert expected in error_of(overrides, world_size)


@pytest.mark.multiprocess
def test_zero2_with_pipeline_names_both_settings_from_the_cli():
    """The acceptance check: fails at once (before any process group), naming both settings."""
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", "--config", str(TINY), "parallel.pp=2", "optimizer.zero_stage=2"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "optimizer.zero_stage=2 cannot be combined with parallel.pp=2" in proc.stderr
    assert "set optimizer.zero_stage=1 or parallel.pp=1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiprocess
def test_print_config_shows_resolved_values():
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", "--config", str(TINY), "--print-config", "train.max_steps=7"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max_steps: 7" in proc.stdout and "grad_accumulation=4" in proc.stdout
