"""bench/gpu.sh --dry-run: the GPU session's script run on CPU (GPU tests collected and skipped,
the training benchmark at the tiny shape on the standard library's sources, as on a fresh machine)."""

import json
import re
import subprocess

import pytest

from conftest import ROOT, child_env

pytestmark = pytest.mark.multiprocess


def test_gpu_script_dry_run_prints_ours_beside_both_hugging_face_baselines(tmp_path):
    proc = subprocess.run(["bench/gpu.sh", "--dry-run"], cwd=ROOT, env=child_env(OUT=str(tmp_path)),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "pytest -m gpu: exit 0" in proc.stdout and "bench --shape tiny: exit 0" in proc.stdout
    assert re.search(r"^=+ \d+ skipped in", (tmp_path / "gpu-tests.log").read_text(), re.M)  # all of them, none failed
    result = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert list(result["rows"]) == ["hf_eager_sdpa", "hf_compiled", "ours_eager", "ours"]
    for row in result["rows"].values():
        assert row["tokens_per_sec"] > 0 and row["mfu"] is None  # no MFU on a CPU
    assert result["rows"]["ours"]["loss"] > 0 and set(result["ratios"]) == {
        "ours/hf_eager_sdpa", "ours/hf_compiled", "ours/ours_eager"}
    assert "ours_eager" in proc.stdout and "tokens/s ratios: ours/hf_eager_sdpa" in proc.stdout
