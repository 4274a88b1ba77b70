"""Sequence- and context-parallel model checks for a launch of 4 processes (dist_runs.py calls
checks() after its trainings). Every rank's figures:

- saved: per layout (TP2 and TP4 with sequence parallelism, CP2, CP4; fp32 and bf16), the bytes
  a forward keeps for backward on this rank and `pretrain plan`'s activation prediction;
- graph_breaks: torch.compile graph breaks and graphs of a TP2 + SP block's forward + backward;
- memory: a CP4 forward + backward at a long sequence: the process's peak resident memory above
  its baseline (after imports and model build), beside the plan's activations of one process."""

import ctypes
import gc

import torch
import torch._dynamo
import torch.distributed as dist
from torch._dynamo.utils import counters

from pretrain import plan
from pretrain.model.args import ExecutionArgs, LlamaArgs
from pretrain.model.context_parallel import shard_batch
from pretrain.model.execution import apply_execution
from pretrain.model.llama import Llama
from pretrain.model.parallelize import apply_context_parallel, apply_sequence_parallel

ARGS = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, ffn_hidden_size=96, seq_len=64)
MEMORY_ARGS = dict(vocab_size=300, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, ffn_hidden_size=512,
                   seq_len=4096)


def consecutive(size: int) -> dist.ProcessGroup:
    """This rank's group of `size` consecutive ranks (every rank creates every group, in one order)."""
    groups = [dist.new_group(list(range(start, start + size))) for start in range(0, dist.get_world_size(), size)]
    return groups[dist.get_rank() // size]


def build(args: LlamaArgs, tp_group, cp_group=None, sequence_parallel=False) -> Llama:
    model = Llama(args, tp_group)
    apply_execution(model, ExecutionArgs(), compile_blocks=False)
    if sequence_parallel:
        apply_sequence_parallel(model, tp_group)
    if cp_group is not None:
        apply_context_parallel(model, cp_group)
    model.init_weights(seed=3)
    return model


def batch(args: LlamaArgs, cp_group=None) -> dict:
    """One micro-batch of 2 sequences, this rank's chunks of it under context parallelism."""
    tokens = torch.randint(0, args.vocab_size, (2, args.seq_len), generator=torch.Generator().manual_seed(0))
    whole = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}
    return whole if cp_group is None else shard_batch(whole, cp_group.size(), cp_group.rank())


def saved_bytes(model: torch.nn.Module, inputs: dict) -> int:
    """Bytes autograd keeps for backward after a forward with labels, each storage once (by its
    identity: a released storage's address may be reused), weights excluded; a storage's size is
    read after the forward (context parallelism releases some)."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            storages.setdefault(storage._cdata, storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(inputs["tokens"], inputs.get("position_ids"), labels=inputs["labels"])
    total = sum(storage.nbytes() for storage in storages.values())
    loss.backward()  # the collectives of backward, on every rank of the group
    return total


def saved(tp2, tp4, cp2, cp4, alone) -> dict[str, list[float]]:
    args = LlamaArgs(**ARGS)
    layouts = {"tp2_sp": (tp2, None, True), "tp4_sp": (tp4, None, True), "cp2": (alone, cp2, False),
               "cp4": (alone, cp4, False)}
    results = {}
    for name, (tp_group, cp_group, sequence_parallel) in layouts.items():
        for dtype in (torch.float32, torch.bfloat16):
            model = build(args, tp_group, cp_group, sequence_parallel).to(dtype)
            measured = saved_bytes(model, batch(args, cp_group))
            predicted = plan.activation_bytes(args, tp_group.size(), 1, 0, 2, dtype.itemsize, False, sequence_parallel,
                                              cp_group.size() if cp_group is not None else 1)
            results[f"{name},{dtype}"] = [predicted, measured]
    return results


def graph_breaks(tp2) -> dict:
    torch._dynamo.reset()
    counters.clear()
    args = LlamaArgs(**ARGS)
    model = build(args, tp2, sequence_parallel=True)
    for block in model.layers:  # fullgraph: a break would raise instead of splitting the graph
        block.compile(backend="aot_eager", fullgraph=True)
    inputs = batch(args)
    model(inputs["tokens"], labels=inputs["labels"]).backward()
    return {"breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_above_baseline(step) -> int:
    """Bytes of resident memory `step()` needs at its peak above what the process holds before it."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the peak (VmHWM) to the current resident size
    baseline = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - baseline) * 1024


def memory(cp4, alone) -> dict[str, float]:
    args = LlamaArgs(**MEMORY_ARGS)
    model = build(args, alone, cp4)
    tokens = torch.randint(0, args.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    inputs = shard_batch({"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}, 4, cp4.rank())

    def step():
        model(inputs["tokens"], inputs["position_ids"], labels=inputs["labels"]).backward()

    return {"cp4_peak": peak_above_baseline(step),
            "cp4_activations": plan.activation_bytes(args, 1, 1, 0, 1, 4, False, False, 4),
            "cp4_working": plan.context_parallel_working_bytes(args, 1, 1, 4),
            "single_activations": plan.activation_bytes(args, 1, 1, 0, 1, 4, False)}


def checks() -> list[dict]:
    """Every rank's figures (collective: every rank returns all of them)."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD fixed: freed tensors leave the resident set
    alone, tp2, tp4 = consecutive(1), consecutive(2), consecutive(4)
    results = {"memory": memory(tp4, alone), "saved": saved(tp2, tp4, tp2, tp4, alone),
               "graph_breaks": graph_breaks(tp2) if dist.get_rank() < 2 else None}  # one TP2 group compiles
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return gathered
