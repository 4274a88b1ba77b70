"""A checkpoint of any layout, read as full tensors under single-stage names, one at a time.

Three kinds of step directory hold weights (`format` in complete.json):
- deepspeed (written by training): per TP rank `mp_rank_XX_model_states.pt` (PP=1, ZeRO 0-2),
  per pipeline layer and TP rank `layer_XX-model_YY-model_states.pt` (PP>1), or, with ZeRO-3,
  fp32 partitions per data-parallel rank in `zero_pp_rank_D_mp_rank_XX_optim_states.pt`; under
  expert parallelism the experts in `experts_ep_rank_XX.pt`, num_experts / ep of each tensor per rank;
- universal (written by `pretrain convert reshard`): `zero/<name>/fp32.pt`, full tensors;
- weights (written by `pretrain convert from-hf`): full tensors in safetensors files.
Files are memory-mapped and only the slices a tensor needs are read, so converting a model
never holds more than the tensor at hand (plus what the page cache keeps)."""

import json
import sys
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import torch

from pretrain.checkpoint import (
    DEEPSPEED, MARKER, UNIVERSAL_FORMAT, WEIGHTS, CheckpointError, experts_file, find_checkpoint, read_marker,
    replicas, safe_load, step_dir, tokenizer_dir, torn_reason,
)
from pretrain.config import Config, from_yaml
from pretrain.model.args import LlamaArgs
from pretrain.model.pipeline import pipeline_name
from pretrain.model.weights import EXPERTS, VOCAB_PARAMETERS, parameter_names, partition_dim
from pretrain.tokenizer import Tokenizer, TokenizerError

SAFETENSORS_INDEX = "model.safetensors.index.json"


def resolve_step(path: str | Path, step: int | None = None) -> Path:
    """A step directory, given itself or its checkpoint.dir (then `step`, or the newest complete one)."""
    path = Path(path)
    if step is not None:
        path = step_dir(path, step)
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist: list the step_* folders and pass one of their steps")
    elif not (path / MARKER).is_file() and not path.name.startswith("step_"):
        found = find_checkpoint(path, "auto")
        if found is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (no step_*/{MARKER}): pass a checkpoint.dir "
                                  "of a run that saved one, or one step_* folder")
        return found
    reason = torn_reason(path)
    if reason:
        raise CheckpointError(f"{path} cannot be read: {reason}")
    return path


