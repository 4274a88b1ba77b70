"""Run configuration: typed omegaconf structured configs, loaded from YAML plus `key=value`
overrides, validated before any process group exists. Values derived from several settings
(data-parallel size, gradient accumulation, padded vocabulary) are computed once, in `Layout`."""

import dataclasses
import enum
import functools
import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.downstream.tasks import TaskError, read_spec
from pretrain.errors import UserError
from pretrain.model.args import ExecutionArgs, LlamaArgs, RopeScalingKind


class ConfigError(UserError, ValueError):
    """A setting is wrong; the message names it and says what to change."""


class Schedule(str, enum.Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio * lr at max_steps
    constant = "constant"  # linear warmup, then constant
    wsd = "wsd"  # warmup, stable, then linear decay over the last decay_fraction of the steps


class Precision(str, enum.Enum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    bf16 = "bf16"
    fp32 = "fp32"


class Backend(str, enum.Enum):
    auto = "auto"  # nccl on GPU, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class PipelinePartition(str, enum.Enum):
    blocks = "blocks"  # equal numbers of transformer blocks per stage
    parameters = "parameters"  # equal numbers of parameters per stage (embedding and head count)
    uniform = "uniform"  # equal numbers of pipeline layers (embedding and head count as one each)


class OptimizerName(str, enum.Enum):
    adamw = "adamw"
    muon = "muon"  # Muon on the attention and MLP matrices, AdamW on embeddings, head and norms


class DataSource(str, enum.Enum):
    shards = "shards"  # tokenized shards from `pretrain data build`
    raw = "raw"  # tar shards of raw text documents, tokenized and packed while training
    synthetic = "synthetic"  # generated token patterns, for tests and benchmarks


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size; data-parallel size = world size / (tp * pp * cp)
    cp: int = 1  # context-parallel size: each sequence split over cp ranks (2 * cp load-balanced chunks)
    ep: int = 1  # expert-parallel size: groups of ep data-parallel ranks share out each block's experts
    # outside the tensor-parallel layers each TP rank holds seq_len / tp of the tokens: true, false or
    # auto (on when tp > 1)
    sequence_parallel: Any = "auto"
    backend: Backend = Backend.auto
    pp_partition: PipelinePartition = PipelinePartition.blocks  # how layers are split among pipeline stages
    timeout_minutes: float = 30.0  # a collective waiting longer than this fails (a dead or hung peer)


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 3e-4
    weight_decay: float = 0.1  # applied to matrices only, never to norms or biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3 (2 and 3 only with parallel.pp = 1)
    zero3_param_persistence_threshold: int = 100_000  # ZeRO-3 keeps parameters smaller than this whole
    # name=muon: Muon's settings (the other parameters take AdamW's above)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations
    muon_ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    # updates scaled to this RMS, i.e. by muon_update_rms x sqrt(max(rows, columns)) (Moonlight), so that
    # AdamW's lr and weight decay carry over
    muon_update_rms: float = 0.2
    muon_ns_dtype: Precision = Precision.auto  # Newton-Schulz matmuls: auto = bf16 on GPU, fp32 on CPU


@dataclass
class ScheduleConfig:
    kind: Schedule = Schedule.cosine
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * optimizer.lr (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: share of train.max_steps spent decaying


@dataclass
class TrainConfig:
    max_steps: int = 1000
    max_tokens: int = 0  # token budget; 0 = none. Training stops at whichever comes first
    seed: int = 1234
    micro_batch_size: int = 1  # sequences per rank per forward pass
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    precision: Precision = Precision.auto
    eval_interval: int = 0  # steps between validation passes over data.valid_path; 0 = none
    eval_steps: int = 10  # global batches per validation pass (the same batches every time)
    max_bad_steps: int = 5  # stop after this many updates in a row skipped for a non-finite loss
    # a rank with no finished step, evaluation or save for this long dumps its stacks and exits, so
    # that torchrun restarts the workers; 0 = no watchdog
    hang_timeout_s: float = 1800.0
    max_restarts: int = 3  # torchrun restarts of all workers when one fails (`pretrain launch local|slurm`)


@dataclass
class DebugConfig:
    """Fault injection for the framework's own tests; a training run never needs it."""

    inject_nan_steps: list[int] = field(default_factory=list)  # NaN loss at these steps (parallel.pp=1)


@dataclass
class DataConfig:
    source: DataSource = DataSource.shards
    # shards folder(s) or manifest.json (relative to the working directory); a list blends datasets
    path: Any = None
    weights: list[float] = field(default_factory=list)  # blend weights, one per path (empty: equal)
    valid_path: str = ""  # held-out shards for valid/loss every train.eval_interval steps
    tokenizer: str = ""  # tokenizer folder; required for source=raw, checked against the shards otherwise
    num_workers: int = 2  # DataLoader worker processes per rank
    doc_mask: bool = False  # attention stays within each document; positions restart per document
    skip_corrupt: int = 0  # damaged samples to skip (and count) before stopping; 0 = stop at the first
    allow_pipe: bool = False  # allow `pipe:` shard URLs (they run shell commands)
    verify: bool = True  # check every shard's sha256 against the manifest at start-up


@dataclass
class LogConfig:
    dir: str = "runs/default"  # TensorBoard events, metrics.jsonl and the resolved config
    interval: int = 10  # steps between metric records
    # mixture of experts: warn of an expert that received no token for this many records in a row; 0 = never
    moe_idle_intervals: int = 3
    sample_interval: int = 0  # steps between completions of sample_prompts by the model in training; 0 = none
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32  # new tokens per sample (greedy)
    wandb: bool = False  # mirror metrics and samples to Weights & Biases (pip install wandb; WANDB_MODE=offline works)
    wandb_project: str = "pretrain"
    wandb_run_name: str = ""  # empty: the log.dir's name


@dataclass
class DownstreamConfig:
    """Downstream tasks scored during training (pretrain.downstream); `pretrain eval --tasks` scores a checkpoint."""

    # task specs: a YAML file, a ready spec given its data (hellaswag=FILE, arc_easy=, arc_challenge=, piqa=,
    # winogrande=, lambada=) or the built-in python_next_line; SPEC=FILE replaces a spec's path
    tasks: list[str] = field(default_factory=list)
    interval: int = 0  # steps between evaluations (and the last step); 0 = none
    examples: int = 0  # the first N examples of each task; 0 = all
    fewshot: Optional[int] = None  # solved examples before each prompt; unset: each spec's own (0 unless it says)
    seed: int = 1234  # draws the few-shot examples (the same for an example in every run and on every rank)
    log_examples: bool = False  # each example's results to <log.dir>/downstream/<task>.jsonl


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # unset or empty: no checkpoints
    interval: int = 0  # steps between saves; 0 = only at the end (and on a stop signal)
    keep_last: int = 3  # newest checkpoints kept; 0 = keep all
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    resume: str = "auto"  # auto: newest complete checkpoint in dir, if any; none; or a checkpoint's path
    # when dir holds no checkpoint: start from the weights of this checkpoint (a step folder or a checkpoint.dir,
    # any layout; e.g. a short-context run's), at step 0 with a fresh optimizer and schedule
    init_from: str = ""
    # the run holding dir renews its lease this often / 4; a crashed holder's lease is taken over after this
    lease_timeout_s: float = 120.0


@dataclass
class Config:
    model: LlamaArgs = field(default_factory=LlamaArgs)
    execution: ExecutionArgs = field(default_factory=ExecutionArgs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


# Settings that moved, old name -> new: still read from YAML files, overrides and the configs
# that checkpoints written before the move record.
MOVED = {
    "model.activation_checkpointing": "execution.activation_checkpointing",
    "model.compile": "execution.compile",
    "model.loss_chunk_tokens": "execution.loss_chunk_tokens",
    "train.inject_nan_steps": "debug.inject_nan_steps",
}


@dataclass(frozen=True)
class Layout:
    """Sizes derived from the config and the world size, computed once."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    global_batch_size: int
    grad_accumulation: int  # micro-batches per rank per optimizer step
    cp: int = 1
    sequence_parallel: bool = False  # parallel.sequence_parallel resolved
    ep: int = 1

    @property
    def replicas(self) -> int:
        """Ranks that hold the same parameters and average their gradients (DeepSpeed's data axis): dp x cp."""
        return self.dp * self.cp


@functools.cache
def _schema() -> DictConfig:
    """The defaults as omegaconf's typed schema, built once (merging copies it, never changes it)."""
    return OmegaConf.structured(Config)


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, type-checked against the schema."""
    try:
        layers = [_schema()]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
            layers.append(_renamed(OmegaConf.load(path), str(path), warn=True))
        layers.append(_renamed(OmegaConf.from_dotlist(list(overrides)), "the overrides", warn=True))
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None


def _renamed(layer: DictConfig, source: str, warn: bool) -> DictConfig:
    """`layer` with the settings of MOVED under their new names."""
    for old, new in MOVED.items():
        old_section, old_key = old.split(".")
        section = layer.get(old_section)
        if not isinstance(section, DictConfig) or old_key not in section:
            continue
        if OmegaConf.select(layer, new) is not None:
            raise ConfigError(f"{source} sets both {old} and {new}: keep only {new}")
        value = section.pop(old_key)
        OmegaConf.update(layer, new, value, merge=True)
        if warn:
            warnings.warn(f"{source}: {old} is now called {new} (the old name still works)", FutureWarning,
                          stacklevel=3)
    return layer


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    if type(error).__name__ == "ConfigKeyError" and key:
        return f"unknown setting '{key}': check its spelling against configs/ and `pretrain train --help`"
    if key:
        return f"setting '{key}': {message}"
    return message


def validate(config: Config, world_size: int) -> Layout:
    """Check every rule that involves several settings; report all broken rules at once."""
    model, execution, parallel, train = config.model, config.execution, config.parallel, config.train
    tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key, value in [("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp), ("parallel.ep", parallel.ep),
                       ("model.num_layers", model.num_layers),
                       ("model.hidden_size", model.hidden_size), ("model.num_heads", model.num_heads),
                       ("model.num_kv_heads", model.num_kv_heads), ("model.ffn_hidden_size", model.ffn_hidden_size),
                       ("model.seq_len", model.seq_len),
                       ("model.vocab_pad_multiple", model.vocab_pad_multiple),
                       ("execution.loss_chunk_tokens", execution.loss_chunk_tokens),
                       ("train.max_steps", train.max_steps), ("train.micro_batch_size", train.micro_batch_size),
                       ("train.global_batch_size", train.global_batch_size), ("log.interval", config.log.interval)]:
        need(value >= 1, f"{key}={value} must be at least 1")
    need(model.vocab_size >= 0, f"model.vocab_size={model.vocab_size} must be >= 0 (0 = from the data's tokenizer)")
    need(execution.compile in ("auto", True, False),
         f"execution.compile={execution.compile!r} must be true, false or auto")
    need(parallel.sequence_parallel in ("auto", True, False),
         f"parallel.sequence_parallel={parallel.sequence_parallel!r} must be true, false or auto")
    if problems:
        raise ConfigError(_report(problems))

    need(model.hidden_size % model.num_heads == 0,
         f"model.hidden_size={model.hidden_size} must be divisible by model.num_heads={model.num_heads}")
    need(model.hidden_size % model.num_heads != 0 or model.head_dim % 2 == 0,
         f"head dimension model.hidden_size/model.num_heads={model.hidden_size / model.num_heads:g} must be even for RoPE")
    need(model.num_heads % model.num_kv_heads == 0,
         f"model.num_heads={model.num_heads} must be a multiple of model.num_kv_heads={model.num_kv_heads}")
    for key, value in [("model.num_heads", model.num_heads), ("model.num_kv_heads", model.num_kv_heads),
                       ("model.ffn_hidden_size", model.ffn_hidden_size)]:
        need(value % tp == 0, f"{key}={value} is not divisible by parallel.tp={tp}: "
                              f"choose parallel.tp among {_divisors(value)} or change {key}")
    problems += _rope_scaling_problems(model)
    if model.moe.num_experts > 0:
        _check_moe(config, need)
    if parallel.ep > 1:
        _check_expert_parallel(config, world_size // (tp * pp * cp), need)
    need(model.moe.num_experts >= 0, f"model.moe.num_experts={model.moe.num_experts} must be >= 0 (0 = dense model)")
    need(model.num_layers >= pp, f"parallel.pp={pp} exceeds model.num_layers={model.num_layers}: "
                                 "each pipeline stage needs at least one layer")
    sizes = {"parallel.tp": tp, "parallel.pp": pp, **({"parallel.cp": cp} if cp > 1 else {})}
    need(world_size % (tp * pp * cp) == 0,
         f"world size {world_size} is not divisible by {' x '.join(sizes)} = {' x '.join(map(str, sizes.values()))}: "
         f"launch a multiple of {tp * pp * cp} processes or change {'/'.join(sizes)}")
    sequence_parallel = tp > 1 if parallel.sequence_parallel == "auto" else parallel.sequence_parallel
    need(not (sequence_parallel and tp == 1),
         "parallel.sequence_parallel=true needs parallel.tp > 1 (it splits the sequence among tensor-parallel "
         "ranks); set it to auto or false, or raise parallel.tp")
    need(model.seq_len % (2 * cp) == 0,
         f"model.seq_len={model.seq_len} must be divisible by 2 x parallel.cp = {2 * cp}: each sequence is split "
         "into 2 x cp chunks; change model.seq_len or parallel.cp")
    need(not sequence_parallel or model.seq_len // cp % tp == 0,
         f"model.seq_len / parallel.cp = {model.seq_len // cp} tokens per context-parallel rank must be divisible "
         f"by parallel.tp={tp} under sequence parallelism; change model.seq_len or set "
         "parallel.sequence_parallel=false")
    need(config.optimizer.zero_stage in (0, 1, 2, 3), f"optimizer.zero_stage={config.optimizer.zero_stage} must be 0, 1, 2 or 3")
    need(not (config.optimizer.zero_stage >= 2 and pp > 1),
         f"optimizer.zero_stage={config.optimizer.zero_stage} cannot be combined with parallel.pp={pp}: DeepSpeed's "
         "pipeline engine supports ZeRO stages 0 and 1 only; set optimizer.zero_stage=1 or parallel.pp=1")
    need(not (execution.compile is True and config.optimizer.zero_stage == 3),
         "execution.compile=true cannot be combined with optimizer.zero_stage=3: ZeRO-3's parameter hooks break the "
         "compiled graphs; set execution.compile=false (or auto, which then stays off) or use ZeRO-1/2")
    need(not (config.optimizer.zero_stage == 0 and pp > 1),
         f"optimizer.zero_stage=0 cannot be combined with parallel.pp={pp}: DeepSpeed then computes the "
         "gradient-clipping norm wrongly on later pipeline stages; set optimizer.zero_stage=1")
    optimizer = config.optimizer
    need(math.isfinite(optimizer.lr) and optimizer.lr > 0, f"optimizer.lr={optimizer.lr} must be positive and finite")
    for key in ("beta1", "beta2"):
        value = getattr(optimizer, key)
        need(0 <= value < 1, f"optimizer.{key}={value} must be in [0, 1) (typical: beta1 0.9, beta2 0.95)")
    need(math.isfinite(optimizer.eps) and optimizer.eps > 0, f"optimizer.eps={optimizer.eps} must be > 0 (e.g. 1e-8)")
    need(math.isfinite(optimizer.weight_decay) and optimizer.weight_decay >= 0,
         f"optimizer.weight_decay={optimizer.weight_decay} must be >= 0 (0 = none)")
    need(math.isfinite(optimizer.grad_clip) and optimizer.grad_clip >= 0,
         f"optimizer.grad_clip={optimizer.grad_clip} must be >= 0 (0 = off)")
    if optimizer.name == OptimizerName.muon:
        _check_muon(optimizer, train.precision, need)
    need(math.isfinite(model.z_loss) and model.z_loss >= 0,
         f"model.z_loss={model.z_loss} must be >= 0 (0 = off; PaLM: 1e-4)")
    need(config.schedule.warmup_steps >= 0, f"schedule.warmup_steps={config.schedule.warmup_steps} must be >= 0")
    need(0 <= config.schedule.min_lr_ratio <= 1, f"schedule.min_lr_ratio={config.schedule.min_lr_ratio} must be in [0, 1]")
    need(0 < config.schedule.decay_fraction <= 1,
         f"schedule.decay_fraction={config.schedule.decay_fraction} must be in (0, 1]")
    need(train.max_tokens >= 0, f"train.max_tokens={train.max_tokens} must be >= 0 (0 = no token budget)")
    need(config.checkpoint.interval >= 0, f"checkpoint.interval={config.checkpoint.interval} must be >= 0")
    need(config.checkpoint.lease_timeout_s > 0,
         f"checkpoint.lease_timeout_s={config.checkpoint.lease_timeout_s} must be > 0 (e.g. 120)")
    need(config.checkpoint.keep_last >= 0 and config.checkpoint.keep_every >= 0,
         "checkpoint.keep_last and checkpoint.keep_every must be >= 0")
    need(not (config.checkpoint.resume not in ("auto", "none") and not Path(config.checkpoint.resume).exists()),
         f"checkpoint.resume={config.checkpoint.resume} does not exist: give auto, none or a checkpoint directory")
    need(not config.checkpoint.init_from or Path(config.checkpoint.init_from).exists(),
         f"checkpoint.init_from={config.checkpoint.init_from} does not exist: give a checkpoint.dir or one of its "
         "step_* folders")
    need(train.max_bad_steps >= 1, f"train.max_bad_steps={train.max_bad_steps} must be at least 1")
    need(not (config.debug.inject_nan_steps and pp > 1), "debug.inject_nan_steps (fault injection) needs parallel.pp=1")
    need(train.eval_interval >= 0, f"train.eval_interval={train.eval_interval} must be >= 0 (0 = no validation)")
    need(train.hang_timeout_s >= 0, f"train.hang_timeout_s={train.hang_timeout_s} must be >= 0 (0 = no watchdog)")
    need(train.max_restarts >= 0, f"train.max_restarts={train.max_restarts} must be >= 0")
    need(config.parallel.timeout_minutes > 0,
         f"parallel.timeout_minutes={config.parallel.timeout_minutes} must be > 0 (e.g. 30)")
    need(train.eval_steps >= 1, f"train.eval_steps={train.eval_steps} must be at least 1")
    log = config.log
    need(log.sample_interval >= 0, f"log.sample_interval={log.sample_interval} must be >= 0 (0 = no samples)")
    need(log.moe_idle_intervals >= 0, f"log.moe_idle_intervals={log.moe_idle_intervals} must be >= 0 (0 = no warning)")
    need(not log.sample_interval or bool(log.sample_prompts),
         f"log.sample_interval={log.sample_interval} needs log.sample_prompts, e.g. 'log.sample_prompts=[\"def \"]'")
    need(not log.sample_interval or log.sample_tokens >= 1, f"log.sample_tokens={log.sample_tokens} must be at least 1")
    need(not (log.sample_interval and config.optimizer.zero_stage == 3),
         "log.sample_interval needs whole weights on each rank: not with optimizer.zero_stage=3 (use 0-2)")
    need(not (log.sample_interval and config.data.source == DataSource.synthetic),
         "log.sample_interval needs a tokenizer: not with data.source=synthetic")
    downstream = config.downstream
    need(downstream.interval >= 0, f"downstream.interval={downstream.interval} must be >= 0 (0 = no evaluation)")
    need(downstream.examples >= 0, f"downstream.examples={downstream.examples} must be >= 0 (0 = all)")
    need(downstream.fewshot is None or downstream.fewshot >= 0,
         f"downstream.fewshot={downstream.fewshot} must be >= 0 (or unset: each task spec's own)")
    need(not downstream.interval or bool(downstream.tasks),
         f"downstream.interval={downstream.interval} needs downstream.tasks, e.g. "
         "'downstream.tasks=[python_next_line]'")
    need(not (downstream.interval and config.optimizer.zero_stage == 3),
         "downstream.interval needs whole weights on each rank: not with optimizer.zero_stage=3 (use 0-2, or "
         "`pretrain eval --tasks` on the checkpoints)")
    need(not (downstream.interval and config.data.source == DataSource.synthetic),
         "downstream.interval needs a tokenizer: not with data.source=synthetic")
    for reference in downstream.tasks if downstream.interval else ():
        try:
            read_spec(reference)
        except TaskError as error:
            problems.append(f"downstream.tasks: {error}")
    need(not (train.eval_interval and not config.data.valid_path),
         f"train.eval_interval={train.eval_interval} needs data.valid_path (held-out shards), or set train.eval_interval=0")
    need(config.data.num_workers >= 0, f"data.num_workers={config.data.num_workers} must be >= 0")
    need(config.data.skip_corrupt >= 0, f"data.skip_corrupt={config.data.skip_corrupt} must be >= 0")
    data_paths = data_path_list(config.data.path)
    if config.data.source == DataSource.synthetic:
        need(model.vocab_size > 0, "model.vocab_size must be set (> 0) for data.source=synthetic")
    else:
        need(bool(data_paths), f"data.path is not set: point it at a shards folder (data.source={config.data.source.value})"
                               " or use data.source=synthetic")
        need(not config.data.weights or len(config.data.weights) == len(data_paths),
             f"data.weights has {len(config.data.weights)} entries for {len(data_paths)} data.path entries")
        need(all(w > 0 for w in config.data.weights), f"data.weights={list(config.data.weights)} must all be > 0")
    need(config.data.source != DataSource.raw or bool(config.data.tokenizer),
         "data.source=raw needs data.tokenizer (a folder from `pretrain tokenizer train`)")

    dp = max(world_size // (tp * pp * cp), 1)
    per_step = train.micro_batch_size * dp
    need(train.global_batch_size % per_step == 0,
         f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size "
         f"({train.micro_batch_size}) x data-parallel size ({dp}) = {per_step}, e.g. "
         f"{max(per_step, train.global_batch_size // per_step * per_step)}")
    if problems:
        raise ConfigError(_report(problems))
    return Layout(world_size=world_size, tp=tp, pp=pp, dp=dp, micro_batch_size=train.micro_batch_size,
                  global_batch_size=train.global_batch_size, grad_accumulation=train.global_batch_size // per_step,
                  cp=cp, sequence_parallel=sequence_parallel, ep=parallel.ep)


def _rope_scaling_problems(model: LlamaArgs) -> list[str]:
    scaling = model.rope_scaling
    if scaling.kind == RopeScalingKind.none:
        return []
    kind, problems = scaling.kind.value, []
    if not scaling.factor >= 1:
        problems.append(f"model.rope_scaling.factor={scaling.factor} must be >= 1 (the new length over the original)")
    if scaling.original_seq_len < 1:
        problems.append(f"model.rope_scaling.kind={kind} needs model.rope_scaling.original_seq_len: the sequence "
                        "length the model was trained at before the extension")
    if scaling.kind == RopeScalingKind.llama3 and not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        problems.append(f"model.rope_scaling.low_freq_factor={scaling.low_freq_factor} and high_freq_factor="
                        f"{scaling.high_freq_factor} must satisfy 0 < low < high (Llama 3.1: 1 and 4)")
    if scaling.kind == RopeScalingKind.yarn and not 0 < scaling.beta_slow < scaling.beta_fast:
        problems.append(f"model.rope_scaling.beta_slow={scaling.beta_slow} and beta_fast={scaling.beta_fast} "
                        "must satisfy 0 < beta_slow < beta_fast (YaRN: 1 and 32)")
    return problems


def _check_moe(config: Config, need: Callable[[bool, str], None]) -> None:
    """model.moe with num_experts > 0: its settings, and the layouts it is not yet built for."""
    moe, model, parallel = config.model.moe, config.model, config.parallel
    need(1 <= moe.top_k <= moe.num_experts,
         f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}")
    need(moe.expert_ffn_hidden_size >= 1,
         f"model.moe.expert_ffn_hidden_size={moe.expert_ffn_hidden_size} must be at least 1: set each expert's "
         "SwiGLU width (e.g. model.ffn_hidden_size / model.moe.top_k)")
    need(moe.shared_experts >= 0, f"model.moe.shared_experts={moe.shared_experts} must be >= 0 (0 = none)")
    need(0 <= moe.first_dense_layers < model.num_layers,
         f"model.moe.first_dense_layers={moe.first_dense_layers} must be in [0, model.num_layers={model.num_layers}): "
         "at least one block must have experts (for a dense model set model.moe.num_experts=0)")
    for key in ("aux_loss_coeff", "z_loss_coeff", "capacity_factor", "bias_update_rate"):
        value = getattr(moe, key)
        need(math.isfinite(value) and value >= 0, f"model.moe.{key}={value} must be >= 0 (0 = off)")
    need(moe.capacity_factor == 0 or moe.capacity_factor * moe.top_k >= 1,
         f"model.moe.capacity_factor={moe.capacity_factor} with top_k={moe.top_k} would drop most tokens: use 0 "
         "(dropless) or at least 1 / top_k (typical: 1.25)")
    need(parallel.cp == 1, f"model.moe.num_experts={moe.num_experts} cannot be combined with parallel.cp={parallel.cp} "
                           "yet; set parallel.cp=1")
    need(parallel.pp == 1 or parallel.ep == 1,
         f"parallel.ep={parallel.ep} cannot be combined with parallel.pp={parallel.pp} yet (the pipeline engine takes "
         "no expert groups); set one of them to 1")
    sequence_parallel = parallel.tp > 1 if parallel.sequence_parallel == "auto" else parallel.sequence_parallel
    need(not (sequence_parallel and moe.capacity_factor),
         f"model.moe.capacity_factor={moe.capacity_factor} cannot be combined with sequence parallelism yet (each "
         "tensor-parallel rank would cap its own tokens); set parallel.sequence_parallel=false or capacity_factor=0")
    need(moe.shared_experts * moe.expert_ffn_hidden_size % parallel.tp == 0,
         f"model.moe.shared_experts x expert_ffn_hidden_size = {moe.shared_experts * moe.expert_ffn_hidden_size} "
         f"(the shared experts' width) is not divisible by parallel.tp={parallel.tp}")
    need(config.optimizer.zero_stage != 3,
         "model.moe cannot be combined with optimizer.zero_stage=3 (DeepSpeed refuses mixtures of experts there); "
         "use optimizer.zero_stage 0, 1 or 2")
    need(config.execution.compile is not True,
         "model.moe cannot be combined with execution.compile=true yet (routing has data-dependent shapes); set "
         "execution.compile=auto (off for mixtures of experts) or false")
    need(config.optimizer.name != OptimizerName.muon,
         "model.moe cannot be combined with optimizer.name=muon yet (Muon orthogonalises 2-D matrices, the experts "
         "are stacked 3-D tensors); use optimizer.name=adamw")


def _check_expert_parallel(config: Config, dp: int, need: Callable[[bool, str], None]) -> None:
    """parallel.ep > 1: a mixture of experts whose experts and data-parallel ranks it divides, and the
    features not built for it yet."""
    ep, moe = config.parallel.ep, config.model.moe
    need(moe.num_experts > 0 and moe.num_experts % ep == 0,
         f"parallel.ep={ep} needs a mixture of experts whose model.moe.num_experts ({moe.num_experts}) it divides")
    need(dp % ep == 0, f"parallel.ep={ep} must divide the data-parallel size ({dp}): expert-parallel groups are made "
                       "of data-parallel ranks; launch a multiple of ep processes or change parallel.ep")
    need(config.optimizer.zero_stage in (1, 2),
         f"parallel.ep={ep} needs optimizer.zero_stage 1 or 2 (not {config.optimizer.zero_stage}): only there does "
         "DeepSpeed partition and reduce expert gradients over the expert-data-parallel ranks")
    need(not config.log.sample_interval and not config.downstream.interval,
         f"parallel.ep={ep} cannot be combined with log.sample_interval or downstream.interval yet (they run on one "
         "data-parallel replica; every rank of an expert-parallel group must take part); set them to 0")


def _check_muon(optimizer: OptimizerConfig, precision: Precision, need: Callable[[bool, str], None]) -> None:
    need(optimizer.zero_stage in (0, 1, 2),
         f"optimizer.name=muon cannot be combined with optimizer.zero_stage={optimizer.zero_stage}: ZeRO-3 cuts every "
         "matrix across the data-parallel ranks, and Muon orthogonalises whole matrices; use optimizer.zero_stage=1 or 2")
    need(optimizer.zero_stage != 0 or precision == Precision.fp32,
         f"optimizer.name=muon with optimizer.zero_stage=0 needs train.precision=fp32 (not {precision.value}; auto is "
         "bf16 on GPUs): DeepSpeed's bf16 optimizer at ZeRO-0 partitions the master weights in a layout Muon does "
         "not read; use optimizer.zero_stage=1")
    need(0 <= optimizer.muon_momentum < 1,
         f"optimizer.muon_momentum={optimizer.muon_momentum} must be in [0, 1) (typical: 0.95)")
    need(optimizer.muon_ns_steps >= 1,
         f"optimizer.muon_ns_steps={optimizer.muon_ns_steps} must be at least 1 (typical: 5)")
    need(len(optimizer.muon_ns_coefficients) == 3 and all(map(math.isfinite, optimizer.muon_ns_coefficients)),
         f"optimizer.muon_ns_coefficients={list(optimizer.muon_ns_coefficients)} must be three finite numbers "
         "(a, b, c of the quintic; typical: [3.4445, -4.7750, 2.0315])")
    need(math.isfinite(optimizer.muon_update_rms) and optimizer.muon_update_rms > 0,
         f"optimizer.muon_update_rms={optimizer.muon_update_rms} must be positive (typical: 0.2)")


def validate_without_data(config: Config, world_size: int) -> Layout:
    """validate() of what a launch of `world_size` processes needs besides its data: the model,
    the parallel layout and the optimizer (for planning and for converting checkpoints; the data,
    validation, samples, downstream tasks and the checkpoint to resume are left out)."""
    return validate(dataclasses.replace(
        config, data=dataclasses.replace(config.data, source=DataSource.synthetic, valid_path=""),
        train=dataclasses.replace(config.train, eval_interval=0),
        log=dataclasses.replace(config.log, sample_interval=0),
        downstream=dataclasses.replace(config.downstream, interval=0),
        checkpoint=dataclasses.replace(config.checkpoint, resume="none", init_from="")), world_size)


def total_steps(config: Config) -> int:
    """Optimizer steps of the run: train.max_steps, or fewer when the token budget ends first."""
    tokens_per_step = config.train.global_batch_size * config.model.seq_len
    if config.train.max_tokens:
        return min(config.train.max_steps, -(-config.train.max_tokens // tokens_per_step))
    return config.train.max_steps


def run_id(config: Config) -> str:
    """What identifies a run across its own restarts and requeues: its resolved log.dir."""
    return hashlib.sha256(str(Path(config.log.dir).resolve()).encode()).hexdigest()[:16]


def data_path_list(path: Any) -> list[str]:
    """data.path as a list: one location or several (blending)."""
    if path is None or path == "":
        return []
    if isinstance(path, str):
        return [path]
    if isinstance(path, (list, tuple)) and all(isinstance(p, str) for p in path):
        return list(path)
    raise ConfigError(f"setting 'data.path': expected a path or a list of paths, got {path!r}")


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _report(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid configuration: {problems[0]}"
    return "invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_yaml(text: str) -> Config:
    """The inverse of to_yaml (e.g. the config recorded in a checkpoint), checked against the schema."""
    try:
        stored = _renamed(OmegaConf.create(text), "a stored config", warn=False)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), stored))
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None
