"""The bytes of the tensors a DeepSpeed engine holds on this rank, by what they are: weights,
gradients, optimizer state, buffers (the measurement `pretrain plan` is tested against).

The object graph is walked breadth-first from the model's parameters, the optimizer wrapper and
the engine (containers, modules, optimizers, tensors' attributes and .grad, and the attributes of
deepspeed/torch.optim/pretrain/megatron objects). Every storage counts once, whole (a view of a
flat buffer counts the buffer), under the first category among the paths reaching it in the
order weights > optimizer > gradients > buffers; what a path names decides its category."""

import re
import types
from collections import deque

import torch

GRADIENT_NAMES = ("grad_accum", "averaged_gradients", "grads_in_partition", "ipg_bucket", "ipg_buffer",
                  "grad_partitions", "all_grad_tensors", "gradient_dict", "fp32_groups_gradient",
                  "extra_large_param_to_reduce", "temp_grad", "__param_id_to_grad_partition")
OPTIMIZER_NAMES = (".state[", "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups",
                   "hp_fragment", "optim_fragment", "['params']", "fp32_groups_flat_partition")
WEIGHT_NAMES = ("bit16_groups_flat", "parallel_partitioned_bit16_groups", "fp16_partitioned_groups_flat",
                "ds_tensor", "fp16_groups_flat", "bf16_groups_flat", "bit16_partitioned_groups_flat")
FOLLOWED = ("deepspeed", "torch.optim", "pretrain", "megatron")
SKIPPED = {"ds_param_alias", "param_names", "lr_scheduler", "_hp_mapping", "timers", "monitor", "checkpoint_engine",
           "_config", "config", "_param_slice_mappings", "param_dict", "training_dataloader", "data_iterator"}
PRIORITY = {"weights": 0, "optimizer": 1, "gradients": 2, "buffers": 3}
BUCKET = re.compile(r"ipg_buckets\[[^\]]*\]\.buffer")  # the reduction bucket, whatever its views are called
GRAD = re.compile(r"\.grad(?=$|[.\[])")
PIPELINE = re.compile(r"^engine\.(pipe_|_grad_layer_buf|grad_layer|grad_partition_grad_layer_meta_cache|meta_buffer|"
                      r"first_output|fwd_outputs)")  # activation buffers of the pipeline engine


def _category(path: str, from_parameter: bool) -> str:
    if PIPELINE.match(path):
        return "buffers"
    if GRAD.search(path) or any(name in path for name in GRADIENT_NAMES):
        return "gradients"
    if from_parameter:
        return "weights"
    if any(name in path for name in OPTIMIZER_NAMES):
        return "optimizer"
    return "weights" if any(name in path for name in WEIGHT_NAMES) else "buffers"


def measure(engine) -> dict[str, int]:
    """Bytes per category on this rank."""
    queue = deque([(p, f"param:{n}", True, 0) for n, p in engine.module.named_parameters()]
                  + [(b, f"buffer:{n}", False, 0) for n, b in engine.module.named_buffers()]
                  + [(engine.optimizer, "opt", False, 0), (engine, "engine", False, 0)])
    seen, storages = set(), {}
    while queue:
        obj, path, from_parameter, depth = queue.popleft()
        if obj is None or depth > 14 or isinstance(obj, (str, bytes, int, float, bool, complex, type, types.ModuleType,
                                                         types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
            continue
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage() if obj.device.type != "meta" else None
            if storage is not None and storage.nbytes() > 0:
                record = storages.setdefault((obj.device.type, storage.data_ptr()),
                                             {"bytes": storage.nbytes(), "category": "buffers", "bucket": False})
                record["bucket"] |= bool(BUCKET.search(path))
                category = "buffers" if record["bucket"] else _category(path, from_parameter)
                if PRIORITY[category] < PRIORITY[record["category"]] or record["bucket"]:
                    record["category"] = category
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.is_leaf and obj.grad is not None:
                queue.append((obj.grad, path + ".grad", False, depth + 1))
            queue.extend((v, f"{path}.{k}", False, depth + 1) for k, v in vars(obj).items() if k not in SKIPPED)
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            for key, value in list(obj.items()):
                queue.append((value, f"{path}[{'<t>' if isinstance(key, torch.Tensor) else repr(key)}]", False,
                              depth + 1))
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            queue.extend((value, f"{path}[{i}]", False, depth + 1) for i, value in enumerate(obj))
        elif isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)) or (type(obj).__module__ or "").startswith(FOLLOWED):
            queue.extend((v, f"{path}.{k}", False, depth + 1) for k, v in vars(obj).items() if k not in SKIPPED)
            queue.extend((getattr(obj, s), f"{path}.{s}", False, depth + 1)
                         for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s))
    totals = dict.fromkeys(PRIORITY, 0)
    for record in storages.values():
        totals[record["category"]] += record["bytes"]
    return totals