class CheckpointReader:
    """Full tensors of one complete checkpoint step (see the module docstring)."""

    def __init__(self, path: str | Path, step: int | None = None):
        self.path = resolve_step(path, step)
        self.marker = read_marker(self.path)
        self.format = self.marker.get("format", DEEPSPEED)
        self._files: dict[Path, dict] = {}

    @cached_property
    def client_state(self) -> dict:
        """What training recorded besides the tensors: step, tokens, config (YAML), tokenizer."""
        if self.format == WEIGHTS:
            return self.marker["client_state"]
        candidates = sorted(self.path.glob("*mp_rank_00_model_states.pt"))
        if not candidates:
            raise CheckpointError(f"{self.path} has no mp_rank_00_model_states.pt: not a checkpoint of this framework")
        return safe_load(candidates[0], mmap=True)

    @cached_property
    def config(self) -> Config:
        return from_yaml(self.client_state["config"])

    @property
    def args(self) -> LlamaArgs:
        return self.config.model

    @property
    def step(self) -> int:
        return self.client_state["step"]

    @property
    def layout(self) -> dict:
        return self.marker["layout"]

    def names(self) -> list[str]:
        return parameter_names(self.args)

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor of a parameter, vocabulary padding removed, in its stored dtype."""
        if self.format == WEIGHTS:
            full = self._safetensors(name)
        elif self.format == UNIVERSAL_FORMAT:
            stored = name if self.layout["pp"] == 1 else pipeline_name(name, self.args)
            full = safe_load(self.path / "zero" / stored / "fp32.pt", mmap=True)["param"]
        elif self.layout.get("ep", 1) > 1 and name.endswith(EXPERTS):
            full = torch.cat([self._file(experts_file(ep_rank))[name] for ep_rank in range(self.layout["ep"])])
        else:
            dim = partition_dim(name)
            shards = [self._shard(name, tp_rank) for tp_rank in range(self.layout["tp"] if dim is not None else 1)]
            full = torch.cat(shards, dim) if len(shards) > 1 else shards[0]
        if name in VOCAB_PARAMETERS:
            full = full[: self.args.vocab_size]
        return full

    def _file(self, name: str) -> dict:
        path = self.path / name
        if path not in self._files:
            self._files[path] = safe_load(path, mmap=True)
        return self._files[path]

    @property
    def _zero_stage(self) -> int:
        return self.client_state["ds_config"]["zero_optimization"]["stage"]

    def _shard(self, name: str, tp_rank: int) -> torch.Tensor:
        if self.layout["pp"] > 1:
            layer, local = pipeline_name(name, self.args).split(".", 1)
            if layer == "tied_modules":  # the tied embedding is saved with the first layer
                layer, local = "0", local.split(".", 1)[1]
            return self._file(f"layer_{int(layer):02d}-model_{tp_rank:02d}-model_states.pt")[local]
        if self._zero_stage == 3:
            return self._zero3_shard(name, tp_rank)
        return self._file(f"mp_rank_{tp_rank:02d}_model_states.pt")["module"][name]

    def _zero3_shard(self, name: str, tp_rank: int) -> torch.Tensor:
        """ZeRO-3 keeps no whole weights: each of DeepSpeed's data-parallel ranks (dp x cp) holds
        ceil(numel / ranks) elements of every parameter (fp32, zero-padded at the end), one after the other."""
        dp = replicas(self.layout)
        shapes = self._file(f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
        for group_index, group in enumerate(shapes):
            offset = 0
            for param_name, shape in group.items():
                part = -(-shape.numel() // dp)
                if param_name == name:
                    pieces = [self._zero3_group(dp_rank, tp_rank, group_index).narrow(0, offset, part)
                              for dp_rank in range(dp)]
                    return torch.cat(pieces)[: shape.numel()].view(shape)
                offset += part
        raise CheckpointError(f"{self.path}: {name} is not in the ZeRO-3 partitions of TP rank {tp_rank}")

    def _zero3_group(self, dp_rank: int, tp_rank: int, group_index: int) -> torch.Tensor:
        state = self._file(f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt")["optimizer_state_dict"]
        return state["fp32_flat_groups"][group_index]

    @cached_property
    def _weight_map(self) -> dict[str, str]:
        return json.loads((self.path / SAFETENSORS_INDEX).read_text())["weight_map"]

    def _safetensors(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._weight_map:
            raise CheckpointError(f"{self.path / SAFETENSORS_INDEX} lists no tensor {name}: the checkpoint is incomplete")
        with safe_open(self.path / self._weight_map[name], framework="pt") as file:
            return file.get_tensor(name)


class LazyTensors(Mapping):
    """A checkpoint reader's full tensors as a mapping read on access (one tensor in memory)."""

    def __init__(self, reader: CheckpointReader):
        self.reader, self.names = reader, reader.names()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.reader.tensor(name)

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def checkpoint_tokenizer(reader: CheckpointReader, override: str | None) -> Tokenizer | None:
    """The tokenizer the checkpoint was trained with: `override` ("none" for no tokenizer), else
    the checkpoint's own copy, else the folder it records."""
    if override == "none":
        return None
    recorded = reader.client_state.get("tokenizer") or {}
    own = tokenizer_dir(reader.path)
    if override is None and own.is_dir():
        path = own
    elif override is None and not recorded.get("path"):
        print(f"warning: {reader.path} records no tokenizer (trained on synthetic data?): exporting the model "
              "only; pass --tokenizer DIR to add one", file=sys.stderr)
        return None
    else:
        path = Path(override or recorded["path"])
    if not path.is_dir():
        raise TokenizerError(f"the checkpoint's tokenizer {path} does not exist here: pass --tokenizer DIR (the "
                             "folder from `pretrain tokenizer train`), or --tokenizer none to export without one")
    tokenizer = Tokenizer.load(path)
    if recorded.get("sha256") and tokenizer.sha256 != recorded["sha256"]:
        raise TokenizerError(f"{path} (sha256 {tokenizer.sha256[:12]}) is not the tokenizer this checkpoint was "
                             f"trained with ({recorded['sha256'][:12]}): pass the right one with --tokenizer")
    return tokenizer
