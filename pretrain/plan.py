"""`pretrain plan`: a run's memory per GPU and its speed, predicted from the config before launch.

Memory is counted from this framework's own tensors: each rank's parameter shards (its TP slice
of its pipeline stage), what DeepSpeed's ZeRO stage keeps of weights, gradients and optimizer
state on a rank, what autograd saves for backward in one micro-batch of our blocks (tests check
these against a real engine and a real forward; a context-parallel rank holds seq/cp tokens, and
under sequence parallelism the norms' share of them is divided by tp), the micro-batches 1F1B
keeps in flight on a stage, the output head's working set, the keys and values context
parallelism gathers, DeepSpeed's buffers and an allowance for the CUDA context and the allocator.
Step time is compute at a measured efficiency plus the communication that is not overlapped:
tensor-parallel all-reduces (or, with sequence parallelism, all-gathers and reduce-scatters) per
layer, the context-parallel key/value exchange, the pipeline bubble, pipeline sends and the
data-parallel gradient reduction (and ZeRO-3's parameter gathers) over a bandwidth table."""

import bisect
import dataclasses
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pretrain.accelerators import Accelerator, of_device
from pretrain.config import (
    Config, ConfigError, Layout, OptimizerName, Precision, total_steps, validate_without_data,
)
from pretrain.model.args import LlamaArgs

GIB = 2**30
# Share of the peak our compiled blocks reach: 50.7% MFU for a 1B model on one H200 (prototype,
# ../shared/notes/environment.md); activation checkpointing adds a forward's FLOPs on top.
EFFICIENCY = 0.5
ALLOWANCE_GIB = 1.5  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation
# Host-side cost of one micro-batch on a stage (engine calls, kernel launches, pipeline handshakes):
# an assumption until measured, it keeps the search from splitting work into needlessly small pieces.
MICRO_BATCH_OVERHEAD_S = 0.002
INDEX_BYTES = 8  # int64 token and position ids
HOPELESS = 50  # a run predicted to need this many times the device's memory (a size typed with extra zeros) is refused


@dataclass
class Plan:
    layout: Layout  # the sizes a launch of this many processes derives (tp, pp, dp, cp, sequence parallel)
    zero_stage: int
    activation_checkpointing: bool
    gpu: Accelerator
    memory_gib: dict[str, float]  # per GPU, on the stage that needs the most
    fits: bool
    step_time_s: float
    time_s: dict[str, float]  # the step time's parts
    tokens_per_sec: float
    mfu: float
    steps: int
    run_hours: float
    gpu_hours: float
    parameters: int
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> str:
        """The settings that choose this layout, as `pretrain train` takes them."""
        layout = self.layout
        return (f"parallel.tp={layout.tp} parallel.pp={layout.pp} parallel.cp={layout.cp} parallel.ep={layout.ep} "
                f"parallel.sequence_parallel={str(layout.sequence_parallel).lower()} "
                f"optimizer.zero_stage={self.zero_stage} train.micro_batch_size={layout.micro_batch_size} "
                f"execution.activation_checkpointing={str(self.activation_checkpointing).lower()}")

    def to_json(self) -> dict:
        layout = {**dataclasses.asdict(self.layout), "zero_stage": self.zero_stage,
                  "activation_checkpointing": self.activation_checkpointing}
        return {"layout": layout, "gpu": self.gpu.name, "memory_gib": self.memory_gib,
                "fits": self.fits, "step_time_s": self.step_time_s, "time_s": self.time_s,
                "tokens_per_sec": self.tokens_per_sec, "mfu": self.mfu, "steps": self.steps,
                "run_hours": self.run_hours, "gpu_hours": self.gpu_hours, "parameters": self.parameters,
                "overrides": self.overrides(), "notes": self.notes}


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    ndim: int
    expert: bool = False  # an expert-parallel shard: ZeRO partitions it over the expert-data-parallel ranks


@dataclass(frozen=True)
class Experts:
    """A mixture of experts' shape, as far as the tensors a rank holds go."""

    num_experts: int
    ffn: int  # each expert's width
    shared_ffn: int  # the shared experts' width (TP-sharded)
    first_dense_layers: int
    ep: int


def stage_tensors(args: LlamaArgs, tp: int, pp: int, ep: int = 1) -> tuple[tuple[Tensor, ...], ...]:
    """Per pipeline stage, the parameter tensors a rank holds (its TP slices, its num_experts / ep
    experts), in the order the module lists them. With tied embeddings and pp > 1 the last stage
    holds the embedding too."""
    moe = args.moe
    experts = Experts(moe.num_experts, moe.expert_ffn_hidden_size, moe.shared_experts * moe.expert_ffn_hidden_size,
                      moe.first_dense_layers, ep) if moe.num_experts else None
    return _stage_tensors(args.hidden_size, args.num_heads, args.num_kv_heads, args.ffn_hidden_size, args.num_layers,
                          args.padded_vocab_size(tp), args.tie_embeddings, tp, pp, args.qk_norm, experts)


