"""Process groups: torch.distributed, megatron-core's parallel_state and DeepSpeed's topology,
built once and checked to agree on every rank's (pipeline, data, context, tensor) coordinates.

Ranks are ordered tensor-parallel fastest, then context-parallel, data-parallel and pipeline
(megatron-core's "tp-cp-dp-pp"). DeepSpeed's grid has only pipe/data/model axes: context-parallel
ranks join its data axis (data coordinate = dp_rank x cp + cp_rank), so DeepSpeed reduces
gradients, partitions ZeRO state and counts batch sizes over dp x cp ranks, while our own
records (ParallelContext, the loader, checkpoints) keep dp and cp apart."""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from pretrain.model.expert_parallel import forget_deepspeed_groups, new_expert_parallel_group


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in the TP x CP x DP x PP grid and its device."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp: int
    cp_rank: int
    device: torch.device
    backend: str
    topology: PipeModelDataParallelTopology
    ep: int = 1
    ep_group: dist.ProcessGroup | None = None  # expert parallel: this rank's group (pretrain.model.expert_parallel)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return parallel_state.get_context_parallel_group()

    @property
    def replica_group(self) -> dist.ProcessGroup:
        """The dp x cp ranks holding the same parameters, over which gradients and losses are reduced."""
        return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(tp: int, pp: int, backend: str = "auto", timeout_minutes: float = 30.0, cp: int = 1,
               ep: int = 1) -> ParallelContext:
    """Join (or, for a plain single-process run, create) the process group and build the grid.

    Under torchrun the environment names rank and world size; without it this process is a
    world of one on a free local port. A collective that waits longer than `timeout_minutes`
    fails instead of hanging (NCCL: its watchdog aborts the communicator)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        backend = choose_backend(backend)
        if backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a failed collective ends the process
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    # DeepSpeed would JIT-compile its shared-memory all-reduce (used only by CPU inference) here:
    # a minute of g++ on a fresh machine, and a process killed meanwhile leaves a lock file that
    # hangs every later run. Marking the op unavailable keeps plain torch.distributed collectives.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the group (PipelineModule needs it)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp)
    dp = world_size // (tp * pp * cp)
    context = ParallelContext(
        rank=rank, world_size=world_size, local_rank=local_rank, tp=tp, pp=pp, dp=dp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        cp=cp, cp_rank=parallel_state.get_context_parallel_rank(),
        device=device, backend=dist.get_backend(),
        topology=PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp * cp),
        ep=ep, ep_group=new_expert_parallel_group(ep, tp) if ep > 1 else None,
    )
    check_coordinates(context)
    return context


def check_coordinates(context: ParallelContext) -> None:
    """Stop if megatron-core and DeepSpeed disagree on any rank's (pipe, data, model) coordinates
    (DeepSpeed's data coordinate counts dp x cp): gradients would then be reduced over the wrong peers."""
    data = context.dp_rank * context.cp + context.cp_rank
    mine = torch.tensor([context.pp_rank, data, context.tp_rank], dtype=torch.long)
    gathered = [torch.empty_like(mine) for _ in range(context.world_size)]
    dist.all_gather(gathered, mine)
    for rank, coords in enumerate(gathered):
        expected = context.topology.get_coord(rank)
        if tuple(coords.tolist()) != (expected.pipe, expected.data, expected.model):
            raise RuntimeError(
                f"rank {rank}: megatron-core places it at (pipe, data, model) = {tuple(coords.tolist())}, "
                f"DeepSpeed at {tuple(expected)}; the two rank orders must agree"
            )


def shutdown(destroy_process_group: bool = True) -> None:
    """Tear down the grid (DeepSpeed's expert groups with it) and (by default) the process group: a
    rank that exits without destroying it can abort its peers at their exit barrier."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    forget_deepspeed_groups()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()


class MegatronMpu:
    """The model-parallel-unit interface DeepSpeed's engine expects (used when pp == 1: the
    pipeline engine takes its grid from the PipelineModule instead). Model parallel = tensor
    parallel here; without this, DeepSpeed would treat TP peers as data-parallel replicas. Its
    data-parallel group holds the context-parallel ranks too (they average gradients like replicas)."""

    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_data_parallel_rank = staticmethod(partial(parallel_state.get_data_parallel_rank, with_context_parallel=True))
    get_data_parallel_world_size = staticmethod(partial(parallel_state.get_data_parallel_world_size,
                                                        with_context_parallel=True))
    get_data_parallel_group = staticmethod(partial(parallel_state.get_data_parallel_group, with_context_parallel=True))
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(parallel_state.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(parallel_state.get_pipeline_model_parallel_group)
