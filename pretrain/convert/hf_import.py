"""`pretrain convert from-hf`: a Hugging Face folder (Llama, Qwen3, Qwen3-MoE, Mixtral) -> a
checkpoint.dir to continue pretraining from, plus the config to train it with.

Downloaded folders are untrusted: weights come from safetensors; pickled `pytorch_model*.bin`
files are read only with --allow-pickle, and then with torch.load(weights_only=True). The result
is a `weights` checkpoint (format in complete.json): the full tensors under our names, which the
trainer loads into its shards at the start (step 0, a fresh optimizer) at the TP/PP it was
checked for. The tokenizer, when the folder has a sentencepiece `tokenizer.model`, becomes
OUT/tokenizer (build the training shards with it)."""

import json
from collections.abc import Callable
from pathlib import Path

import torch

from pretrain.checkpoint import LATEST, TOKENIZER_DIR, WEIGHTS, CheckpointError, layout_record, step_dir, write_marker
from pretrain.config import Config, to_yaml, validate_without_data
from pretrain.convert.hf_export import write_safetensors
from pretrain.model.hf import args_from_hf_config, from_hf_tensor, hf_names
from pretrain.model.weights import parameter_names
from pretrain.outputs import staged
from pretrain.tokenizer import MODEL_FILE, describe_model

# Buffers some exports carry that the model recomputes.
IGNORED = (".rotary_emb.inv_freq",)


def hf_weights(model: Path, allow_pickle: bool) -> tuple[Callable[[str], torch.Tensor], set[str]]:
    """A reader of the folder's tensors by name, and the set of their names."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (model / single).is_file():
            weight_map = None
        else:
            continue
        if single.endswith(".bin") and not allow_pickle:
            raise CheckpointError(
                f"{model} has only pickled weights ({single}*), which can run code when loaded: convert them to "
                "safetensors first, or pass --allow-pickle if you trust the source (they are then read with "
                "torch.load(weights_only=True))")
        return (_safetensors_reader if single.endswith(".safetensors") else _pickle_reader)(model, single, weight_map)
    raise CheckpointError(f"{model} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin: "
                          "not a Hugging Face model folder")


def _safetensors_reader(model: Path, single: str, weight_map: dict | None):
    files = sorted(set(weight_map.values())) if weight_map else [single]
    handles = {file: _open_safetensors(model / file) for file in files}
    where = weight_map or {name: single for name in handles[single].keys()}
    return (lambda name: handles[where[name]].get_tensor(name)), set(where)


def _open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the model folder is incomplete (its index names it)")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as error:
        raise CheckpointError(f"{path} cannot be read ({error}): the file is damaged or incomplete; download it "
                              "again") from None


def _pickle_reader(model: Path, single: str, weight_map: dict | None):
    files = sorted(set(weight_map.values())) if weight_map else [single]
    loaded = {file: torch.load(model / file, map_location="cpu", mmap=True, weights_only=True) for file in files}
    where = {name: file for file, tensors in loaded.items() for name in tensors}
    return (lambda name: loaded[where[name]][name]), set(where)


def import_hf(model: str | Path, out: str | Path, tp: int = 1, pp: int = 1, allow_pickle: bool = False) -> Path:
    """Convert; returns the path of the written config.yaml."""
    model, out = Path(model), Path(out)
    if not (model / "config.json").is_file():
        raise CheckpointError(f"{model} has no config.json: not a Hugging Face model folder")
    try:
        hf_config = json.loads((model / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{model / 'config.json'} is not valid JSON ({error}): not a Hugging Face model folder, "
                              "or a damaged one") from None
    args = args_from_hf_config(hf_config)
    config = Config(model=args)
    config.parallel.tp, config.parallel.pp = tp, pp
    config.train.global_batch_size = config.train.micro_batch_size
    validate_without_data(config, tp * pp)  # the data comes later

    tensor, available = hf_weights(model, allow_pickle)
    names = parameter_names(args)
    wanted = {hf for name in names for hf in hf_names(name, args)}
    missing = sorted(wanted - available)
    unknown = sorted(n for n in available - wanted if not n.endswith(IGNORED) and n != "lm_head.weight")
    if missing or unknown:
        raise CheckpointError(f"{model}'s weights do not match its config.json: missing {missing[:5]}, "
                              f"unexpected {unknown[:5]}")

    with staged(out, "convert from-hf", refusal=CheckpointError) as partial:
        step = step_dir(partial, 0)
        step.mkdir()
        write_safetensors(((name, from_hf_tensor(name, tensor, args)) for name in names), step,
                          max_shard_bytes=5 * 2**30, always_index=True)
        if (model / MODEL_FILE).is_file():
            card = describe_model(model / MODEL_FILE, partial / TOKENIZER_DIR, source=str(model))
            config.data.tokenizer = str((out / TOKENIZER_DIR).resolve())
            if card["vocab_size"] > args.vocab_size:
                raise CheckpointError(f"{model}/{MODEL_FILE} has {card['vocab_size']} tokens, the model only "
                                      f"{args.vocab_size}")
        config.checkpoint.dir = str(out.resolve())
        config.log.dir = str((out / "log").resolve())
        client_state = {"step": 0, "tokens": 0, "data": {"consumed_samples": 0}, "config": to_yaml(config),
                        "tokenizer": {"path": config.data.tokenizer,
                                      "sha256": card["sha256"] if config.data.tokenizer else None},
                        "converted_from": str(model.resolve())}
        write_marker(step, WEIGHTS, 0, layout_record(tp, pp, None), client_state=client_state)
        (partial / LATEST).write_text(step.name + "\n")
        (partial / "config.yaml").write_text(to_yaml(config))
    return out / "config.yaml"
