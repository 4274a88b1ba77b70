"""Scaling laws: the L(N, D) fit recovers known exponents from noisy synthetic losses, the
isoFLOP minima follow the law's optimum, `fit --table` writes fit.json and the plots; the
IsoFLOP plan sizes each point; bad input is named; a real mini sweep on CPU (3 budgets x 3
tiny models on Python's own sources) goes plan -> launch --local -> fit with the loss falling
with N at the largest budget; and a 2-point Slurm job array trains both points, a relaunch
skips them."""

import csv
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, child_env
from pretrain.bench.data import stdlib_sources
from pretrain.cli import main
from pretrain.config import load
from pretrain.data.build import build_shards
from pretrain.scaling.fit import PARAMETERS, fit_all, fit_law, law_optimum, predict
from pretrain.scaling.grid import count_params
from pretrain.scaling.observations import Observations
from pretrain.scaling.plots import FILES
from pretrain.scaling.sweep import Sweep
from pretrain.tokenizer import train_tokenizer
from test_slurm import slurm  # noqa: F401 (the fixture: skips unless a test cluster runs)

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TINY = str(ROOT / "configs/tiny.yaml")
# The mini sweep: widths 8, 16 and 24 (one layer each) with 1, 2 and 3 heads of 8, on budgets
# where even the largest model sees ~20 tokens per parameter at the top budget.
SHAPES = ["--params", "9000", "32000", "--head-dim", "8", "--aspect", "32", "--warmup-fraction", "0.1"]
TRAINING = ["model.vocab_size=0", "train.global_batch_size=32", "train.micro_batch_size=32", "optimizer.lr=1e-2",
            "train.eval_steps=4", "log.interval=50", "data.num_workers=0"]


def noisy(law: dict, params: np.ndarray, tokens: np.ndarray, seed: int, sigma: float = 0.005) -> np.ndarray:
    return predict(law, params, tokens) * np.exp(np.random.default_rng(seed).normal(0, sigma, params.shape))


def isoflop_table(seed: int = 0) -> Observations:
    """7 sizes around the law's optimum for each of 4 budgets."""
    params, tokens, compute = [], [], []
    for c in np.geomspace(1e18, 1e21, 4):
        best = law_optimum(CHINCHILLA, c)["params"]
        for n in np.geomspace(best / 4, best * 4, 7):
            params.append(n), tokens.append(c / (6 * n)), compute.append(c)
    params, tokens = np.array(params), np.array(tokens)
    return Observations(params, tokens, noisy(CHINCHILLA, params, tokens, seed), np.array(compute), "synthetic", "all")


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_recovers_known_exponents_from_noisy_losses(seed):
    n, d = (grid.ravel() for grid in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
    obs = Observations(n, d, noisy(CHINCHILLA, n, d, seed), 6 * n * d, "synthetic", "all")
    fit = fit_law(obs, resamples=40, seed=seed)
    assert abs(fit["alpha"] - CHINCHILLA["alpha"]) < 0.02 and abs(fit["beta"] - CHINCHILLA["beta"]) < 0.02
    assert abs(fit["E"] - CHINCHILLA["E"]) < 0.05
    for name in PARAMETERS:
        low, high = fit["ci"][name]
        assert low <= fit[name] <= high


def test_isoflop_minima_follow_the_laws_optimum():
    fit = fit_all(isoflop_table(), target_compute=1e22, resamples=0)
    exponent = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])
    assert abs(fit["a"] - exponent) < 0.03 and abs(fit["a"] + fit["b"] - 1) < 1e-9
    assert all(m["interior"] for m in fit["isoflop"]) and len(fit["isoflop"]) == 4
    truth = law_optimum(CHINCHILLA, 1e22)
    for method in ("compute_optimal", "compute_optimal_isoflop"):
        assert abs(math.log(fit[method]["params"] / truth["params"])) < math.log(1.25), method
        assert fit[method]["params"] * fit[method]["tokens"] * 6 == pytest.approx(1e22)


