"""Generation: greedy tokens of `pretrain generate` on a TP2 x PP2 checkpoint equal transformers'
generate on its export; KV cache and recomputation agree; seeded sampling repeats; samples
during training at TP2 and PP2 leave the losses bit for bit as they were (and reach an offline
Weights & Biases run); `pretrain eval` gives the trainer's validation loss. The runs are
conftest's generate_runs."""

import glob
import json
import struct

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import GENERATE_STEPS, hf_check, launch
from pretrain import parallel
from pretrain.convert.hf_export import export
from pretrain.generate import ModelDecoder, Sampling, generate
from pretrain.inference import run_eval, run_generate
from pretrain.model.args import LlamaArgs
from pretrain.model.llama import Llama
from pretrain.tokenizer import Tokenizer

PROMPTS = ["def ", "class Foo", "import os\n", "  x = 1", "return 12", "é 😀"]


@pytest.mark.multiprocess
def test_greedy_generation_equals_transformers_on_the_export(generate_data, generate_runs, tmp_path):
    checkpoint = generate_runs["root"] / "ckpt"
    ours = run_generate(str(checkpoint), None, PROMPTS, Sampling(max_new_tokens=12), tokenizer=None, device="cpu")
    export(checkpoint, tmp_path / "hf", dtype="fp32")
    [result] = hf_check([{"model": str(tmp_path / "hf"), "logits_tokens": [[5, 6, 7]], "loss_batches": [],
                          "generate": {"prompts": PROMPTS, "max_new_tokens": 12}}], tmp_path)
    hf = result["generations"]
    assert hf == ours and sum(map(len, ours)) > len(PROMPTS)


@pytest.fixture
def model():
    context = parallel.initialize(tp=1, pp=1, backend="gloo")
    args = LlamaArgs(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96,
                     seq_len=64)
    llama = Llama(args, context.tp_group)
    llama.init_weights(seed=3)
    with torch.no_grad():
        for param in llama.parameters():
            param.mul_(5)  # sharp distributions: the tokens depend on every position
    yield llama.eval()
    parallel.shutdown()


PROMPT_IDS = [[5, 6, 7], [9], [10, 11, 12, 13, 14, 15, 16, 17]]  # different lengths: left padding


def test_kv_cache_and_recomputation_give_the_same_tokens(model):
    for sampling in (Sampling(max_new_tokens=20), Sampling(max_new_tokens=20, temperature=0.8, top_k=40, top_p=0.9)):
        cached = generate(ModelDecoder(model), PROMPT_IDS, sampling, eos_id=2, pad_id=0)
        recomputed = generate(ModelDecoder(model), PROMPT_IDS, sampling, eos_id=2, pad_id=0, use_cache=False)
        assert cached == recomputed and min(map(len, cached)) > 0
    alone = [generate(ModelDecoder(model), [prompt], Sampling(max_new_tokens=20), 2, 0)[0] for prompt in PROMPT_IDS]
    assert alone == generate(ModelDecoder(model), PROMPT_IDS, Sampling(max_new_tokens=20), 2, 0)


def test_seeded_sampling_repeats_and_seeds_differ(model):
    def run(seed):
        return generate(ModelDecoder(model), PROMPT_IDS, Sampling(max_new_tokens=16, temperature=1.0, seed=seed), 2, 0)

    assert run(1) == run(1) and run(1) != run(2)
    rng = torch.get_rng_state()
    run(3)
    assert torch.equal(rng, torch.get_rng_state())  # the global generator is not touched


def test_eos_stops_a_prompt(model):
    first = generate(ModelDecoder(model), PROMPT_IDS, Sampling(max_new_tokens=8), eos_id=2, pad_id=0)
    stop = first[0][2]  # the third token of the first prompt becomes its EOS
    stopped = generate(ModelDecoder(model), PROMPT_IDS, Sampling(max_new_tokens=8), eos_id=stop, pad_id=0)
    assert stopped[0] == first[0][:2]


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_samples_are_logged_and_leave_the_losses_as_they_were(layout, generate_runs):
    runs = generate_runs["runs"]
    assert runs[f"{layout}_sampled"]["loss"] == runs[f"{layout}_plain"]["loss"]  # bit for bit
    log = generate_runs["root"] / f"{layout}_sampled"
    rows = [json.loads(line) for line in (log / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4, 6) for p in ("def ", "alpha ")]
    events = EventAccumulator(str(log), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("samples/text_summary")
    assert [t.step for t in texts] == [2, 4, 6]
    assert not (generate_runs["root"] / f"{layout}_plain" / "samples.jsonl").read_text()


def wandb_records(run_dir) -> list:
    """The records of an offline W&B run file (LevelDB-style log: 32 KiB blocks of
    [crc32, length, type] chunks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block, position, pieces, records = open(path, "rb").read(), 32768, 7, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7]) if room >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the rest of the block is padding
            position += room
            continue
        pieces, position = pieces + data[position + 7:position + 7 + length], position + 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


@pytest.mark.multiprocess
def test_weights_and_biases_offline_run_mirrors_scalars_and_samples(generate_runs):
    log = generate_runs["root"] / "tp2_sampled"
    records = wandb_records(log)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
               for record in records if record.WhichOneof("record_type") == "history"]
    losses = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert losses == generate_runs["runs"]["tp2_sampled"]["loss"]
    tables = {row["_step"]: row["samples/path"] for row in history if "samples/path" in row}
    [run_dir] = (log / "wandb").glob("offline-run-*")
    logged = [json.loads(line) for line in (log / "samples.jsonl").read_text().splitlines()]
    assert list(tables) == [2, 4, 6]
    for step, path in tables.items():
        table = json.loads((run_dir / "files" / path).read_text())
        assert table["data"] == [[step, r["prompt"], r["completion"]] for r in logged if r["step"] == step]
    [run] = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert run.project == "generate-test" and run.display_name == "tp2_sampled"
    assert not (generate_runs["root"] / "pp2_sampled" / "wandb").exists()


@pytest.mark.multiprocess
def test_eval_gives_the_trainers_validation_loss(generate_data, generate_runs, tmp_path):
    result = run_eval(str(generate_runs["root"] / "ckpt"), None, str(generate_data / "valid"), batches=2,
                      out=str(tmp_path / "e.json"), device="cpu")
    expected = generate_runs["runs"]["tp2_pp2"]["valid_loss"][GENERATE_STEPS]
    assert abs(result["loss"] - expected) < 1e-5
    assert json.loads((tmp_path / "e.json").read_text())["ppl"] == pytest.approx(result["ppl"])


@pytest.mark.multiprocess
def test_generate_command_prints_completions_and_speed(generate_runs):
    proc = launch(1, "-m", "pretrain", "generate", "--checkpoint", str(generate_runs["root"] / "ckpt"), "--prompt",
                  "def ", "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1", "--device", "cpu", timeout=120)
    assert "--- 'def '" in proc.stdout and "tokens/s (with a KV cache, cpu)" in proc.stdout
