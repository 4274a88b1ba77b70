"""`pretrain generate` and `pretrain eval` (validation loss on shards, or downstream tasks): a
checkpoint of any layout (TP, PP, ZeRO, resharded, or from `pretrain convert from-hf`) loaded whole
into one process, on CPU or one GPU."""

import json
import math
import time
from pathlib import Path

import torch

from pretrain import parallel
from pretrain.config import Config, Precision, validate
from pretrain.convert.reader import CheckpointReader, LazyTensors, checkpoint_tokenizer
from pretrain.data import stream
from pretrain.downstream.scoring import encode_requests, results_table, score_task
from pretrain.downstream.tasks import load_task
from pretrain.generate import GenerateError, ModelDecoder, Sampling, generate
from pretrain.model.llama import Llama
from pretrain.model.weights import buffer_names, load_full_state_dict
from pretrain.tokenizer import Tokenizer, TokenizerError


def load_model(reader: CheckpointReader, device: torch.device, dtype: torch.dtype) -> Llama:
    """The checkpoint's weights in a model of one process (its process group stays up until
    parallel.shutdown())."""
    model = Llama(reader.args, parallel.initialize(tp=1, pp=1, backend="gloo").tp_group)
    load_full_state_dict(model, LazyTensors(reader), tp_rank=0, tp=1)
    with torch.no_grad():
        for name in buffer_names(reader.args):  # aux-loss-free balancing's router biases
            model.get_buffer(name).copy_(reader.tensor(name))
    return model.to(device=device, dtype=dtype).eval()


def resolve_device(name: str) -> torch.device:
    """`auto`: a GPU if there is one, else the CPU; otherwise the device named (cpu, cuda, cuda:N),
    checked to be here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise GenerateError(f"--device {name} is not a device here: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            build = "a CPU build of torch" if torch.version.cuda is None else "no GPU visible to CUDA"
            raise GenerateError(f"--device {name}: there is no CUDA GPU here ({build}); use --device cpu or auto")
        if (device.index or 0) >= count:
            raise GenerateError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def _tokenizer(reader: CheckpointReader, override: str | None) -> Tokenizer:
    """The checkpoint's tokenizer, or the folder `override` names."""
    spm = checkpoint_tokenizer(reader, override)
    if spm is None:
        raise TokenizerError(f"{reader.path} records no tokenizer: pass --tokenizer DIR")
    return spm


def _dtype(config: Config, device: torch.device) -> torch.dtype:
    """fp32 on a CPU or for a run trained in fp32, else bf16."""
    return torch.float32 if config.train.precision == Precision.fp32 or device.type == "cpu" else torch.bfloat16


def run_generate(checkpoint: str, step: int | None, prompts: list[str], sampling: Sampling, tokenizer: str | None,
                 device: str = "auto", use_cache: bool = True) -> list[list[int]]:
    """Print each prompt's completion and the decoding speed; returns the new token ids."""
    reader = CheckpointReader(checkpoint, step)
    spm = _tokenizer(reader, tokenizer)
    target = resolve_device(device)
    try:
        model = load_model(reader, target, torch.bfloat16 if target.type == "cuda" else torch.float32)
        started = time.perf_counter()
        ids = generate(ModelDecoder(model), spm.encode(prompts), sampling, spm.eos_id, spm.pad_id, use_cache)
        seconds = time.perf_counter() - started
    finally:
        parallel.shutdown()
    completions = [spm.decode(row) for row in ids]
    for prompt, completion in zip(prompts, completions):
        print(f"--- {prompt!r}\n{prompt}{completion}")
    new = sum(map(len, ids))
    print(f"{new} new tokens for {len(prompts)} prompt(s) in {seconds:.2f} s: {new / seconds:,.1f} tokens/s "
          f"({'with' if use_cache else 'without'} a KV cache, {target})")
    return ids


