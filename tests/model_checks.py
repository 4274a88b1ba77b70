"""Model checks at a tensor-parallel size, in one launch: torchrun --nproc_per_node TP
model_checks.py OUT.json (test_model.py also calls them in-process at TP1). Rank 0 writes each
rank's figures, per check:

- graph_breaks: torch.compile graph breaks and graphs of one block's forward + backward
  (fullgraph, with and without document masking and activation checkpointing);
- chunked_loss: the chunked head + loss against cross_entropy of the full logits (untied and
  tied embeddings): loss difference and the largest gradient difference over all parameters;
- activations: `pretrain plan`'s activation bytes and those autograd saves in a real forward."""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch._dynamo
from torch._dynamo.utils import counters

from pretrain import parallel
from pretrain.model.args import ExecutionArgs, LlamaArgs
from pretrain.model.execution import apply_execution
from pretrain.model.llama import Llama
from reference import cross_entropy

ARGS = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96, seq_len=32)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS["vocab_size"], (2, ARGS["seq_len"]), generator=generator)
    labels = torch.roll(tokens, -1, 1)
    labels[0, :3] = -100
    document_ids = (torch.rand(2, ARGS["seq_len"], generator=generator) < 0.1).long().cumsum(1)
    return tokens, labels, document_ids


def graph_breaks(tp_group) -> dict[str, dict]:
    tokens, labels, document_ids = batch(0)
    results = {}
    for doc_mask in (False, True):
        for recompute in (False, True):
            torch._dynamo.reset()
            counters.clear()
            model = Llama(LlamaArgs(**ARGS), tp_group)
            apply_execution(model, ExecutionArgs(activation_checkpointing=recompute), compile_blocks=False)
            model.init_weights(seed=1)
            for block in model.layers:  # fullgraph: a break would raise instead of splitting the graph
                block.compile(backend="aot_eager", fullgraph=True)
            model(tokens, document_ids=document_ids if doc_mask else None, labels=labels).backward()
            results[f"doc_mask={doc_mask},recompute={recompute}"] = {
                "breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}
    return results


def chunked_loss(tp_group) -> dict[str, dict]:
    tokens, labels, _ = batch(1)
    results = {}
    for tied in (False, True):
        model = Llama(LlamaArgs(**ARGS, tie_embeddings=tied), tp_group)
        apply_execution(model, ExecutionArgs(loss_chunk_tokens=5), compile_blocks=False)
        model.init_weights(seed=2)
        expected = cross_entropy(model(tokens), labels, ARGS["vocab_size"])
        expected.backward()
        expected_grads = {name: param.grad.clone() for name, param in model.named_parameters()}
        model.zero_grad()
        loss = model(tokens, labels=labels)
        loss.backward()
        grad_difference = max((param.grad - expected_grads[name]).abs().max().item()
                              for name, param in model.named_parameters())
        results["tied" if tied else "untied"] = {"loss_difference": abs(loss.item() - expected.item()),
                                                 "grad_difference": grad_difference}
    return results


def activations(tp_group) -> dict[str, list[float]]:
    from pretrain.plan import activation_bytes
    from test_plan import saved_bytes

    tokens, _, _ = batch(2)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for checkpointing in (False, True):
            args = LlamaArgs(**ARGS)
            model = Llama(args, tp_group)
            apply_execution(model, ExecutionArgs(activation_checkpointing=checkpointing), compile_blocks=False)
            model.init_weights(seed=3)
            measured = saved_bytes(model.to(dtype), tokens)
            predicted = activation_bytes(args, tp_group.size(), 1, 0, tokens.shape[0], dtype.itemsize, checkpointing)
            results[f"{dtype},checkpointing={checkpointing}"] = [predicted, measured]
    return results


def main(out_path: str) -> None:
    context = parallel.initialize(tp=int(os.environ["WORLD_SIZE"]), pp=1, backend="gloo")
    try:
        results = {"graph_breaks": graph_breaks(context.tp_group), "chunked_loss": chunked_loss(context.tp_group),
                   "activations": activations(context.tp_group)}
        gathered = [None] * context.world_size
        dist.all_gather_object(gathered, results)
        if context.rank == 0:
            with open(out_path, "w") as out:
                json.dump(gathered, out, indent=1)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
