"""`pretrain bench generate`: decoding speed with the KV cache beside recomputing the whole
sequence for every new token, for a config's model shape (randomly initialised weights: the
speed does not depend on them; no EOS stops a row early). Both must give the same tokens."""

import json
import time
from pathlib import Path

import torch

from pretrain import parallel
from pretrain.config import load
from pretrain.generate import ModelDecoder, Sampling, generate
from pretrain.inference import resolve_device
from pretrain.model.llama import Llama

ROWS = ("no_cache", "kv_cache")


def main(config_path: str, new_tokens: int, batch: int, prompt_tokens: int, out: str | None,
         device: str = "auto") -> int:
    args = load(config_path).model
    target = resolve_device(device)
    dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    prompts = torch.randint(3, args.vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    sampling = Sampling(max_new_tokens=new_tokens)
    try:
        model = Llama(args, parallel.initialize(tp=1, pp=1, backend="gloo").tp_group)
        model.init_weights(seed=0)
        decoder = ModelDecoder(model.to(device=target, dtype=dtype).eval())
        tokens, rows = {}, {}
        for row in ROWS:
            started = time.perf_counter()
            tokens[row] = generate(decoder, prompts.tolist(), sampling, eos_id=-1, pad_id=0,
                                   use_cache=row == "kv_cache")
            if target.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            rows[row] = {"seconds": seconds, "tokens_per_sec": batch * new_tokens / seconds}
    finally:
        parallel.shutdown()
    same = tokens["no_cache"] == tokens["kv_cache"]
    speedup = rows["kv_cache"]["tokens_per_sec"] / rows["no_cache"]["tokens_per_sec"]
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{config_path}: {parameters / 1e6:.1f}M parameters, {batch} prompt(s) of {prompt_tokens} tokens, "
          f"{new_tokens} new tokens each, {dtype} on {target}")
    print(f"{'':10} {'tokens/s':>10} {'seconds':>9}")
    for row in ROWS:
        print(f"{row:10} {rows[row]['tokens_per_sec']:>10,.1f} {rows[row]['seconds']:>9.2f}")
    print(f"kv_cache / no_cache: {speedup:.1f}x; same tokens: {same}")
    if out:
        Path(out).write_text(json.dumps({"config": config_path, "parameters": parameters, "batch": batch,
                                         "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                                         "device": str(target), "rows": rows, "speedup": speedup,
                                         "same_tokens": same}, indent=1) + "\n")
    return 0 if same else 1
