"""Files someone shares and ordinary mistakes: a checkpoint holding a pickle payload is refused
without running it (convert, generate, eval, resume), two runs never share a checkpoint folder
(the other run's bytes stay as they were; a live lease is respected, a dead one taken over), a
resume or an evaluation on data of another tokenizer or with another model shape is refused, and
bad settings and damaged Hugging Face folders get one message each."""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import TESTS
from pretrain.cli import main as cli
from pretrain.data.build import build_shards
from pretrain.lease import LEASE, FolderLease, LeaseError
from pretrain.tokenizer import train_tokenizer
from test_compat import OLD_RUN
from test_data import random_documents

FIXTURE = TESTS / "fixtures" / "old-checkpoint" / "ckpt"
STEP = "step_00000002"
TINY = ["data.source=synthetic", "model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.seq_len=16",
        "train.max_steps=2", "train.micro_batch_size=2", "train.global_batch_size=4", "log.interval=1",
        "data.num_workers=0", "schedule.warmup_steps=1"]


class Payload:
    """Unpickling this writes a file: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def with_payload(tmp_path: Path, file: str) -> tuple[Path, Path]:
    """A copy of the fixture checkpoint whose `file` carries a payload (its marker size updated,
    so that only the payload can make it fail); returns (checkpoint.dir, the payload's marker)."""
    ckpt, marker = tmp_path / "shared", tmp_path / "PAYLOAD_RAN"
    shutil.copytree(FIXTURE, ckpt)
    target = ckpt / STEP / file
    state = torch.load(target, weights_only=False)
    state["extra"] = Payload(marker)
    torch.save(state, target)
    complete = json.loads((ckpt / STEP / "complete.json").read_text())
    complete["files"][file] = target.stat().st_size
    (ckpt / STEP / "complete.json").write_text(json.dumps(complete))
    return ckpt, marker


def test_a_payload_in_the_weights_file_runs_in_no_command(tmp_path, capsys):
    ckpt, marker = with_payload(tmp_path, "mp_rank_00_model_states.pt")
    commands = [["convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--tokenizer", "none"],
                ["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--tokenizer", str(tmp_path)],
                ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path)],
                ["train", *OLD_RUN, f"checkpoint.dir={ckpt}", f"log.dir={tmp_path / 'log'}", "train.max_steps=3"]]
    for command in commands:
        assert cli(command) == 1, command
        assert "mp_rank_00_model_states.pt holds more than tensors and settings (exec)" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("file", ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "rank_00000.pt"])