@functools.lru_cache(maxsize=256)
def _stage_tensors(h: int, heads: int, kv_heads: int, ffn: int, num_layers: int, vocab: int, tied: bool, tp: int,
                   pp: int, qk_norm: bool = False, experts: Experts | None = None) -> tuple[tuple[Tensor, ...], ...]:
    head_dim = h // heads
    attention = [("attention_norm.weight", h, 1),
                 ("attention.qkv_proj.weight", (heads + 2 * kv_heads) * head_dim * h // tp, 2),
                 ("attention.o_proj.weight", h * heads * head_dim // tp, 2),
                 *([("attention.q_norm.weight", head_dim, 1), ("attention.k_norm.weight", head_dim, 1)] if qk_norm
                   else []), ("mlp_norm.weight", h, 1)]
    dense = [("mlp.gate_proj.weight", ffn * h // tp, 2), ("mlp.up_proj.weight", ffn * h // tp, 2),
             ("mlp.down_proj.weight", h * ffn // tp, 2)]

    def block(layer: int) -> list[Tensor]:
        if experts is None or layer < experts.first_dense_layers:
            return [Tensor(f"layers.{layer}.{name}", numel, ndim) for name, numel, ndim in attention + dense]
        local = experts.num_experts // experts.ep * experts.ffn * h
        shared = experts.shared_ffn * h // tp
        return [*(Tensor(f"layers.{layer}.{name}", numel, ndim) for name, numel, ndim in attention),
                Tensor(f"layers.{layer}.mlp.router.weight", experts.num_experts * h, 2),
                *(Tensor(f"layers.{layer}.mlp.experts.{name}", local, 3, expert=experts.ep > 1)
                  for name in ("gate_proj", "up_proj", "down_proj")),
                *(Tensor(f"layers.{layer}.mlp.shared.{name}.weight", shared, 2)
                  for name in ("gate_proj", "up_proj", "down_proj") if shared)]

    embedding = Tensor("embedding.weight", vocab * h // tp, 2)
    stages = []
    for stage, layers in enumerate(stage_layers(num_layers, pp)):
        tensors = [embedding] if stage == 0 or (stage == pp - 1 and tied) else []
        tensors += [tensor for i in layers for tensor in block(i)]
        if stage == pp - 1:
            tensors.append(Tensor("final_norm.weight", h, 1))
            if not tied:
                tensors.append(Tensor("output.weight", vocab * h // tp, 2))
        stages.append(tuple(tensors))
    return tuple(stages)


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Blocks per stage, as even as possible (parallel.pp_partition=blocks), earlier stages smaller."""
    base, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + base + (1 if stage >= pp - extra else 0))
    return [range(bounds[s], bounds[s + 1]) for s in range(pp)]


def block_activation_bytes_per_token(args: LlamaArgs, tp: int, dtype_bytes: int,
                                     sequence_parallel: bool = False, layer: int = 0) -> float:
    """Bytes block `layer` saves for backward per token of its sequence (no checkpointing), as
    autograd keeps them: per RMSNorm its fp32 input, rsqrt, normalised and scaled outputs (under
    sequence parallelism of seq/tp tokens); cos and sin; the rotated q and k, the fused qkv buffer
    that v views, the attention output (which o_proj's input views) and its log-sum-exp; with
    qk_norm their norms' fp32 inputs, rsqrt and outputs; gate, silu(gate), up and their product (of
    a mixture of experts: moe_bytes_per_token). Under context parallelism the same per token of this
    rank's chunks."""
    h, d, e = args.hidden_size, args.head_dim, dtype_bytes
    heads, kv, ffn = args.num_heads / tp, args.num_kv_heads / tp, args.ffn_hidden_size / tp
    norms = 2 * (4 * h + 4 + 2 * e * h) / (tp if sequence_parallel else 1)
    attention = 2 * e * d + e * heads * d + e * kv * d + e * (heads + 2 * kv) * d + 4 * heads + e * heads * d
    if args.qk_norm:
        attention += (heads + kv) * (4 * d + 4 + e * d)
    mlp = moe_bytes_per_token(args, tp, e) if args.moe.is_moe_layer(layer) else 4 * e * ffn
    return norms + attention + mlp


def moe_bytes_per_token(args: LlamaArgs, tp: int, dtype_bytes: int) -> float:
    """What a mixture-of-experts MLP saves per token: the router's fp32 logits and scores, the top-k
    indices, weights and their sum, the sort order and the tokens of the pairs (int64), per pair its
    gathered input, gate, silu(gate), up and their product and the expert output with its weight;
    the shared experts as a dense MLP (TP-sharded)."""
    moe, h, e = args.moe, args.hidden_size, dtype_bytes
    k, ffn = moe.top_k, moe.expert_ffn_hidden_size
    router = 8 * moe.num_experts + 3 * INDEX_BYTES * k + 4 * k + 4 + (4 if e == 4 else 4 + e) * k
    return router + k * e * (2 * h + 4 * ffn) + 4 * e * moe.shared_experts * ffn / tp


def activation_bytes(args: LlamaArgs, tp: int, pp: int, stage: int, micro_batch_size: int, dtype_bytes: int,
                     checkpointing: bool, sequence_parallel: bool = False, cp: int = 1) -> float:
    """What autograd saves for backward in one micro-batch on `stage` (the head + loss keeps the
    gradients it computed at once: of the hidden states and of its weight). A context-parallel rank
    holds seq/cp tokens; under sequence parallelism the residual stream holds seq/(cp x tp)."""
    tokens, h, e = micro_batch_size * args.seq_len // cp, args.hidden_size, dtype_bytes
    residual = tokens / (tp if sequence_parallel else 1)  # tokens outside the tensor-parallel layers
    layers = stage_layers(args.num_layers, pp)[stage]
    if checkpointing:
        blocks = len(layers) * residual / tokens * e * h
    else:
        blocks = sum(block_activation_bytes_per_token(args, tp, e, sequence_parallel, layer) for layer in layers)
    total = tokens * blocks + (tokens * INDEX_BYTES if checkpointing else 0)  # positions, once
    if stage == 0:
        total += tokens * INDEX_BYTES  # the embedding keeps the token ids
    if stage == pp - 1:
        total += residual * (4 * h + 4 + e * h)  # final norm (the loss keeps a gradient instead of its output)
        total += residual * e * h + args.padded_vocab_size(tp) // tp * h * e  # head + loss gradients
    return total


def context_parallel_working_bytes(args: LlamaArgs, tp: int, micro_batch_size: int, dtype_bytes: int) -> float:
    """The largest short-lived allocation of context-parallel attention, in backward: the keys and
    values of the whole sequence gathered again (as received, in sequence order and refilled), their
    gradients and those laid out for the reduce-scatter."""
    keys_and_values = 2 * micro_batch_size * args.seq_len * args.num_kv_heads / tp * args.head_dim
    return 5 * keys_and_values * dtype_bytes


# DeepSpeed 0.19 ZeRO settings the engine runs with (deepspeed_config leaves them at their defaults)
REDUCE_BUCKET = 500_000_000  # elements of the gradient reduction bucket
NCCL_ALIGNMENT = 2  # ZeRO-1/2 flat groups are padded to a multiple of this times dp
PREFETCH_BUCKET = 50_000_000  # ZeRO-3 elements gathered ahead


ADAM_MOMENTS, MUON_MOMENTS = 2, 1  # fp32 state tensors per element besides the master weights


def _muon_trains(tensor: Tensor) -> bool:
    """What pretrain.optim.muon_matrices gives Muon: the blocks' matrices."""
    return tensor.ndim == 2 and tensor.name.startswith("layers.")


def _groups(tensors: Sequence[Tensor], muon: bool = False) -> list[tuple[list[int], int]]:
    """The optimizer's parameter groups (pretrain.optim), each with its state tensors per element:
    matrices (decay), then vectors; with Muon, its matrices first. Expert-parallel shards form a last
    group of their own (DeepSpeed's MoE group), which `_partitions` spreads over fewer ranks."""
    if not muon:
        groups = [([t.numel for t in tensors if t.ndim >= 2 and not t.expert], ADAM_MOMENTS),
                  ([t.numel for t in tensors if t.ndim < 2], ADAM_MOMENTS),
                  ([t.numel for t in tensors if t.expert], ADAM_MOMENTS)]
    else:
        groups = [([t.numel for t in tensors if _muon_trains(t)], MUON_MOMENTS),
                  ([t.numel for t in tensors if t.ndim >= 2 and not _muon_trains(t)], ADAM_MOMENTS),
                  ([t.numel for t in tensors if t.ndim < 2], ADAM_MOMENTS)]
    return [(numels, moments) for numels, moments in groups if numels]


def _zero12_partition(group: list[int], dp: int, rank: int) -> tuple[int, int, int]:
    """A ZeRO-1/2 group: (its padded flat size, one rank's partition, the gradient elements that rank
    keeps: every tensor starting in or straddling into its partition, whole, plus its padding)."""
    flat = -(-sum(group) // (NCCL_ALIGNMENT * dp)) * NCCL_ALIGNMENT * dp
    part = flat // dp
    start, end, offset, kept = part * rank, part * (rank + 1), 0, 0
    for numel in group:
        if start <= offset < end or offset < start < offset + numel:
            kept += numel
        offset += numel
    return flat, part, kept + min(part, max(0, end - sum(group)))


def state_bytes(tensors: Sequence[Tensor], zero_stage: int, dp: int, bf16: bool, persistence_threshold: int = 100_000,
                dp_rank: int | None = None, muon: bool = False, ep: int = 1) -> dict[str, float]:
    """Weights, gradients (as the optimizer step finds them), optimizer state (fp32 masters, Adam
    moments and step counters, Muon's momentum) and DeepSpeed's lasting buffers on data-parallel
    rank `dp_rank` (None: the worst), as DeepSpeed 0.19 lays them out for torch's fused AdamW and
    pretrain.muon (tests check them against the tensors a real engine holds). Under expert
    parallelism the experts' group is partitioned over the dp / ep ranks holding the same experts."""
    ranks = range(dp) if dp_rank is None else (dp_rank,)
    per_rank = _states_on_ranks(tuple(tensors), zero_stage, dp, tuple(ranks), bf16, persistence_threshold, muon, ep)
    return {key: max(values) for key, values in zip(("weights", "gradients", "optimizer", "buffers"), zip(*per_rank))}


@functools.lru_cache(maxsize=1024)  # --search asks for the same stages under many micro-batch sizes and settings
def _states_on_ranks(tensors: tuple[Tensor, ...], zero_stage: int, dp: int, ranks: tuple[int, ...], bf16: bool,
                     persistence_threshold: int, muon: bool, ep: int) -> list[tuple[int, int, int, int]]:
    return [_state_on_rank(tensors, zero_stage, dp, rank, bf16, persistence_threshold, muon, ep) for rank in ranks]


def _partitions(tensors: Sequence[Tensor], groups: list, dp: int, rank: int, ep: int) -> list[tuple[int, int, int]]:
    """_zero12_partition of each group on data-parallel rank `rank`; the experts' group (last) over the
    dp / ep ranks of this rank's expert-data-parallel group, where it is rank // ep."""
    experts = any(t.expert for t in tensors)
    return [_zero12_partition(group, dp // ep, rank // ep) if experts and index == len(groups) - 1
            else _zero12_partition(group, dp, rank) for index, (group, _) in enumerate(groups)]


def _state_on_rank(tensors: Sequence[Tensor], zero_stage: int, dp: int, rank: int, bf16: bool,
                   persistence_threshold: int, muon: bool, ep: int = 1) -> tuple[int, int, int, int]:
    e = 2 if bf16 else 4
    groups = _groups(tensors, muon)
    numels = [n for group, _ in groups for n in group]
    total = sum(numels)
    adam = [group for group, moments in groups if moments == ADAM_MOMENTS]  # they count their steps, 4 bytes
    if zero_stage == 0:  # nothing partitioned; bf16: DeepSpeed's unfused wrapper keeps an fp32 copy
        state = sum(4 * (moments + bf16) * sum(group) for group, moments in groups)
        return e * total, e * total, state + 4 * sum(map(len, adam)), 0
    if zero_stage in (1, 2):  # the weights are views of flat groups; fp32 master partitions
        parts = _partitions(tensors, groups, dp, rank, ep)
        state = sum(4 * (1 + moments) * part for (_, part, _), (_, moments) in zip(parts, groups))
        return (e * sum(flat for flat, _, _ in parts), e * sum(kept for _, _, kept in parts),
                state + 4 * len(adam), 0)
    partitions = [-(-n // dp) for n in numels]  # ZeRO-3: every tensor split; small ones also kept whole
    persistent = sum(n for n in numels if n <= persistence_threshold) if dp > 1 else 0
    return e * (sum(partitions) + persistent), e * sum(partitions), 12 * sum(partitions) + 4 * len(groups), \
        e * REDUCE_BUCKET


def deepspeed_transient_bytes(tensors: Sequence[Tensor], zero_stage: int, dp: int, bf16: bool, pipelined: bool,
                              persistence_threshold: int = 100_000, muon: bool = False, ep: int = 1) -> float:
    """DeepSpeed's largest short-lived allocation: ZeRO-1 keeps full gradients and a reduction
    bucket through the accumulation (two buckets while a pipeline reduces), ZeRO-2 a bucket per
    backward; the step turns the largest gradient partition into fp32; ZeRO-3 gathers weights."""
    e = 2 if bf16 else 4
    pairs = _groups(tensors, muon)
    groups = [group for group, _ in pairs]
    total = sum(map(sum, groups))
    if zero_stage == 0:
        return max(4 * total if bf16 else 0, e * min(total, REDUCE_BUCKET) if dp > 1 else 0)
    if zero_stage == 3:
        big = sorted((t.numel for t in tensors if t.numel > persistence_threshold), reverse=True)
        gathered = e * (sum(big[:2]) + min(PREFETCH_BUCKET, sum(big[2:]))) if dp > 1 else 0
        largest = max(-(-sum(group) // dp) for group in groups)
        return max(gathered, (4 + (e if bf16 else 0)) * largest)
    largest = max(part for _, part, _ in _partitions(tensors, pairs, dp, 0, ep))
    step = (4 + (e if bf16 else 0)) * largest
    buckets = e * REDUCE_BUCKET * (2 if pipelined else 1)
    return max(step, buckets + (e * total if zero_stage == 1 else 0))


def muon_parts(args: LlamaArgs) -> dict[str, list[tuple[int, int]]]:
    """The whole logical matrices Muon orthogonalises in each block parameter (qkv: q, k and v)."""
    h, ffn = args.hidden_size, args.ffn_hidden_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    return {"attention.qkv_proj.weight": [(q, h), (kv, h), (kv, h)], "attention.o_proj.weight": [(h, q)],
            "mlp.gate_proj.weight": [(ffn, h)], "mlp.up_proj.weight": [(ffn, h)], "mlp.down_proj.weight": [(h, ffn)]}


def newton_schulz_flops(rows: int, columns: int, steps: int) -> float:
    """One orthogonalisation: per iteration the Gram matrix, its square and their product with X."""
    m, n = sorted((rows, columns))
    return steps * (4 * m * m * n + 2 * m**3)


@dataclass(frozen=True)
class MuonWork:
    """The Muon step of a stage's busiest data-parallel rank (pretrain.muon)."""

    flops: float  # Newton-Schulz FLOPs of the whole matrices it orthogonalises
    partition: int  # elements of its slice of Muon's flat group (this TP rank's shards)
    window: int  # elements of the matrices that slice touches, fetched partly from its neighbours
    largest: tuple[int, int]  # shape of the largest whole parameter it orthogonalises


def muon_work(tensors: Sequence[Tensor], args: LlamaArgs, dp: int, zero_stage: int, steps: int) -> MuonWork:
    """At ZeRO-1/2 a rank orthogonalises the matrices its partition touches; at ZeRO-0 all of them."""
    parts = muon_parts(args)
    matrices = [t for t in tensors if _muon_trains(t)]
    if not matrices:
        return MuonWork(0.0, 0, 0, (0, 0))
    kinds = [parts[t.name.split(".", 2)[2]] for t in matrices]
    flops = [sum(newton_schulz_flops(r, c, steps) for r, c in kind) for kind in kinds]
    shapes = [(sum(r for r, _ in kind), kind[0][1]) if len(kind) > 1 else kind[0] for kind in kinds]
    numels = [t.numel for t in matrices]
    if zero_stage == 0:
        return MuonWork(sum(flops), max(numels), max(numels), max(shapes, key=lambda shape: shape[0] * shape[1]))
    offsets = [0]
    for numel in numels:
        offsets.append(offsets[-1] + numel)
    busiest = None
    for rank in range(dp):
        _, part, _ = _zero12_partition(numels, dp, rank)
        first = max(bisect.bisect_right(offsets, part * rank) - 1, 0)
        end = bisect.bisect_left(offsets, part * (rank + 1))
        touched = range(first, min(end, len(matrices)))
        work = MuonWork(sum(flops[i] for i in touched), part,
                        offsets[touched[-1] + 1] - offsets[touched[0]] if touched else 0,
                        max((shapes[i] for i in touched), key=lambda shape: shape[0] * shape[1], default=(0, 0)))
        if busiest is None or work.flops > busiest.flops:
            busiest = work
    return busiest


def muon_working_bytes(work: MuonWork, tp: int, ns_bytes: int) -> float:
    """The Muon step's transient memory, one matrix at a time: the pieces exchanged with the
    neighbouring partitions, the largest whole matrix gathered from its TP shards, joined and
    updated in fp32, and the iteration's operands in the Newton-Schulz dtype."""
    rows, columns = work.largest
    whole = rows * columns
    return 8 * (work.window - work.partition) + 4 * (3 + 3 / tp) * whole \
        + ns_bytes * (3 * whole + 3 * min(rows, columns) ** 2)


def head_working_bytes(args: LlamaArgs, tp: int, micro_batch_size: int, dtype_bytes: int, chunk_tokens: int,
                       cp: int = 1, sequence_parallel: bool = False) -> float:
    """The output head + loss's transient memory: one chunk's logits (matmul output, fp32 copy,
    gradient in the weights' dtype) and the fp32 accumulator of the weight's gradient; under
    sequence parallelism also the gathered hidden states and their whole gradient."""
    tokens = micro_batch_size * args.seq_len // cp
    local_vocab = args.padded_vocab_size(tp) // tp
    gathered = 2 * tokens * args.hidden_size * dtype_bytes if sequence_parallel else 0
    chunk = min(chunk_tokens, tokens) * local_vocab * (2 * dtype_bytes + 4)
    return chunk + local_vocab * args.hidden_size * 4 + gathered


def ring_seconds(bytes_: float, ranks: int, gbps: float, passes: float) -> float:
    """A ring collective: `passes` (2 for all-reduce, 1 for reduce-scatter or all-gather) times
    (ranks - 1) / ranks of the bytes over the bus bandwidth."""
    return 0.0 if ranks == 1 else passes * (ranks - 1) / ranks * bytes_ / (gbps * 1e9)


def plan(config: Config, gpus: int, gpu: Accelerator, gpus_per_node: int = 8, efficiency: float = EFFICIENCY) -> Plan:
    """The plan of `config` on `gpus` GPUs (validated like a launch of that many processes)."""
    if config.model.vocab_size == 0:
        raise ConfigError("model.vocab_size=0 takes the data's tokenizer's: give model.vocab_size to plan with")
    layout = validate_without_data(config, gpus)
    args, execution, zero_stage = config.model, config.execution, config.optimizer.zero_stage
    tp, pp, dp, cp, sequence_parallel = layout.tp, layout.pp, layout.dp, layout.cp, layout.sequence_parallel
    checkpointing = execution.activation_checkpointing
    notes = []
    if args.moe.num_experts:
        notes.append(f"mixture of experts: {args.num_active_params() / 1e9:.2f}B of the {args.num_params() / 1e9:.2f}B "
                     "parameters active per token (FLOPs and MFU count those); routing assumed balanced")
    if tp * cp > gpus_per_node:
        notes.append(f"parallel.tp x parallel.cp = {tp * cp} spans nodes of {gpus_per_node} GPUs: their "
                     "collectives run over the network")
    bf16 = config.train.precision != Precision.fp32
    e = 2 if bf16 else 4
    micro, accumulation = layout.micro_batch_size, layout.grad_accumulation
    threshold = config.optimizer.zero3_param_persistence_threshold
    tokens_per_micro = micro * args.seq_len // cp  # on one rank
    residual = tokens_per_micro // (tp if sequence_parallel else 1)  # tokens outside the tensor-parallel layers

    optimizer = config.optimizer
    muon = optimizer.name == OptimizerName.muon
    ns_bytes = 4 if optimizer.muon_ns_dtype == Precision.fp32 else 2  # auto: bf16 on GPUs
    if muon and ns_bytes == 4:
        notes.append("optimizer.muon_ns_dtype=fp32: Newton-Schulz time is counted at the bf16 rate; fp32 matmuls "
                     "run several times slower")
    worst, busiest = None, MuonWork(0.0, 0, 0, (0, 0))
    for stage, tensors in enumerate(stage_tensors(args, tp, pp, layout.ep)):
        state = state_bytes(tensors, zero_stage, layout.replicas, bf16, threshold, muon=muon, ep=layout.ep)
        in_flight = min(pp - stage, accumulation) if pp > 1 else 1
        saved = activation_bytes(args, tp, pp, stage, micro, e, checkpointing, sequence_parallel, cp)
        activations = in_flight * saved
        if pp > 1:  # the pipeline engine's input and output buffers of each micro-batch in flight
            activations += in_flight * (residual * 2 * e * args.hidden_size + tokens_per_micro * 2 * INDEX_BYTES)
        working = [deepspeed_transient_bytes(tensors, zero_stage, layout.replicas, bf16, pp > 1, threshold, muon,
                                             layout.ep)]
        if muon:
            work = muon_work(tensors, args, layout.replicas, zero_stage, optimizer.muon_ns_steps)
            working.append(muon_working_bytes(work, tp, ns_bytes))
            busiest = max(busiest, work, key=lambda w: w.flops)
        if stage == pp - 1:
            working.append(head_working_bytes(args, tp, micro, e, execution.loss_chunk_tokens, cp, sequence_parallel))
        if checkpointing:  # one block recomputed in backward at a time
            working.append(tokens_per_micro * max(block_activation_bytes_per_token(args, tp, e, sequence_parallel, layer)
                                                  for layer in range(args.num_layers)))
        if cp > 1:
            working.append(context_parallel_working_bytes(args, tp, micro, e))
        memory = {**state, "activations": activations, "working": max(working), "allowance": ALLOWANCE_GIB * GIB}
        memory["total"] = sum(memory.values())
        if worst is None or memory["total"] > worst["total"]:
            worst = memory

    flops_per_gpu_micro = args.flops_per_token() * micro * args.seq_len / (tp * pp * cp)
    compute = flops_per_gpu_micro * (4 / 3 if checkpointing else 1) / (gpu.peak_tflops * 1e12 * efficiency)
    layers = max(len(r) for r in stage_layers(args.num_layers, pp))
    activation = tokens_per_micro * args.hidden_size * e
    tp_bandwidth = gpu.intra_node_gbps if tp <= gpus_per_node else gpu.inter_node_gbps
    tp_passes = tensor_parallel_passes(layers, checkpointing, sequence_parallel)
    tp_time = tp_passes * ring_seconds(activation, tp, tp_bandwidth, 1)
    # per block the keys and values of the whole sequence: gathered forward, gathered again (or, in a
    # recomputed block, with its forward) and their gradients reduce-scattered backward
    keys_and_values = 2 * micro * args.seq_len * args.num_kv_heads / tp * args.head_dim * e
    cp_bandwidth = gpu.intra_node_gbps if tp * cp <= gpus_per_node else gpu.inter_node_gbps
    cp_time = layers * 3 * ring_seconds(keys_and_values, cp, cp_bandwidth, 1)
    pp_bandwidth = gpu.intra_node_gbps if tp * cp * dp * pp <= gpus_per_node else gpu.inter_node_gbps
    send = 0.0 if pp == 1 else 2 * residual * args.hidden_size * e / (pp_bandwidth * 1e9)
    # expert parallelism: per MoE block each rank's token-expert pairs go out and come back, forward and backward
    moe_layers = max(sum(map(args.moe.is_moe_layer, layers)) for layers in stage_layers(args.num_layers, pp))
    pairs_bytes = tokens_per_micro * args.moe.top_k * args.hidden_size * e
    ep_bandwidth = gpu.intra_node_gbps if tp * cp * layout.ep <= gpus_per_node else gpu.inter_node_gbps
    ep_time = moe_layers * (6 if checkpointing else 4) * ring_seconds(pairs_bytes, layout.ep, ep_bandwidth, 1)
    per_micro = compute + tp_time + cp_time + ep_time + send + MICRO_BATCH_OVERHEAD_S
    pipeline = (accumulation + pp - 1) * per_micro
    local = max(sum(t.numel for t in stage) for stage in stage_tensors(args, tp, pp, layout.ep))
    dp_bandwidth = gpu.intra_node_gbps if tp * cp * dp <= gpus_per_node else gpu.inter_node_gbps
    passes = {0: 2, 1: 2, 2: 2, 3: 3}[zero_stage]  # ZeRO-3 also gathers the weights for backward
    dp_time = ring_seconds(local * e, layout.replicas, dp_bandwidth, passes)
    # Muon: Newton-Schulz on the busiest rank, its TP all-gather and the pieces fetched from its neighbours
    muon_time = busiest.flops / (gpu.peak_tflops * 1e12 * efficiency) \
        + ring_seconds(4 * tp * busiest.window, tp, tp_bandwidth, 1) \
        + (4 * (busiest.window - busiest.partition) / (dp_bandwidth * 1e9) if layout.replicas > 1 else 0.0)
    step = pipeline + dp_time + muon_time
    tokens_per_step = config.train.global_batch_size * args.seq_len
    tokens_per_sec = tokens_per_step / step
    steps = total_steps(config)
    run_hours = steps * step / 3600
    return Plan(layout=layout, zero_stage=zero_stage, activation_checkpointing=checkpointing,
                gpu=gpu, memory_gib={k: round(v / GIB, 2) for k, v in worst.items()},
                fits=worst["total"] <= gpu.memory_gib * GIB, step_time_s=step,
                time_s={"compute": accumulation * compute, "tensor_parallel": accumulation * tp_time,
                        "context_parallel": accumulation * cp_time,
                        **({"expert_parallel": accumulation * ep_time} if layout.ep > 1 else {}),
                        "overhead": accumulation * MICRO_BATCH_OVERHEAD_S,
                        "pipeline_bubble": (pp - 1) * per_micro, "pipeline_sends": accumulation * send,
                        "data_parallel": dp_time, **({"muon": muon_time} if muon else {})},
                tokens_per_sec=tokens_per_sec, mfu=args.flops_per_token() * tokens_per_sec / (gpus * gpu.peak_tflops * 1e12),
                steps=steps, run_hours=run_hours, gpu_hours=run_hours * gpus, parameters=args.num_params(), notes=notes)


def tensor_parallel_passes(layers: int, checkpointing: bool, sequence_parallel: bool) -> int:
    """Ring passes over one micro-batch's activations that tensor parallelism makes per step of a
    stage (an all-reduce is two passes, an all-gather or a reduce-scatter one). Per block without
    sequence parallelism: 2 all-reduces forward (attention and MLP outputs), 2 backward (their
    inputs' gradients); with it: 2 all-gathers + 2 reduce-scatters forward, and backward 2
    reduce-scatters, 2 all-gathers of output gradients and 2 of the inputs again (for the weight
    gradients). Recomputing a block repeats its forward. The embedding and the head add 2
    all-reduces, or under sequence parallelism an all-reduce, the split's all-gather and the head's
    all-gather and reduce-scatter."""
    forward, backward, ends = (4, 6, 5) if sequence_parallel else (4, 4, 4)
    return layers * (forward + backward + (forward if checkpointing else 0)) + ends


def with_layout(config: Config, tp: int, pp: int, zero_stage: int, micro_batch_size: int, checkpointing: bool,
                cp: int = 1, sequence_parallel: bool = False, ep: int = 1) -> Config:
    return dataclasses.replace(
        config, parallel=dataclasses.replace(config.parallel, tp=tp, pp=pp, cp=cp, sequence_parallel=sequence_parallel,
                                             ep=ep),
        optimizer=dataclasses.replace(config.optimizer, zero_stage=zero_stage),
        train=dataclasses.replace(config.train, micro_batch_size=micro_batch_size),
        execution=dataclasses.replace(config.execution, activation_checkpointing=checkpointing))


def search(config: Config, gpus: int, gpu: Accelerator, gpus_per_node: int = 8, efficiency: float = EFFICIENCY) -> list[Plan]:
    """Every layout of `gpus` GPUs that validation accepts and that fits, fastest first: tensor
    parallel inside a node with sequence parallelism on and off, context parallel sizes of powers
    of two, any pipeline depth, ZeRO 0-3, micro-batches of powers of two, activation checkpointing
    off and on (a micro-batch that does not fit ends its series: larger ones need more memory); for a
    mixture of experts every expert-parallel size that divides the experts."""
    plans = []
    experts = config.model.moe.num_experts
    eps = [ep for ep in range(1, experts + 1) if experts % ep == 0 and gpus % ep == 0] if experts else [1]
    for tp in (t for t in range(1, min(gpus, gpus_per_node) + 1) if gpus_per_node % t == 0 and gpus % t == 0):
        for cp in (c for c in (2**k for k in range(gpus.bit_length())) if gpus % (tp * c) == 0):
            for pp in (p for p in range(1, config.model.num_layers + 1) if gpus % (tp * cp * p) == 0):
                for zero_stage, sequence_parallel, checkpointing, ep in itertools.product(
                        (1,) if pp > 1 else (0, 1, 2, 3), (False, True) if tp > 1 else (False,), (False, True), eps):
                    micro = 1
                    while micro <= config.train.global_batch_size:
                        candidate = with_layout(config, tp, pp, zero_stage, micro, checkpointing, cp, sequence_parallel,
                                                ep)
                        try:
                            result = plan(candidate, gpus, gpu, gpus_per_node, efficiency)
                        except ConfigError:
                            break
                        if not result.fits:
                            break
                        plans.append(result)
                        micro *= 2
    return sorted(plans, key=lambda p: (-p.tokens_per_sec, p.memory_gib["total"]))


def longest_seq_len(config: Config, gpus: int, gpu: Accelerator, gpus_per_node: int = 8,
                    efficiency: float = EFFICIENCY) -> tuple[int, Plan | None]:
    """The longest model.seq_len, model.seq_len times a power of two, at which some layout of `gpus`
    GPUs fits (with train.global_batch_size sequences per step), and the fastest such layout."""
    best, seq_len = (0, None), config.model.seq_len
    while seq_len >= 16:
        candidate = dataclasses.replace(config, model=dataclasses.replace(config.model, seq_len=seq_len))
        found = search(candidate, gpus, gpu, gpus_per_node, efficiency)
        if found:
            best = (seq_len, found[0])
            seq_len *= 2
        elif best[1] is not None:
            break
        else:
            seq_len //= 2
    return best


def describe(result: Plan) -> str:
    layout, memory = result.layout, result.memory_gib
    lines = [
        f"{result.parameters / 1e9:.2f}B parameters on {layout.world_size} x {result.gpu.name}: tp {layout.tp}"
        f"{' (sequence parallel)' if layout.sequence_parallel else ''} x cp {layout.cp} x pp {layout.pp} x dp "
        f"{layout.dp}, ZeRO-{result.zero_stage}, micro-batch {layout.micro_batch_size} x "
        f"{layout.grad_accumulation} accumulated, activation checkpointing "
        f"{'on' if result.activation_checkpointing else 'off'}",
        "memory per GPU (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items() if k != "total")
        + f"; total {memory['total']:.2f} of {result.gpu.memory_gib}: " + ("fits" if result.fits else "DOES NOT FIT"),
        f"step {result.step_time_s:.3f} s: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in result.time_s.items()),
        f"{result.tokens_per_sec:,.0f} tokens/s, MFU {100 * result.mfu:.1f}%; {result.steps:,} steps in "
        f"{result.run_hours:,.1f} h = {result.gpu_hours:,.0f} GPU-hours",
    ]
    return "\n".join(lines + [f"note: {note}" for note in result.notes])


def search_table(plans: list[Plan], top: int, gpus: int, gpu: Accelerator) -> str:
    if not plans:
        return f"no layout of {gpus} x {gpu.name} fits this model and batch: add GPUs or lower train.global_batch_size"
    rows = [f"{len(plans)} layouts of {gpus} x {gpu.name} fit; the {min(top, len(plans))} fastest:",
            f"{'tokens/s':>12} {'MFU':>6} {'GiB':>7}  overrides"]
    rows += [f"{p.tokens_per_sec:>12,.0f} {100 * p.mfu:>5.1f}% {p.memory_gib['total']:>7.1f}  {p.overrides()}"
             for p in plans[:top]]
    return "\n".join(rows)


def device_memory_gib(device) -> float:
    """What one process may use: the GPU's memory, or on a CPU the machine's memory shared by its
    local processes."""
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GIB
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / local_processes


def memory_check(config: Config, world_size: int, device) -> str:
    """`pretrain train`'s start-up line: the predicted memory per GPU (or process), a warning when
    it exceeds the device's, and a ConfigError, before anything is allocated, when it exceeds it
    HOPELESS times (beyond what the prediction's error could explain)."""
    gpu = of_device(device) or Accelerator("unknown", str(device), (), float("inf"), 1.0, 1.0, 1.0)
    result = plan(config, world_size, gpu)
    memory, available = result.memory_gib, device_memory_gib(device)
    where = "GPU" if device.type == "cuda" else "process"
    line = (f"predicted memory per {where}: {memory['total']:.2f} GiB (weights {memory['weights']:.2f}, gradients "
            f"{memory['gradients']:.2f}, optimizer {memory['optimizer']:.2f}, activations {memory['activations']:.2f})")
    if memory["total"] > HOPELESS * available:
        raise ConfigError(
            f"this run needs about {memory['total']:,.0f} GiB per {where} (weights {memory['weights']:,.1f}, "
            f"activations {memory['activations']:,.1f} for model.seq_len={config.model.seq_len} x "
            f"train.micro_batch_size={config.train.micro_batch_size}), far more than the {available:.1f} GiB this "
            f"{where} has: lower model.seq_len or train.micro_batch_size, use more processes, or see "
            "`pretrain plan --search`")
    if memory["total"] > available and device.type == "cuda":
        line += (f"\nwarning: more than this GPU's {available:.1f} GiB: expect an out-of-memory error; "
                 f"`pretrain plan --search` lists layouts that fit")
    return line