def test_fit_of_a_table_writes_fit_json_and_plots(tmp_path, capsys):
    obs = isoflop_table(seed=3)
    table = tmp_path / "runs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "n", "d", "final_loss"])
        writer.writerows([f"run{i}", n, d, loss] for i, (n, d, loss) in enumerate(zip(obs.params, obs.tokens, obs.loss)))
    assert main(["scaling", "fit", "--table", str(table), "--columns", "n,d,final_loss", "--target-compute", "1e22",
                 "--bootstrap", "20", "--out", str(tmp_path / "fit")]) == 0
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "ci", "a", "b", "compute_optimal"} <= set(fit)
    assert set(fit["ci"]) == set(PARAMETERS) and all(len(v) == 2 for v in fit["ci"].values())
    assert fit["compute_optimal"]["compute"] == 1e22 and {"params", "tokens", "loss"} <= set(fit["compute_optimal"])
    assert len(fit["isoflop"]) == 4  # rows grouped into budgets by 6ND
    for name in FILES:
        assert (tmp_path / "fit" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "alpha" in printed and "compute-optimal at C = 1e+22" in printed


def test_plan_sizes_each_point_by_its_budget(tmp_path):
    out = tmp_path / "sweep"
    assert main(["scaling", "plan", "--base-config", TINY, "--compute", "3e12", "1e13", "--points", "3",
                 "--count", "non-embedding", "--out", str(out), "train.global_batch_size=8"]) == 0
    sweep = Sweep.load(out)
    assert len(sweep.points) == 6 and sweep.data["count"] == "non-embedding"
    for point in sweep.points:
        config = load(sweep.config_path(point))
        assert point["params"] == count_params(config.model, "non-embedding") < config.model.num_params()
        assert config.train.max_tokens == round(point["compute"] / (6 * point["params"]))
        assert config.train.max_steps == point["steps"] == math.ceil(config.train.max_tokens / (8 * 64))
        assert config.schedule.warmup_steps == round(5 / 60 * point["steps"])  # tiny.yaml's share
        assert config.model.hidden_size == config.model.num_heads * 16 and config.log.dir.startswith(str(out))
    first = [p["params"] for p in sweep.points[:3]]
    assert first == sorted(first) and len(set(first)) == 3


def test_bad_input_is_named(tmp_path, capsys):
    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        return capsys.readouterr().err

    assert "no sweep.json" in error("scaling", "fit", str(tmp_path / "nowhere"))
    table = tmp_path / "t.csv"
    table.write_text("params,tokens,loss\n" + "".join(f"{n},{n * 20},{3 - i / 10}\n" for i, n in enumerate([1e6, 2e6, 4e6, 8e6])))
    assert "has no column 'D'" in error("scaling", "fit", "--table", str(table), "--columns", "params,D,loss")
    assert "at least 5 points" in error("scaling", "fit", "--table", str(table))
    assert "1 distinct shapes" in error("scaling", "plan", "--base-config", TINY, "--compute", "1e13", "--points", "3",
                                        "--params", "20000", "20100", "--out", str(tmp_path / "narrow"))
    assert main(["scaling", "plan", "--base-config", TINY, "--compute", "3e12", "1e13", "--points", "3",
                 "--out", str(tmp_path / "sweep")]) == 0
    capsys.readouterr()
    message = error("scaling", "fit", str(tmp_path / "sweep"))
    assert "6 of 6 points" in message and "000_C3e+12_N" in message and "scaling launch" in message


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 512-token tokenizer and 64-token shards of a slice of Python's standard library."""
    root = tmp_path_factory.mktemp("corpus")
    files = stdlib_sources()
    train, valid = files[:400:2], files[1:400:20]
    train_tokenizer(train, 512, root / "tok", max_chars=1_000_000)
    build_shards(train, root / "tok", 64, root / "train", shard_samples=100_000, progress=False)
    build_shards(valid, root / "tok", 64, root / "valid", shard_samples=100_000, progress=False)
    return [f"data.path={root / 'train'}", f"data.valid_path={root / 'valid'}", "data.source=shards"]


def launch(*argv: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pretrain", "scaling", "launch", *argv], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.multiprocess
def test_mini_sweep_plan_launch_fit(corpus, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["scaling", "plan", "--base-config", TINY, "--compute", "1.5e10", "4.2e10", "1.2e11", "--points", "3",
                 *SHAPES, "--out", str(out), *corpus, *TRAINING]) == 0
    started = time.perf_counter()
    launch(str(out), "--local", "--parallel", "2")
    print(f"mini sweep trained in {time.perf_counter() - started:.1f} s")
    sweep = Sweep.load(out)
    top = sorted((p["params"], sweep.result(p)["loss"]) for p in sweep.points if p["compute"] == 1.2e11)
    assert len(top) == 3 and all(sweep.result(p)["loss_from"] == "valid" for p in sweep.points)
    assert top[0][1] > top[1][1] > top[2][1], f"loss does not fall with N at the largest budget: {top}"
    assert "all 9 points" in launch(str(out), "--local").stdout  # finished points are skipped

    assert main(["scaling", "fit", str(out), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    fit = json.loads((out / "fit" / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "ci", "a", "b", "compute_optimal"} <= set(fit)
    assert fit["count"] == "all" and len(fit["isoflop"]) == 3 and fit["compute_optimal"]["compute"] == 1.2e11
    for name in FILES:
        assert (out / "fit" / name).stat().st_size > 10_000


@pytest.mark.multiprocess
def test_slurm_job_array_trains_each_point_once(slurm, corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    assert main(["scaling", "plan", "--base-config", TINY, "--compute", "5e9", "--points", "2", "--params", "9000",
                 "20000", "--head-dim", "8", "--aspect", "32", "--out", str(out), *corpus, *TRAINING]) == 0
    capsys.readouterr()
    job = launch(str(out), "--slurm", "--cpu", "--submit").stdout.strip()
    script = (out / "slurm" / "pretrain-scaling.sbatch").read_text()
    assert "#SBATCH --array=0,1\n" in script and "--point \"$POINT\"" in script
    deadline = time.time() + 400
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline, f"job array {job} still queued or running"
        time.sleep(1)
    logs = "".join(p.read_text() for p in (out / "slurm").glob("slurm-*.out"))
    sweep = Sweep.load(out)
    assert not sweep.unfinished(), logs[-3000:]
    assert f"job {job}_0" in logs and f"job {job}_1" in logs and logs.count("finished: valid loss") == 2
    assert "nothing to submit" in launch(str(out), "--slurm", "--cpu", "--submit").stdout
