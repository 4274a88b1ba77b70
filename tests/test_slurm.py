"""The Slurm launcher against a real Slurm cluster (two fake nodes on this host, started by
tests/slurm/cluster.sh; .ci/run starts it). Where no cluster runs the tests skip, unless
PRETRAIN_REQUIRE_SLURM=1 (CI) makes that a failure."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, child_env, launch

pytestmark = pytest.mark.multiprocess

TRAIN = ["--config", str(ROOT / "configs/tiny.yaml"), "train.max_steps=24", "log.interval=4",
         "train.global_batch_size=16", "checkpoint.interval=4"]


def cluster_nodes() -> int:
    if shutil.which("sinfo") is None:
        return 0
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True)
    return proc.stdout.split().count("idle") + proc.stdout.split().count("mixed") if proc.returncode == 0 else 0


@pytest.fixture(scope="module")
def slurm() -> int:
    nodes = cluster_nodes()
    if nodes < 2:
        reason = ("no Slurm cluster with 2 idle nodes is running here: start one with "
                  "`tests/slurm/cluster.sh start` (as root, Debian)")
        if os.environ.get("PRETRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return nodes


def submit(tmp: Path, nodes: int, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "launch", "slurm", "--nodes", str(nodes), "--gpus-per-node", "2", "--cpu",
         "--log-dir", str(tmp / "slurm"), "--signal-seconds", "60", "--max-restarts", "2", "--max-requeues", "2", "--submit", *TRAIN,
         f"log.dir={tmp / 'log'}", f"checkpoint.dir={tmp / 'ckpt'}", *extra],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "GONE"


def wait_for(job: str, states: set[str], timeout: float = 400) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job)
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_state(job)} after {timeout} s")


def final_loss(log_dir: Path) -> float:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in records if r["group"] == "train" and r["step"] == 24][-1]


def slurm_output(tmp: Path) -> str:
    return "".join(p.read_text() for p in (tmp / "slurm").glob("slurm-*.out"))


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory) -> dict[int, float]:
    """Final losses of the same training as a local job of 2 and of 4 processes (conftest.launch:
    torchrun's environment; the losses are bit for bit those of a plain torchrun)."""
    losses = {}
    for nproc in (2, 4):
        tmp = tmp_path_factory.mktemp(f"local{nproc}")
        launch(nproc, "-m", "pretrain", "train", *TRAIN, f"log.dir={tmp / 'log'}", "checkpoint.dir=''")
        losses[nproc] = final_loss(tmp / "log")
    return losses


@pytest.mark.parametrize("nodes", [1, 2])
def test_rendered_job_trains_like_torchrun(slurm, tmp_path, local_losses, nodes):
    job = submit(tmp_path, nodes)
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}) == "COMPLETED", \
        slurm_output(tmp_path)[-3000:]
    assert final_loss(tmp_path / "log") == local_losses[2 * nodes]
    assert f"{nodes} node(s) x 2" in slurm_output(tmp_path)


def test_preemption_requeues_and_resumes_to_the_same_loss(slurm, tmp_path, local_losses):
    job = submit(tmp_path, 2)
    metrics = tmp_path / "log" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and '"step": 8' in metrics.read_text()):
        assert time.time() < deadline and job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            slurm_output(tmp_path)[-3000:]
        time.sleep(0.2)
    # what --signal=B:USR1@N does before a time limit: signal the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    wait_for(job, {"PENDING", "COMPLETED", "FAILED"})
    if job_state(job) == "PENDING":  # requeued: Slurm holds it back ~2 minutes by default
        # release it a little later: slurmd revokes the first run's job credential, and a restart
        # allocated within the same second is killed as "Job credential revoked"
        time.sleep(3)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", slurm_output(tmp_path)[-3000:]
    output = slurm_output(tmp_path)
    assert "stopped on a signal after saving; requeueing (requeue 1 of 2 after a stop signal)" in output
    assert f"job {job} run 1 (requeued 1 of at most 2 times after a stop signal, 0 of at most 2 after a failure)" \
        in output and "resumed from" in output
    assert "torchrun restarted the workers" not in output  # stopped workers end; the requeue resumes them
    assert final_loss(tmp_path / "log") == local_losses[4]


def test_a_killed_training_process_is_restarted_in_the_job(slurm, tmp_path, local_losses):
    """2 nodes x 2 ranks: SIGKILL one training process after the first checkpoint; torchrun's
    agents restart all four workers, which resume and end with the uninterrupted run's loss."""
    from test_faults import training_pids

    job = submit(tmp_path, 2)
    deadline = time.time() + 300
    while not (tmp_path / "ckpt" / "latest").exists():
        assert time.time() < deadline and job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            slurm_output(tmp_path)[-3000:]
        time.sleep(0.05)
    pids = training_pids(str(tmp_path / "log"))
    assert sorted(pids) == [0, 1, 2, 3]
    os.kill(pids[3], signal.SIGKILL)
    killed = time.monotonic()
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}) == "COMPLETED", \
        slurm_output(tmp_path)[-3000:]
    print(f"killed rank 3: the job completed {time.monotonic() - killed:.1f} s later")
    output = slurm_output(tmp_path)
    assert "restart 1 of at most 2: torchrun restarted the workers after one failed" in output
    assert "requeueing" not in output  # recovered within the job
    assert final_loss(tmp_path / "log") == local_losses[4]


def test_data_build_job_array_and_dependent_merge(slurm, tmp_path):
    """`pretrain launch slurm-data`: two array tasks build a part each, the merge waits for both."""
    from pretrain.data.build import build_shards
    from pretrain.tokenizer import train_tokenizer
    from test_data import random_documents

    documents = random_documents(200, seed=8)
    for index in range(4):
        (tmp_path / f"docs-{index}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in documents[index * 50:(index + 1) * 50]))
    train_tokenizer([tmp_path / "docs-0.jsonl"], vocab_size=300, out=tmp_path / "tok")
    args = ["--input", str(tmp_path / "docs-*.jsonl"), "--tokenizer", str(tmp_path / "tok"), "--seq-len", "32",
            "--out", str(tmp_path / "shards"), "--workers", "1", "--shard-samples", "20", "--unit-mb", "0.001"]
    proc = subprocess.run([sys.executable, "-m", "pretrain", "launch", "slurm-data", "--parts", "2", *args,
                           "--log-dir", str(tmp_path / "slurm"), "--submit"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, merge = proc.stdout.split()
    assert wait_for(merge, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300) == "COMPLETED", \
        slurm_output(tmp_path)[-3000:]
    merged = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    one = build_shards(sorted(tmp_path.glob("docs-*.jsonl")), tmp_path / "tok", 32, tmp_path / "one",
                       shard_samples=20, workers=1, progress=False, unit_bytes=int(0.001 * 2**20))
    assert merged["shards"] == one["shards"] and merged["documents"] == one["documents"] > 100
    assert "part 1 of 2" in slurm_output(tmp_path) and not (tmp_path / "shards" / "parts").exists()
