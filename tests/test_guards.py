"""Bad input gets one message that names it and what to do (exit 2), never a traceback, lost data or
a command run: guarded output folders (pretrain.outputs), the Slurm scripts' quoting, input files
and `pretrain generate`'s settings."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from pretrain.cli import main
from pretrain.data.build import build_shards
from pretrain.data.documents import DocumentStats, InputError, iter_documents
from pretrain.data.shards import FORMAT, MANIFEST, VERSION, Manifest, ShardError
from pretrain.launch import DataJob, SlurmJob, render_data_sbatch, render_sbatch
from pretrain import outputs
from pretrain.lease import LEASE, LeaseError
from pretrain.outputs import MARKER, Output, OutputError, fresh, staged
from pretrain.scaling.sweep import Sweep, SweepJob
from pretrain.scaling.sweep import render_sbatch as render_sweep_sbatch
from pretrain.tokenizer import CARD_FILE, MODEL_FILE, Tokenizer, TokenizerError, copy_tokenizer, train_tokenizer

SEQ_LEN = 16


def documents(count: int, seed: int) -> str:
    return "".join(json.dumps({"text": f"text {seed} {i * 7919} lorem ipsum dolor " + "word " * (i % 13)}) + "\n"
                   for i in range(count))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("guards")
    for index in range(2):
        (root / f"docs-{index}.jsonl").write_text(documents(60, index))
    train_tokenizer([root / "docs-0.jsonl"], vocab_size=300, out=root / "tok")
    return root


def cli(capsys, *argv: str | Path) -> tuple[int, str]:
    """`pretrain ARGV` in this process: its exit status and what it wrote to stderr."""
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def build_args(corpus: Path, out: Path, *extra: str) -> list:
    return ["data", "build", "--input", corpus / "docs-0.jsonl", corpus / "docs-1.jsonl", "--tokenizer",
            corpus / "tok", "--seq-len", SEQ_LEN, "--out", out, "--workers", 1, "--shard-samples", 20, *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- guarded output folders ----

def test_data_build_refuses_a_folder_it_did_not_make(corpus, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = cli(capsys, *build_args(corpus, out))
    assert code == 2 and f"{out} is not empty (notes.txt) and was not made by `pretrain data build`: choose a " \
                          "new or empty --out, or move those files away" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    code, err = cli(capsys, *build_args(corpus, corpus / "tok"))
    assert code == 2 and "holds the output of `pretrain tokenizer train`, not of `pretrain data build`" in err


def test_a_build_that_died_halfway_is_built_again_keeping_other_files(corpus, tmp_path, capsys):
    """The Slurm array flow: a requeued task finds its part folder half written and starts over."""
    part = tmp_path / "parts" / "part-00000"
    assert cli(capsys, *build_args(corpus, part))[0] == 0
    complete = files(part)
    (part / MANIFEST).unlink()  # killed before the manifest: unfinished
    (part / "shard-000000-00000.tar").write_bytes(b"half written")
    (part / "shard-000000-00001.tar.partial").write_bytes(b"left by the killed run")
    (part / "notes.txt").write_text("not the build's")
    code, err = cli(capsys, *build_args(corpus, part))
    assert code == 0, err
    assert files(part) == {**complete, "notes.txt": b"not the build's"}


def test_a_failed_build_leaves_the_folder_as_it_found_it(corpus, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(documents(30, 5) + '{"body": "no text"}\n')
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        code, err = cli(capsys, "data", "build", "--input", bad, "--tokenizer", corpus / "tok", "--seq-len", 8,
                        "--out", out, "--workers", 1)
        assert code == 2 and f"{bad}:31: no field 'text' (choose it with --text-field)" in err
    assert not new.exists() and empty.is_dir() and not any(empty.iterdir())


def test_merge_removes_only_what_the_build_made(corpus, tmp_path, capsys):
    out = tmp_path / "shards"
    parts = [out / "parts" / f"part-{index:05d}" for index in range(2)]
    for index, part in enumerate(parts):
        code, err = cli(capsys, *build_args(corpus, part, "--num-parts", 2, "--part", index, "--unit-mb", 0.001))
        assert code == 0, err
    (parts[1] / "notes.txt").write_text("mine")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "results.csv").write_text("1,2")
    code, err = cli(capsys, "data", "merge", *parts, "--out", elsewhere)
    assert code == 2 and f"{elsewhere} is not empty (results.csv) and was not made by `pretrain data merge`" in err
    assert all((part / MANIFEST).is_file() for part in parts) and (elsewhere / "results.csv").exists()

    code, err = cli(capsys, "data", "merge", *parts, "--out", out)
    assert code == 0
    assert f"left {parts[1]} with notes.txt in it: not made by `pretrain data build`" in err
    assert not parts[0].exists() and sorted(p.name for p in parts[1].iterdir()) == [MARKER, "notes.txt"]
    merged = Manifest.load(out)
    one = build_shards([corpus / "docs-0.jsonl", corpus / "docs-1.jsonl"], corpus / "tok", SEQ_LEN, tmp_path / "one",
                       shard_samples=20, progress=False, unit_bytes=int(0.001 * 2**20))
    assert merged.shards == one["shards"]


def test_tokenizer_train_refuses_and_cleans_up(corpus, tmp_path, capsys):
    docs = corpus / "docs-0.jsonl"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.bin").write_bytes(b"x")
    code, err = cli(capsys, "tokenizer", "train", "--input", docs, "--vocab-size", 300, "--out", foreign)
    assert code == 2 and "was not made by `pretrain tokenizer train`" in err and (foreign / "model.bin").exists()
    code, err = cli(capsys, "tokenizer", "train", "--input", docs, "--vocab-size", 300, "--out", corpus / "tok")
    assert code == 2 and f"{corpus / 'tok'} already holds a tokenizer (card.json)" in err
    code, err = cli(capsys, "tokenizer", "train", "--input", docs, "--vocab-size", 90000, "--out", tmp_path / "big")
    assert code == 2 and "--vocab-size 90000 is more than this corpus yields" in err
    assert not (tmp_path / "big").exists()


def test_a_command_never_overwrites_a_file_it_did_not_make(tmp_path):
    output = Output.open(tmp_path / "out", "data build")
    (tmp_path / "out" / MANIFEST).write_text("someone's")
    with pytest.raises(OutputError, match=r"manifest\.json exists and was not made by `pretrain data build`: move it "
                                          "away or choose another --out"):
        output.claim(MANIFEST)
    with pytest.raises(OutputError, match=r"\.\./shard\.tar is not a file name inside"):
        output.claim("../shard.tar")  # e.g. a shard name from a part's manifest
    assert output.remove() == [tmp_path / "out" / MANIFEST]


def test_a_forged_ledger_deletes_nothing_outside_its_folder(corpus, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    header = json.dumps({"format": "pretrain-output", "version": 1, "command": "data build", "created": True})
    (shared / MARKER).write_text(f"{header}\n{json.dumps('../victim.txt')}\n")
    code, err = cli(capsys, *build_args(corpus, shared))
    assert code == 2 and f"{shared / MARKER} is damaged or not pretrain's" in err
    (shared / "link").symlink_to(tmp_path)
    (shared / MARKER).write_text(f"{header}\n{json.dumps('link/victim.txt')}\n")
    assert cli(capsys, *build_args(corpus, shared))[0] == 0
    assert victim.read_text() == "precious" and (shared / MANIFEST).is_file()


def test_a_folder_a_live_command_writes_is_refused_and_a_dead_ones_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "LEASE_TIMEOUT_S", 1.0)
    out = tmp_path / "shards"
    with fresh(out, "data build") as first:
        [shard] = first.claim("shard-00000.tar")
        shard.write_text("first")
        with pytest.raises(LeaseError, match=f"{out} is in use by a live run .* two processes must not write one "
                                             "output folder of `pretrain data build`. Wait for it to end or stop "
                                             "it, or choose another --out"):
            with fresh(out, "data build"):
                pass
        assert shard.read_text() == "first"
    assert files(out).keys() == {MARKER, "shard-00000.tar"}  # the lease is gone with the command

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LEASE).write_text(json.dumps({"run_id": "data build", "token": "t", "host": socket.gethostname(),
                                         "pid": int(dead.stdout), "heartbeat": time.time()}))
    with fresh(out, "data build") as second:  # a killed build's lease: taken over at once
        assert not shard.exists()  # and its files deleted as leftovers

    with pytest.raises(OutputError, match="was taken over by run other.* the files there may mix both commands"):
        with fresh(out, "data build") as third:
            [shard] = third.claim("shard-00000.tar")
            shard.write_text("third")
            (out / LEASE).write_text(json.dumps({"run_id": "other", "token": "u", "host": "elsewhere", "pid": 1,
                                                 "heartbeat": time.time()}))
    assert shard.read_text() == "third"  # not deleted: the folder is the other command's now


def test_staged_outputs_for_convert_commands(tmp_path):
    out = tmp_path / "hf"
    with staged(out, "convert to-hf") as folder:
        assert folder == tmp_path / "hf.partial"
        (folder / "config.json").write_text("{}")
    assert files(out) == {"config.json": b"{}"} and not folder.exists()

    with pytest.raises(OutputError, match=f"{out} exists and is not empty: choose a new --out folder"):
        with staged(out, "convert to-hf"):
            pass
    with pytest.raises(RuntimeError, match="conversion failed"):
        with staged(tmp_path / "failed", "convert to-hf") as folder:
            (folder / "model.safetensors").write_bytes(b"half")
            raise RuntimeError("conversion failed")
    assert not folder.exists() and not (tmp_path / "failed").exists()

    left = Output.open(tmp_path / "again.partial", "convert to-hf", whole=True)  # a run killed halfway
    (left.root / "model.safetensors").write_bytes(b"half")
    with staged(tmp_path / "again", "convert to-hf") as folder:
        assert not any(p.name not in (MARKER, LEASE) for p in folder.iterdir())
    theirs = tmp_path / "theirs.partial"
    theirs.mkdir()
    (theirs / "weights.bin").write_bytes(b"theirs")
    with pytest.raises(OutputError, match=r"theirs\.partial is not empty \(weights\.bin\) and was not made by "
                                          "`pretrain convert to-hf`"):
        with staged(tmp_path / "theirs", "convert to-hf"):
            pass
    assert (theirs / "weights.bin").read_bytes() == b"theirs"


def test_demo_writes_only_its_own_folder(tmp_path):
    def demo(folder: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "DEMO_DIR": str(folder), "PY": "false", "DATA": str(tmp_path / "x.txt")}
        return subprocess.run(["bash", ROOT / "launch" / "demo.sh"], env=env, capture_output=True, text=True,
                              timeout=30)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    proc = demo(theirs)
    assert proc.returncode == 2 and f"demo: {theirs} is not empty and was not made by the demo" in proc.stderr
    assert (theirs / "thesis.tex").read_text() == "years of work"
    made = tmp_path / "made"
    (made / "shards").mkdir(parents=True)
    (made / ".demo").touch()
    (made / "notes.txt").write_text("kept")
    demo(made)  # stops at its first command (PY=false), after removing its old outputs
    assert not (made / "shards").exists() and (made / "notes.txt").read_text() == "kept"


def test_make_clean_removes_the_venv_and_the_demos_outputs_only(tmp_path):
    """In a copy of the project's Makefile and demo script: runs/ may hold the user's checkpoints."""
    (tmp_path / "launch").mkdir()
    for name in ("Makefile", "launch/demo.sh"):
        (tmp_path / name).write_bytes((ROOT / name).read_bytes())
        (tmp_path / name).chmod((ROOT / name).stat().st_mode)
    for made in (".venv/bin/python", "runs/demo/.demo", "runs/demo/shards/shard-0.tar", "runs/demo/notes.txt",
                 "runs/llama-8b/checkpoints/latest"):
        (tmp_path / made).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / made).write_text("x")
    proc = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["Makefile", "launch/demo.sh", "runs/demo/.demo", "runs/demo/notes.txt",
                    "runs/llama-8b/checkpoints/latest"]


# ---- Slurm scripts ----

@pytest.mark.parametrize("option, value, message", [
    ("--job-name", "run\ntouch PWNED", "--job-name 'run\\ntouch PWNED' cannot go into an sbatch script: use a job "
                                       "name of letters, digits and . _ - + @ : ="),
    ("--partition", "gpu$(touch PWNED)", "--partition 'gpu$(touch PWNED)' cannot go into an sbatch script: use "
                                         "partition names"),
    ("--account", "lab`touch PWNED`", "--account 'lab`touch PWNED`' cannot go into an sbatch script"),
    ("--time", "1:00:00 --wrap=x", "--time '1:00:00 --wrap=x' cannot go into an sbatch script: use a time limit"),
    ("--job-name", "../../x", "--job-name '../../x' cannot go into an sbatch script"),
    ("--log-dir", "logs\nrm -rf ~", "holds a line break or control character, which an sbatch script cannot hold"),
])
def test_slurm_settings_sbatch_cannot_take_are_refused(capsys, option, value, message):
    code, err = cli(capsys, "launch", "slurm", "--nodes", 1, "--gpus-per-node", 1, "--max-restarts", 1, option, value)
    assert code == 2 and message in err
    code, err = cli(capsys, "launch", "slurm-data", "--parts", 2, "--input", "a", "--tokenizer", "t", "--seq-len", 8,
                    "--out", "o", option, value)
    assert code == 2 and message in err


def sbatch_options(script: str) -> list[str]:
    """The options sbatch reads from a script's #SBATCH lines, as Slurm's own parser does: up to the
    first command; double or single quotes, backslash escapes, `#` outside quotes ends the line."""
    options = []
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            if line.strip():
                break
            continue
        if not line.startswith("#SBATCH"):
            continue
        word, quote, escaped = "", None, False
        for char in line[len("#SBATCH"):] + " ":
            if escaped:
                word, escaped = word + char, False
            elif char == "\\":
                escaped = True
            elif quote:
                quote, word = (None, word) if char == quote else (quote, word + char)
            elif char in "\"'":
                quote = char
            elif char == "#":
                break
            elif char.isspace():
                if word:
                    options.append(word)
                word = ""
            else:
                word += char
        assert quote is None, line
    return options


HOSTILE = "a b'c\"d$(touch PWNED)`touch PWNED2`;#e%j"


def test_rendered_scripts_quote_every_path_and_run_nothing_injected(tmp_path, monkeypatch):
    stubs, calls, run = tmp_path / "bin", tmp_path / "calls", tmp_path / "run"
    for folder in (stubs, calls, run):
        folder.mkdir()
    record = '#!/bin/bash\nprintf "%s\\0" "$(basename "$0")" "$@" > "$CALLS/$(basename "$0")-$$-$RANDOM"\n'
    stub_bodies = {"sbatch": record + "echo 1", "scancel": record, "python": record,
                   "scontrol": record + '[ "$1" = show ] && echo node1\nexit 0',
                   "srun": record + 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"'}
    for name, body in stub_bodies.items():
        (stubs / name).write_text(body + "\n")
        (stubs / name).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stubs / "python"))
    workdir, log_dir = tmp_path / f"work {HOSTILE}", tmp_path / f"logs {HOSTILE}"
    config, override = f"conf {HOSTILE}.yaml", f"log.dir={HOSTILE}"
    out = tmp_path / f"out {HOSTILE}"
    scripts = {
        "train": render_sbatch(SlurmJob(nodes=1, procs_per_node=2, config=config, overrides=[override], cpu=True,
                                        partition="gpu,debug", time="1-00:00:00", account="lab", log_dir=str(log_dir),
                                        max_restarts=1), workdir),
        **dict(zip(("build", "merge"), render_data_sbatch(DataJob(
            parts=2, inputs=[str(tmp_path / f"in {HOSTILE}.jsonl")], tokenizer=str(tmp_path / f"tok {HOSTILE}"),
            seq_len=8, out=str(out), text_field=HOSTILE, log_dir=str(log_dir)), workdir))),
        "scaling": render_sweep_sbatch(Sweep(tmp_path / f"sweep {HOSTILE}", {"points": []}), SweepJob(cpu=True),
                                       [0], workdir),
    }
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "CALLS": str(calls), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_ARRAY_JOB_ID": "7",
           "SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "1"}
    sweep_logs = tmp_path / f"sweep {HOSTILE}" / "slurm"
    python_calls = {}
    for name, script in scripts.items():
        path = tmp_path / f"{name}.sbatch"
        path.write_text(script)
        assert subprocess.run(["bash", "-n", path]).returncode == 0, name
        options = sbatch_options(script)
        assert f"--chdir={workdir}" in options, (name, options)
        logs = str(sweep_logs if name == "scaling" else log_dir).replace("%", "%%")  # sbatch's %% is a %
        assert any(option.startswith(f"--output={logs}/slurm-%") for option in options), (name, options)
        proc = subprocess.run(["bash", path], cwd=run, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (name, proc.stdout, proc.stderr)
        [python] = [p for p in calls.iterdir() if p.name.startswith("python-")]
        python_calls[name] = python.read_bytes().decode().split("\0")[1:-1]
        python.unlink()
    assert not [p for p in [*tmp_path.rglob("PWNED*"), *ROOT.glob("PWNED*")]]
    assert python_calls["train"][-3:] == ["--config", config, override]
    assert f"{log_dir}/torchrun-7-0/node-0" in python_calls["train"]
    build = python_calls["build"]
    assert build[build.index("--input") + 1] == str(tmp_path / f"in {HOSTILE}.jsonl")
    assert build[build.index("--text-field") + 1] == HOSTILE and build[-1] == f"{out}/parts/part-00000"
    assert python_calls["merge"][-2:] == ["--out", str(out)]
    assert python_calls["scaling"][3:5] == ["launch", str(tmp_path / f"sweep {HOSTILE}")]


# ---- input files ----

def test_null_text_is_an_empty_document_and_other_non_strings_are_refused(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "one"}\n{"text": null}\n{"text": "two"}\n')
    stats = DocumentStats()
    assert list(iter_documents([docs], stats=stats)) == ["one", "two"] and stats.empty_skipped == 1
    for value, kind in (("5", "a number"), ("1.5", "a number"), ("true", "a boolean"), ('["a"]', "an array"),
                        ('{"a": "b"}', "an object")):
        docs.write_text('{"text": "one"}\n{"text": ' + value + "}\n")
        with pytest.raises(InputError, match=re.escape(f"{docs}:2: field 'text' holds {kind}, not a string: fix that "
                                                       "line, or name the text field with --text-field")):
            list(iter_documents([docs]))


def test_a_parquet_column_that_is_not_text_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as parquet

    path = tmp_path / "numbers.parquet"
    parquet.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(InputError, match=f"{path}: column 'text' holds int64, not strings"):
        list(iter_documents([path]))


def test_manifest_without_tokenizer(tmp_path, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    manifest = {"format": FORMAT, "version": VERSION, "seq_len": 8, "sample_tokens": 9, "dtype": "uint16",
                "eos_id": 2, "pad_id": 3, "shards": []}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    message = (f"{folder / MANIFEST} has no tokenizer: it was not written by `pretrain data build` or was edited "
               "since; rebuild the shards")
    with pytest.raises(ShardError, match=re.escape(message)):
        Manifest.load(folder)
    code, err = cli(capsys, "data", "merge", folder, "--out", tmp_path / "merged")
    assert code == 2 and message in err
    (folder / MANIFEST).write_text(json.dumps({**manifest, "tokenizer": {"path": "tokenizer"}}))
    with pytest.raises(ShardError, match="has no tokenizer.sha256, tokenizer.vocab_size"):
        Manifest.load(folder)


def test_a_damaged_tokenizer_is_named(corpus, tmp_path, capsys):
    import hashlib

    broken = tmp_path / "broken"
    copy_tokenizer(corpus / "tok", broken)
    garbage = b"\x00not a sentencepiece model"
    (broken / MODEL_FILE).write_bytes(garbage)
    card = json.loads((broken / CARD_FILE).read_text())
    (broken / CARD_FILE).write_text(json.dumps({**card, "sha256": hashlib.sha256(garbage).hexdigest()}))
    code, err = cli(capsys, "data", "build", "--input", corpus / "docs-0.jsonl", "--tokenizer", broken, "--seq-len", 8,
                    "--out", tmp_path / "out")
    assert code == 2 and f"{broken / MODEL_FILE} is not a sentencepiece model that loads" in err
    assert "train a tokenizer with `pretrain tokenizer train` or restore the file" in err
    (broken / CARD_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match=f"{broken / CARD_FILE} is not valid JSON"):
        Tokenizer.load(broken)
    (broken / CARD_FILE).write_text("{}")
    with pytest.raises(TokenizerError, match="card.json has no sha256, vocab_size, special_ids: not a tokenizer card"):
        Tokenizer.load(broken)


# ---- pretrain generate ----

@pytest.mark.parametrize("extra, message", [
    (["--prompt", "def f(", ""], '--prompt "": prompt 2 of 2 is empty; give every prompt some text'),
    (["--prompt", "x", "--top-p", "0"], "--top-p 0.0 must be in (0, 1] (1: no top-p cut; e.g. 0.95)"),
    (["--prompt", "x", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature nan must be a number >= 0 (0: greedy; e.g. 0.8"),
    (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0 must be a number >= 0"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
    (["--prompt", "x", "--top-k", "-5"], "--top-k -5 must be >= 0 (0: no top-k cut)"),
    (["--prompt", "x", "--device", "mps"], "--device mps is not a device here: choose auto, cpu, cuda or cuda:N"),
    (["--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file /nonexistent/prompts.txt: No such file or "
                                                     "directory"),
])
def test_generate_settings_are_checked_before_the_checkpoint_is_read(tmp_path, capsys, extra, message):
    code, err = cli(capsys, "generate", "--checkpoint", tmp_path / "no-checkpoint", *extra)
    assert code == 2 and message in err


def test_generate_prompts_file_without_prompts_and_a_missing_gpu(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n   \n")
    code, err = cli(capsys, "generate", "--checkpoint", tmp_path, "--prompts-file", prompts)
    assert code == 2 and f"--prompts-file {prompts} holds no prompt: write one prompt per line" in err
    if not torch.cuda.is_available():
        code, err = cli(capsys, "generate", "--checkpoint", tmp_path, "--prompt", "x", "--device", "cuda")
        assert code == 2 and "--device cuda: there is no CUDA GPU here" in err and "use --device cpu or auto" in err
        code, err = cli(capsys, "eval", "--checkpoint", tmp_path, "--data", tmp_path, "--device", "cuda:1")
        assert code == 2 and "--device cuda:1: there is no CUDA GPU here" in err
