"""`torchrun -m pretrain train` with TP2: trains, loss falls, every TensorBoard tag is written."""

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, torchrun

TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tflops_per_gpu",
        "train/step_time", "train/mem_peak_gib"]


def test_torchrun_tp2_writes_every_tag_and_learns(tmp_path):
    log_dir = tmp_path / "log"
    proc = torchrun(2, "-m", "pretrain", "train", "--config", str(ROOT / "configs/tiny.yaml"), "parallel.tp=2",
                    f"log.dir={log_dir}", "train.max_steps=40", "checkpoint.dir=" + str(tmp_path / "ckpt"))
    assert "step 40/40" in proc.stdout + proc.stderr

    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert set(TAGS) <= set(tags)
    assert "train/mfu" not in tags  # no GPU: MFU is left out rather than invented
    losses = [event.value for event in events.Scalars("train/loss")]
    assert [event.step for event in events.Scalars("train/loss")] == [10, 20, 30, 40]
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(event.value > 0 for tag in TAGS for event in events.Scalars(tag))

    resolved = (log_dir / "config.yaml").read_text()
    assert "tp: 2" in resolved and "max_steps: 40" in resolved
    assert (tmp_path / "ckpt" / "step_00000040").is_dir()