def run_eval(checkpoint: str, step: int | None, data: str, batches: int | None, out: str | None,
             device: str = "auto", allow_tokenizer_mismatch: bool = False) -> dict:
    """Mean loss per predicted token and perplexity over the first `batches` global batches of
    `data` (default: the run's train.eval_steps), as the trainer's valid/loss counts them. The
    shards are checked against their manifest, and their tokenizer against the checkpoint's."""
    reader = CheckpointReader(checkpoint, step)
    config: Config = reader.config
    config.data.valid_path, config.train.eval_steps = data, batches or config.train.eval_steps
    config.data.path, config.data.tokenizer = data, ""
    # one process holds the whole model (the reader joins TP, PP and expert-parallel shards)
    config.parallel.tp = config.parallel.pp = config.parallel.cp = config.parallel.ep = 1
    config.parallel.sequence_parallel = "auto"
    info = stream.resolve(config)
    stream.verify_shards(info, rank=0, world_size=1, tolerate=False)
    recorded = (reader.client_state.get("tokenizer") or {}).get("sha256")
    if recorded and recorded != info.tokenizer_sha256 and not allow_tokenizer_mismatch:
        raise TokenizerError(f"{data} was built with another tokenizer (sha256 {info.tokenizer_sha256[:12]}) than "
                             f"{reader.path} was trained with ({recorded[:12]}): its loss there would mean nothing. "
                             "Build the shards with the checkpoint's tokenizer (its copy is in the checkpoint's "
                             "tokenizer/), or pass --allow-tokenizer-mismatch to measure it anyway")
    layout = validate(config, 1)
    target = resolve_device(device)
    try:
        model = load_model(reader, target, _dtype(config, target))
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in stream.validation_batches(config, info, layout, dp_rank=0):
                batch = {name: tensor.to(target) for name, tensor in batch.items() if torch.is_tensor(tensor)}
                predicted = int((batch["labels"] != -100).sum())
                loss = model(batch["tokens"], batch.get("position_ids"), batch.get("document_ids"), batch["labels"])
                total, count = total + float(loss) * predicted, count + predicted
    finally:
        parallel.shutdown()
    result = {"checkpoint": str(reader.path), "step": reader.step, "data": data, "batches": config.train.eval_steps,
              "tokens": count, "loss": total / count, "ppl": math.exp(min(total / count, 50.0))}
    print(f"{reader.path} on {data}: loss {result['loss']:.4f}, perplexity {result['ppl']:.2f} over "
          f"{count:,} tokens ({result['batches']} batches)")
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_downstream(checkpoint: str, step: int | None, tasks: list[str], examples: int = 0, fewshot: int | None = None,
                   seed: int = 1234, out: str | None = None, device: str = "auto", tokenizer: str | None = None,
                   log_examples: bool = False) -> dict:
    """Score downstream tasks (see pretrain.downstream.tasks.read_spec) on a checkpoint as training
    scores them; prints a table, and writes the metrics (with `log_examples` every example's
    results) as JSON to `out`."""
    loaded = [load_task(reference, examples, fewshot, seed) for reference in tasks]
    reader = CheckpointReader(checkpoint, step)
    spm = _tokenizer(reader, tokenizer)
    requests = [encode_requests(task, spm, reader.args.seq_len) for task in loaded]
    target = resolve_device(device)
    config: Config = reader.config
    batch_tokens = config.train.micro_batch_size * config.model.seq_len
    try:
        decoder = ModelDecoder(load_model(reader, target, _dtype(config, target)))
        results = [score_task(task, task_requests, decoder, batch_tokens, config.execution.loss_chunk_tokens,
                              device=target) for task, task_requests in zip(loaded, requests)]
    finally:
        parallel.shutdown()
    table = results_table([(reader.step, task.name, result) for task, result in zip(loaded, results)])
    print(f"{reader.path}, {target}:\n{table}")
    summary = {"checkpoint": str(reader.path), "step": reader.step, "tasks": {
        task.name: {**result.metrics, "examples": len(task.examples), "seconds": result.seconds,
                    **({"samples": result.examples(task)} if log_examples else {})}
        for task, result in zip(loaded, results)}}
    if out:
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    return summary