def test_a_payload_in_the_training_state_is_refused_before_deepspeed_loads_it(file, tmp_path, capsys):
    ckpt, marker = with_payload(tmp_path, file)
    assert cli(["train", *OLD_RUN, f"checkpoint.dir={ckpt}", f"log.dir={tmp_path / 'log'}", "train.max_steps=3"]) == 1
    assert f"{file} holds more than tensors and settings (exec): it was not written by this framework" \
        in capsys.readouterr().err
    assert not marker.exists()


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_is_refused_and_the_first_runs_checkpoints_stay(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert cli(["train", *TINY, f"checkpoint.dir={ckpt}", f"log.dir={tmp_path / 'a'}", "checkpoint.interval=1"]) == 0
    before = digests(ckpt)
    capsys.readouterr()
    assert cli(["train", *TINY, f"checkpoint.dir={ckpt}", f"log.dir={tmp_path / 'b'}", "train.max_steps=4"]) == 1
    error = capsys.readouterr().err
    assert f"checkpoint.dir {ckpt} holds the checkpoints of another run" in error
    assert f"log.dir {tmp_path / 'a'}" in error and f"log.dir {tmp_path / 'b'}" in error
    assert "checkpoint.resume=" in error and "choose another checkpoint.dir" in error
    assert digests(ckpt) == before
    # the first run itself continues (a resubmission with checkpoint.resume=auto)
    assert cli(["train", *TINY, f"checkpoint.dir={ckpt}", f"log.dir={tmp_path / 'a'}", "train.max_steps=3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not (ckpt / LEASE).exists()  # given up at the end


def holder(folder: Path, **fields) -> None:
    record = {"run_id": "r", "token": "theirs", "host": "elsewhere", "pid": 1, "torchrun": "", "slurm_job": "",
              "attempt": [0, 0], "heartbeat": time.time(), **fields}
    (folder / LEASE).write_text(json.dumps(record))


def test_a_live_lease_is_respected(tmp_path):
    live = FolderLease(tmp_path, "r", timeout_s=1.0)
    live.acquire()  # its heartbeat keeps the lease fresh while the other waits
    try:
        with pytest.raises(LeaseError, match="is in use by a live run .run r, host .*two processes must not write one"):
            FolderLease(tmp_path, "r", timeout_s=1.0).acquire()
    finally:
        live.release()


@pytest.mark.parametrize("dead", [
    {"host": os.uname().nodename, "pid": 2**22 + 12345},  # a process of this host that no longer exists
    {"heartbeat": time.time() - 60},  # elsewhere, silent for longer than the timeout
    {"torchrun": "job-7", "attempt": [0, 0]},  # an earlier torchrun attempt of this job
])
def test_a_dead_holder_is_taken_over(dead, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    holder(tmp_path, **dead)
    lease = FolderLease(tmp_path, "r", timeout_s=30)
    started = time.monotonic()
    lease.acquire()
    try:
        assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.me["token"]
        assert time.monotonic() - started < 5
    finally:
        lease.release()
    assert not (tmp_path / LEASE).exists()


def test_a_lost_lease_stops_the_run_before_it_writes(tmp_path):
    lease = FolderLease(tmp_path, "r", timeout_s=0.4)
    lease.acquire()
    try:
        holder(tmp_path, token="intruder")
        time.sleep(0.3)  # a heartbeat notices
        assert lease.lost and "was taken over by run r, host elsewhere" in lease.lost
    finally:
        lease.release()
    assert (tmp_path / LEASE).exists()  # the other holder's lease is not removed


def test_resume_with_another_model_shape_names_the_difference(tmp_path, capsys):
    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    assert cli(["train", *OLD_RUN, "model.hidden_size=64", f"checkpoint.dir={tmp_path / 'ckpt'}",
                f"log.dir={tmp_path / 'log'}", "train.max_steps=3"]) == 1
    error = capsys.readouterr().err
    assert "holds another model than this run's config:\n  model.hidden_size: checkpoint 32, this run 64" in error


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory) -> Path:
    """Shards of two tokenizers and a checkpoint trained on the first's."""
    root = tmp_path_factory.mktemp("tokenizers")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in random_documents(200, 5)))
    for name, vocab in (("a", 300), ("b", 320)):
        train_tokenizer([root / "docs.jsonl"], vocab_size=vocab, out=root / f"tok-{name}")
        build_shards([root / "docs.jsonl"], root / f"tok-{name}", 16, root / f"shards-{name}", shard_samples=32,
                     progress=False)
    assert cli(["train", *TINY, "data.source=shards", f"data.path={root / 'shards-a'}", "model.vocab_size=320",
                f"checkpoint.dir={root / 'ckpt'}", f"log.dir={root / 'log'}"]) == 0
    return root


def test_resume_on_shards_of_another_tokenizer_is_refused(two_tokenizers, capsys):
    root = two_tokenizers
    assert cli(["train", *TINY, "data.source=shards", f"data.path={root / 'shards-b'}", "model.vocab_size=320",
                f"checkpoint.dir={root / 'ckpt'}", f"log.dir={root / 'log'}", "train.max_steps=3"]) == 1
    assert "was trained on data of another tokenizer" in capsys.readouterr().err


def test_eval_checks_the_tokenizer_and_the_shards(two_tokenizers, tmp_path, capsys):
    root = two_tokenizers
    evaluate = ["eval", "--checkpoint", str(root / "ckpt"), "--batches", "1"]
    assert cli([*evaluate, "--data", str(root / "shards-b")]) == 2
    assert "was built with another tokenizer" in capsys.readouterr().err
    assert cli([*evaluate, "--data", str(root / "shards-b"), "--allow-tokenizer-mismatch"]) == 0
    damaged = tmp_path / "shards"
    shutil.copytree(root / "shards-a", damaged)
    shard = next(damaged.glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # a flipped byte in the first sample
    shard.write_bytes(bytes(data))
    assert cli([*evaluate, "--data", str(damaged)]) == 2
    assert f"{shard} does not match the sha256 in its manifest" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("optimizer.beta1=5", "optimizer.beta1=5.0 must be in [0, 1)"),
    ("optimizer.eps=-1", "optimizer.eps=-1.0 must be > 0"),
    ("optimizer.lr=inf", "optimizer.lr=inf must be positive and finite"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be >= 0"),
    ("model.seq_len=1000000000", "far more than the"),
])
def test_settings_that_cannot_work_are_refused_before_training(setting, message, tmp_path, capsys):
    assert cli(["train", *TINY, setting, f"log.dir={tmp_path}"]) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "model"
    assert cli(["convert", "to-hf", "--checkpoint", str(FIXTURE), "--out", str(out), "--tokenizer", "none"]) == 0
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:5000]),
     "model.safetensors cannot be read"),
    (lambda m: (m / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((m / "config.json").read_text()).items() if k != "hidden_size"})),
     "config.json gives no integer hidden_size"),
    (lambda m: (m / "config.json").write_text("{not json"), "config.json is not valid JSON"),
])
def test_a_damaged_hugging_face_folder_gets_one_message(damage, message, hf_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(hf_model, model)
    damage(model)
    assert cli(["convert", "from-hf", "--model", str(model), "--out", str(tmp_path / "out")]) in (1, 2)
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_a_missing_prompts_file_is_named(tmp_path, capsys):
    assert cli(["generate", "--checkpoint", str(FIXTURE), "--prompts-file", str(tmp_path / "none.txt")]) == 2
    assert f"{tmp_path / 'none.txt'}: No such file or directory" in capsys.readouterr().err
