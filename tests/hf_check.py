"""Loads exported folders with transformers alone (this file never imports pretrain) and
writes what the tests compare: python hf_check.py SPECS.json OUT.pt (conftest.hf_check).

SPECS: a list of {"model": folder, "logits_tokens": [[ids]], "loss_batches": [{"tokens": [[ids]], "labels": [[ids]]}],
       "texts": [str], optionally "generate": {"prompts": [str], "max_new_tokens": n}}. OUT holds, per spec, the
logits, the mean loss over all labelled tokens of loss_batches, the AutoTokenizer ids of the
texts and their decoded strings, a greedy generation, and with "generate" the greedy new ids of
each prompt (one at a time, up to its EOS)."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def check(spec: dict) -> dict:
    model = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
    out = {"class": type(model).__name__}
    with torch.no_grad():
        out["logits"] = model(torch.tensor(spec["logits_tokens"])).logits
        total, count = 0.0, 0
        for batch in spec["loss_batches"]:
            logits = model(torch.tensor(batch["tokens"])).logits
            labels = torch.tensor(batch["labels"])
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(),
                                                       reduction="sum").item()
            count += int((labels != -100).sum())
        out["loss"] = total / max(count, 1)
        prompt = torch.tensor(spec["logits_tokens"][:1])[:, :8]
        out["generated"] = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    if spec.get("texts"):
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        out["ids"] = tokenizer(spec["texts"])["input_ids"]
        out["decoded"] = [tokenizer.decode(ids) for ids in out["ids"]]
        out["special"] = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    if spec.get("generate"):
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        out["generations"] = []
        for prompt in spec["generate"]["prompts"]:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                new = model.generate(ids, max_new_tokens=spec["generate"]["max_new_tokens"], do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = new[0, ids.shape[1]:].tolist()
            out["generations"].append(new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new)
    return out


def main(specs_path: str, out_path: str) -> None:
    results = [check(spec) for spec in json.loads(open(specs_path).read())]
    assert not any(name == "pretrain" or name.startswith("pretrain.") for name in sys.modules)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
