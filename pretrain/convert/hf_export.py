"""`pretrain convert to-hf`: a checkpoint of any layout -> a folder that `transformers` loads as
LlamaForCausalLM (Qwen3, Qwen3-MoE or Mixtral: pretrain.model.hf) with no code of ours
(config, generation config, safetensors, tokenizer).

One process, no distributed job: tensors are read one at a time from the memory-mapped
checkpoint files and written out in safetensors files of at most `max_shard_bytes` each, so the
memory needed is about one output file, whatever the size of the model."""

import json
import os
import time
from pathlib import Path

import torch

from pretrain.checkpoint import CheckpointError
from pretrain.convert.reader import SAFETENSORS_INDEX, CheckpointReader, checkpoint_tokenizer
from pretrain.model.hf import hf_config, to_hf_tensors
from pretrain.outputs import staged
from pretrain.tokenizer import SPECIAL_IDS, TokenizerError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def write_safetensors(tensors, out: Path, max_shard_bytes: int, always_index: bool = False) -> dict[str, str]:
    """Write (name, tensor) pairs, in order, as `model.safetensors` or, when they exceed
    max_shard_bytes, as `model-0000i-of-0000n.safetensors` plus the index Hugging Face reads
    (`always_index`: also for one file). Returns name -> file."""
    from safetensors.torch import save_file

    files, shard, shard_bytes, total = [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            files.append(out / f"model-{len(files) + 1:05d}.safetensors.tmp")
            save_file(shard, files[-1], metadata={"format": "pt"})
            shard, shard_bytes = {}, 0

    weight_map = {}
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor.contiguous()
        shard_bytes, total = shard_bytes + size, total + size
        weight_map[name] = len(files)
    flush()
    if len(files) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for file, name in zip(files, names):
        os.replace(file, out / name)
    weight_map = {name: names[index] for name, index in weight_map.items()}
    if len(files) > 1 or always_index:
        (out / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return weight_map


def export(checkpoint: str | Path, out: str | Path, step: int | None = None, dtype: str = "bf16",
           tokenizer: str | None = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Export one checkpoint step; returns a summary (step, parameters, bytes, files, seconds)."""
    started = time.perf_counter()
    reader = CheckpointReader(checkpoint, step)
    args, out = reader.args, Path(out)
    spm = checkpoint_tokenizer(reader, tokenizer)
    if spm is not None and spm.vocab_size > args.vocab_size:
        raise TokenizerError(f"{spm.path} has {spm.vocab_size} tokens, the model only {args.vocab_size}")
    target = DTYPES[dtype]
    parameters = 0

    def tensors():
        nonlocal parameters
        for name in reader.names():
            for hf_name, tensor in to_hf_tensors(name, reader.tensor(name), args):
                parameters += tensor.numel()
                yield hf_name, tensor.to(target)

    with staged(out, "convert to-hf", refusal=CheckpointError) as partial:
        weight_map = write_safetensors(tensors(), partial, max_shard_bytes)
        ids = spm.card["special_ids"] if spm else SPECIAL_IDS
        config = hf_config(args, target, ids["bos"], ids["eos"], ids["pad"])
        (partial / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        (partial / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}, indent=1) + "\n")
        if spm is not None:
            spm.export_hf(partial, model_max_length=args.seq_len)
    files = sorted(set(weight_map.values()))
    return {"checkpoint": str(reader.path), "step": reader.step, "parameters": parameters,
            "bytes": sum((out / f).stat().st_size for f in files), "files": files,
            "tokenizer": str(spm.path) if spm else None, "seconds": round(time.perf_counter() - started, 2)}
