"""Files written before settings moved still work: a checkpoint made by commit 9f31d40 (its
stored config has model.activation_checkpointing, model.compile, model.loss_chunk_tokens and
train.inject_nan_steps) resumes to the losses that run logged and converts to Hugging Face, and
YAML files and overrides with the old names load under the new ones."""

import json
import shutil

import pytest

from conftest import TESTS
from pretrain.cli import main as cli
from pretrain.config import ConfigError, load
from pretrain.convert.reader import CheckpointReader

FIXTURE = TESTS / "fixtures" / "old-checkpoint"
# the overrides the fixture was trained with (tests/fixtures/old-checkpoint/README.md), old names included
OLD_RUN = ["data.source=synthetic", "model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2",
           "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.seq_len=16",
           "model.activation_checkpointing=true", "model.loss_chunk_tokens=8", "train.max_steps=4",
           "train.micro_batch_size=2", "train.global_batch_size=4", "log.interval=1", "checkpoint.interval=2",
           "checkpoint.keep_last=0", "optimizer.zero_stage=1", "schedule.warmup_steps=1", "data.num_workers=0"]


def test_old_names_load_under_the_new_ones(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  hidden_size: 64\n  activation_checkpointing: true\n  compile: false\n"
                   "train:\n  inject_nan_steps: [3]\n")
    with pytest.warns(FutureWarning, match="model.activation_checkpointing is now called execution.activation_checkpointing"):
        config = load(old, ["model.loss_chunk_tokens=16"])
    assert config.model.hidden_size == 64
    assert (config.execution.activation_checkpointing, config.execution.compile, config.execution.loss_chunk_tokens) \
        == (True, False, 16)
    assert config.debug.inject_nan_steps == [3]
    with pytest.raises(ConfigError, match="sets both model.compile and execution.compile: keep only execution.compile"):
        load(None, ["model.compile=true", "execution.compile=false"])


def test_a_checkpoint_written_before_the_move_converts(tmp_path):
    config = CheckpointReader(FIXTURE / "ckpt").config
    assert (config.execution.activation_checkpointing, config.execution.loss_chunk_tokens) == (True, 8)
    assert config.debug.inject_nan_steps == []
    assert cli(["convert", "to-hf", "--checkpoint", str(FIXTURE / "ckpt"), "--out", str(tmp_path / "hf"),
                "--tokenizer", "none", "--dtype", "fp32"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 32


def test_a_checkpoint_written_before_the_move_resumes_to_its_losses(tmp_path):
    from pretrain.train import train

    shutil.copytree(FIXTURE / "ckpt", tmp_path / "ckpt")
    with pytest.warns(FutureWarning):
        config = load(None, OLD_RUN + [f"checkpoint.dir={tmp_path / 'ckpt'}", f"log.dir={tmp_path / 'log'}"])
    result = train(config)
    logged = json.loads((FIXTURE / "losses.json").read_text())
    assert result.resumed_from == 2 and sorted(result.losses) == [3, 4]
    difference = max(abs(result.losses[step] - logged[str(step)]) for step in (3, 4))
    print(f"resumed from the old checkpoint: max |loss difference| to the old run {difference:.3g}")
    assert difference <= 1e-6
