"""Checkpoint conversion: models trained at TP2 x PP2 (and TP2 x DP2 ZeRO-3) exported to Hugging
Face and loaded by `transformers` alone; Hugging Face -> ours -> Hugging Face bit for bit; the
imported model's first loss; resharding TP2 x PP2 -> TP1 x PP1; refusals."""

import inspect
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import hf_check, run_layouts
from pretrain.cli import main as cli
from pretrain.config import load, validate
from pretrain.convert.hf_export import export
from pretrain.convert.reader import CheckpointReader
from pretrain.data import stream
from pretrain.data.build import build_shards
from pretrain.tokenizer import Tokenizer, TokenizerError, train_tokenizer
from reference import single_process_model
from test_data import random_documents

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

STEPS, SEQ = 4, 32
VARIANTS = {  # name -> (layout, model) overrides
    "gqa": (["parallel.tp=2", "parallel.pp=2"],
            ["model.num_heads=8", "model.num_kv_heads=2", "model.rope_theta=50000", "model.norm_eps=1e-6"]),
    "tied": (["parallel.tp=2", "parallel.pp=2"],
             ["model.num_heads=4", "model.num_kv_heads=4", "model.tie_embeddings=true"]),
    "zero3": (["parallel.tp=2", "optimizer.zero_stage=3", "optimizer.zero3_param_persistence_threshold=0"],
              ["model.num_heads=8", "model.num_kv_heads=2", "model.rope_theta=50000", "model.norm_eps=1e-6"]),
    "qk_norm": (["parallel.tp=2", "parallel.pp=2"], ["model.num_heads=8", "model.num_kv_heads=2", "model.qk_norm=true"]),
}
HF_CLASSES = {"qk_norm": "Qwen3ForCausalLM"}  # the others: LlamaForCausalLM
TEXTS = ["def f(x):\n    return x  # comment\n\n\n", "  two leading spaces, trailing  ", "tabs\t\tand\nnewlines\n",
         "digits 1234567 émoji 😀 中文", "special text </s> <s> <pad> <unk> inside", "", " ", "naïve café"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    code = [Path(inspect.getfile(module)).read_text() for module in (json.encoder, textwrap, subprocess)]
    for name, seed, count in (("train", 1, 300), ("valid", 2, 30)):
        documents = random_documents(count, seed) + (code if name == "train" else [])
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    train_tokenizer([root / "train.jsonl"], vocab_size=400, out=root / "tok")
    for name in ("train", "valid"):
        build_shards([root / f"{name}.jsonl"], root / "tok", SEQ, root / name, shard_samples=64, progress=False)
    return root


def base(data: Path) -> list[str]:
    """No data.tokenizer: runs record the tokenizer copy the shards carry."""
    return [f"data.path={data / 'train'}", f"data.valid_path={data / 'valid'}", "data.num_workers=0", f"model.seq_len={SEQ}", "model.hidden_size=64", "model.num_layers=3",
            "model.ffn_hidden_size=96", "optimizer.lr=3e-3", "schedule.warmup_steps=1", f"train.max_steps={STEPS}",
            "train.micro_batch_size=2", "train.global_batch_size=8", "log.interval=1", f"train.eval_interval={STEPS}",
            "train.eval_steps=1", "checkpoint.interval=2", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> dict:
    """The variants trained in one launch of 4 processes; name -> {run: metrics, dir: checkpoint.dir}."""
    root = tmp_path_factory.mktemp("trained")
    runs = {name: layout + model + [f"checkpoint.dir={root / name}"] for name, (layout, model) in VARIANTS.items()}
    results = run_layouts(root, 4, base(data), runs)
    return {name: {"run": results[name], "dir": root / name} for name in VARIANTS}


def batches(data: Path, name: str, validation: bool) -> tuple[list[dict], object]:
    """The validation batches, or the micro-batches of the first training step, of variant `name`
    (as one process sees them with data-parallel size 1) and the config."""
    _, model = VARIANTS[name]
    config = load(None, base(data) + model + ["parallel.tp=2", "parallel.pp=2"])
    layout = validate(config, 4)
    info = stream.resolve(config)
    if validation:
        return list(stream.validation_batches(config, info, layout, 0)), config
    batches = stream.training_batches(config, info, layout, 0, 0, pin_memory=False)
    return [next(batches) for _ in range(layout.grad_accumulation)], config


def hf_spec(folder: Path, loss_batches: list[dict], texts: list[str] = ()) -> dict:
    """What tests/hf_check.py computes on `folder`: logits of the first batch, the loss over all."""
    return {"model": str(folder), "logits_tokens": loss_batches[0]["tokens"].tolist(), "texts": list(texts),
            "loss_batches": [{"tokens": b["tokens"].tolist(), "labels": b["labels"].tolist()} for b in loss_batches]}


@pytest.fixture(scope="module")
def exports(trained, data, tmp_path_factory) -> dict:
    """Each variant exported in fp32 (gqa in files of at most 100 kB) and checked by transformers in
    one process: name -> {folder, summary, validation batches, hf: the results on them}; and
    "first_step_hf_loss": transformers' loss of the gqa export on its first training step's batches."""
    root = tmp_path_factory.mktemp("exports")
    results = {}
    for name in VARIANTS:
        folder = root / f"hf-{name}"
        summary = export(trained[name]["dir"], folder, dtype="fp32",
                         max_shard_bytes=100_000 if name == "gqa" else 2**30)
        results[name] = {"folder": folder, "summary": summary, "validation": batches(data, name, validation=True)[0]}
    first_step, _ = batches(data, "gqa", validation=False)
    checked = hf_check([hf_spec(r["folder"], r["validation"], TEXTS) for r in results.values()]
                       + [hf_spec(results["gqa"]["folder"], first_step)], root)
    for result, hf in zip(results.values(), checked):
        result["hf"] = hf
    return results | {"first_step_hf_loss": checked[-1]["loss"]}


def our_logits(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of our single-process model with the checkpoint's weights."""
    with single_process_model(checkpoint) as (model, reader), torch.no_grad():
        return model(tokens)[..., : reader.args.vocab_size]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_loads_in_transformers_with_our_logits_loss_and_ids(name, trained, exports, data, tmp_path):
    folder, summary, validation, result = (exports[name][key] for key in ("folder", "summary", "validation", "hf"))
    if name == "gqa":  # above the threshold: sharded, with the index transformers reads
        assert len(summary["files"]) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert result["class"] == HF_CLASSES.get(name, "LlamaForCausalLM")

    logits = our_logits(trained[name]["dir"], validation[0]["tokens"])
    logit_diff = (logits - result["logits"]).abs().max().item()
    valid_loss = trained[name]["run"]["valid_loss"][STEPS]  # computed by the distributed model
    print(f"{name}: max |logit diff| {logit_diff:.3g}, HF loss {result['loss']:.6f} vs ours {valid_loss:.6f}")
    assert logit_diff <= 1e-5
    assert abs(result["loss"] - valid_loss) <= 1e-5

    assert Path(summary["tokenizer"]).parent.parent == trained[name]["dir"]  # the checkpoint's own copy
    tokenizer = Tokenizer.load(data / "tok")
    copies = [Tokenizer.load(step / "tokenizer").sha256 for step in sorted(trained[name]["dir"].glob("step_*"))]
    assert copies == [tokenizer.sha256] * (STEPS // 2)  # in every checkpoint
    assert result["ids"] == tokenizer.encode(TEXTS)
    assert result["decoded"] == TEXTS
    assert result["special"] == {"bos": 1, "eos": 2, "pad": 3}
    assert result["generated"].shape == (1, 14)

    if name == "tied":  # the default dtype: the same tensors rounded to bf16
        export(trained[name]["dir"], tmp_path / "bf16")
        assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
        full, half = (safetensors_torch.load_file(folder / "model.safetensors") for folder in (folder, tmp_path / "bf16"))
        assert all(half[key].dtype == torch.bfloat16 and torch.equal(half[key], full[key].bfloat16()) for key in full)


@pytest.mark.multiprocess
def test_hf_roundtrip_first_loss_and_reshard(trained, exports, data, tmp_path):
    exported = tmp_path / "hf"
    export(trained["gqa"]["dir"], exported, dtype="fp32")
    imported = tmp_path / "imported"
    assert cli(["convert", "from-hf", "--model", str(exported), "--out", str(imported), "--tp", "2"]) == 0
    again = tmp_path / "hf-again"
    export(imported, again, dtype="fp32")
    first, second = (safetensors_torch.load_file(folder / "model.safetensors") for folder in (exported, again))
    assert first.keys() == second.keys() and len(first) == 3 * 9 + 3
    assert all(torch.equal(first[key], second[key]) for key in first), "HF -> ours -> HF changed a tensor"

    resharded = tmp_path / "resharded"
    assert cli(["convert", "reshard", "--checkpoint", str(trained["gqa"]["dir"]), "--step", "2",
                "--tp", "1", "--pp", "1", "--out", str(resharded)]) == 0
    export(trained["gqa"]["dir"], tmp_path / "hf-step2", step=2, dtype="fp32")
    export(resharded, tmp_path / "hf-resharded", dtype="fp32")
    before, after = (safetensors_torch.load_file(tmp_path / name / "model.safetensors")
                     for name in ("hf-step2", "hf-resharded"))
    assert all(torch.equal(before[key], after[key]) for key in before), "resharding changed a weight"
    _, model = VARIANTS["gqa"]
    runs = run_layouts(tmp_path, 2, base(data) + model, {
        "from_hf": ["parallel.tp=2", f"checkpoint.dir={imported}", "train.max_steps=1", "train.eval_interval=0"],
        "from_hf_pp2": ["parallel.pp=2", f"checkpoint.dir={tmp_path / 'pp2'}", "train.max_steps=1",
                        f"checkpoint.resume={imported / 'step_00000000'}", "train.eval_interval=0"],
        "resharded": [f"checkpoint.dir={resharded}"],  # TP1 x PP1 x DP2
    })
    hf_loss = exports["first_step_hf_loss"]  # of the same weights, exported in shards
    print(f"imported model's first loss {runs['from_hf']['loss'][1]:.6f}, HF on that batch {hf_loss:.6f}")
    assert abs(runs["from_hf"]["loss"][1] - hf_loss) <= 1e-5
    assert abs(runs["from_hf_pp2"]["loss"][1] - hf_loss) <= 1e-5  # the same weights loaded as pipeline stages

    reference = trained["gqa"]["run"]
    assert sorted(runs["resharded"]["loss"]) == [3, 4]
    diffs = [abs(runs["resharded"]["loss"][s] - reference["loss"][s]) for s in (3, 4)]
    valid_diff = abs(runs["resharded"]["valid_loss"][STEPS] - reference["valid_loss"][STEPS])
    print(f"reshard TP2xPP2 -> TP1xPP1 (DP2): loss diffs {diffs}, validation {valid_diff:.3g}")
    assert max(diffs) <= 1e-5 and valid_diff <= 1e-5


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    """A small Llama saved by transformers itself (GQA, rope_theta 5e5)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5,
                                      max_position_embeddings=SEQ)
    torch.manual_seed(0)
    folder = tmp_path / "hf-model"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_from_hf_refuses_pickles_unless_allowed(hf_folder, tmp_path, capsys):
    tensors = safetensors_torch.load_file(hf_folder / "model.safetensors")
    (hf_folder / "model.safetensors").unlink()
    torch.save(tensors, hf_folder / "pytorch_model.bin")
    assert cli(["convert", "from-hf", "--model", str(hf_folder), "--out", str(tmp_path / "a")]) == 1
    assert "only pickled weights (pytorch_model.bin*)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert cli(["convert", "from-hf", "--model", str(hf_folder), "--out", str(tmp_path / "b"), "--allow-pickle"]) == 0
    reader = CheckpointReader(tmp_path / "b")
    assert reader.args.rope_theta == 5e5 and reader.args.num_kv_heads == 2 and reader.step == 0
    exported = tmp_path / "again"
    export(tmp_path / "b", exported, dtype="fp32", tokenizer="none")
    again = safetensors_torch.load_file(exported / "model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_qwen3_from_hf_and_back_bit_for_bit(tmp_path, capsys):
    """A Qwen3ForCausalLM saved by transformers (q_norm/k_norm random) -> ours (model.qk_norm) -> the same tensors;
    a sliding window is refused by name."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "qwen3")
    assert cli(["convert", "from-hf", "--model", str(tmp_path / "qwen3"), "--out", str(tmp_path / "ours")]) == 0
    assert CheckpointReader(tmp_path / "ours").args.qk_norm
    export(tmp_path / "ours", tmp_path / "again", dtype="fp32", tokenizer="none")
    first, second = (safetensors_torch.load_file(tmp_path / name / "model.safetensors") for name in ("qwen3", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]

    hf_config = json.loads((tmp_path / "qwen3" / "config.json").read_text())
    (tmp_path / "qwen3" / "config.json").write_text(json.dumps({**hf_config, "use_sliding_window": True}))
    assert cli(["convert", "from-hf", "--model", str(tmp_path / "qwen3"), "--out", str(tmp_path / "sliding")]) == 2
    assert "use_sliding_window=True is not implemented" in capsys.readouterr().err


@pytest.mark.parametrize("change, named", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type='mistral'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
])
def test_from_hf_refuses_what_we_do_not_implement(change, named, hf_folder, tmp_path, capsys):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, **change}))
    assert cli(["convert", "from-hf", "--model", str(hf_folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot be converted exactly" in err and named in err
    assert not (tmp_path / "out").exists()


def test_from_hf_checks_the_layout_and_the_output_folder(hf_folder, tmp_path, capsys):
    assert cli(["convert", "from-hf", "--model", str(hf_folder), "--out", str(tmp_path / "o"), "--tp", "4"]) == 2
    assert "model.num_kv_heads=2 is not divisible by parallel.tp=4" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert cli(["convert", "from-hf", "--model", str(hf_folder), "--out", str(tmp_path / "full")]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_to_hf_names_a_torn_checkpoint_and_the_wrong_tokenizer(trained, data, tmp_path, capsys):
    import shutil

    torn = tmp_path / "torn"
    shutil.copytree(trained["tied"]["dir"] / "step_00000004", torn)
    victim = sorted(torn.glob("layer_*"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    assert cli(["convert", "to-hf", "--checkpoint", str(torn), "--out", str(tmp_path / "x")]) == 1
    assert f"{victim.name} has 100 bytes" in capsys.readouterr().err

    train_tokenizer([data / "train.jsonl"], vocab_size=400, out=tmp_path / "uni", model_type="unigram")
    assert cli(["convert", "to-hf", "--checkpoint", str(trained["tied"]["dir"]), "--out", str(tmp_path / "y"),
                "--tokenizer", str(tmp_path / "uni")]) == 2
    assert "is not the tokenizer this checkpoint was trained with" in capsys.readouterr().err
    with pytest.raises(TokenizerError, match="only bpe tokenizers are exported"):
        Tokenizer.load(tmp_path / "uni").export_hf(tmp_path / "z", 64)
