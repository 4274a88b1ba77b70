"""The training loop: model + optimizer inside a DeepSpeed engine, fed by a data stream split
by data-parallel rank, with metrics every `log.interval` steps, validation and checkpoints."""

import contextlib
import hashlib
import itertools
import math
import warnings
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from pretrain import checkpoint, parallel, plan
from pretrain.checkpoint import StopSignals
from pretrain.config import Config, ConfigError, Layout, Precision, to_yaml, total_steps, validate
from pretrain.data import stream
from pretrain.data.shards import ShardError
from pretrain.accelerators import peak_flops
from pretrain.metrics import MetricsWriter, peak_memory_gib, throughput
from pretrain.model.execution import apply_execution
from pretrain.model.llama import Llama
from pretrain.generate import ModelDecoder, PipelineDecoder, Sampling, generate
from pretrain.model.pipeline import build_pipeline, canonical_name, head_weight
from pretrain.model.weights import load_full_state_dict
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.tokenizer import Tokenizer
from pretrain.update import DeviceUpdate
from pretrain.watchdog import Watchdog


DEVICE_UPDATE_STAGES = (1, 2)  # ZeRO stages whose optimizer step DeviceUpdate keeps on the device

# Model settings a checkpoint's weights must agree with (the others may change when resuming).
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                "rope_theta", "norm_eps", "tie_embeddings")


@dataclass
class TrainResult:
    """What a finished run reports back (rank-independent values)."""

    steps: int
    tokens: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean loss, at logged steps
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm, likewise
    valid_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    resumed_from: int = 0  # step of the checkpoint the run started from (0: a fresh start)
    stopped_by_signal: bool = False  # a stop signal ended the run early (after saving a checkpoint)
    skipped_steps: int = 0  # updates skipped for a non-finite loss


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    if precision == Precision.auto:
        return Precision.bf16 if device.type == "cuda" else Precision.fp32
    return precision


def resolve_compile(config: Config, device: torch.device) -> bool:
    """execution.compile=auto: compiled blocks on GPU, except under ZeRO-3 (its hooks break the graphs)."""
    if config.execution.compile == "auto":
        return device.type == "cuda" and config.optimizer.zero_stage != 3
    return config.execution.compile


def deepspeed_config(config: Config, layout: Layout, precision: Precision) -> dict:
    """The DeepSpeed engine settings, all derived from our config (never edited by hand). With
    ZeRO-1/2 DeviceUpdate measures, clips and skips instead of DeepSpeed (see pretrain.update)."""
    stage = config.optimizer.zero_stage
    device_update = stage in DEVICE_UPDATE_STAGES
    zero = {"stage": stage, "compute_grad_norm": not device_update}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = config.optimizer.zero3_param_persistence_threshold
    return {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accumulation,
        "gradient_clipping": 0.0 if device_update else config.optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == Precision.bf16, "check_grad_overflow": not device_update},
        "timers": {"throughput": {"enabled": False}},  # it synchronises the device twice a step
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def train(config: Config) -> TrainResult:
    """Run training as this process's share of the job (torchrun sets the world; else 1 process).

    The config is validated and the data checked against it before any process group exists.
    A process group that already exists is used and left running (several runs in one launch)."""
    layout = validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    data = stream.resolve(config)
    owns_process_group = not dist.is_initialized()
    context = parallel.initialize(layout.tp, layout.pp, config.parallel.backend.value,
                                  config.parallel.timeout_minutes)
    try:
        return Trainer(config, layout, context, data).run()
    finally:
        parallel.shutdown(destroy_process_group=owns_process_group)


class Trainer:
    def __init__(self, config: Config, layout: Layout, context: parallel.ParallelContext,
                 data: stream.DataInfo | None):
        self.config, self.layout, self.context, self.data = config, layout, context, data
        self.precision = resolve_precision(config.train.precision, context.device)
        self.steps = total_steps(config)
        self.log_dir = Path(config.log.dir)
        if context.rank == 0:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            (self.log_dir / "config.yaml").write_text(to_yaml(config))
        if data is not None and config.data.verify:
            stream.verify_shards(data, context.rank, context.world_size, tolerate=config.data.skip_corrupt > 0)

        torch.manual_seed(config.train.seed)
        resume_from = self._find_checkpoint() if config.checkpoint.dir else None
        self.pipelined = layout.pp > 1
        if self.pipelined:
            if layout.grad_accumulation < layout.pp and context.rank == 0:
                warnings.warn(f"{layout.grad_accumulation} micro-batches per step for {layout.pp} pipeline stages: "
                              "most of each step is pipeline bubble; raise train.global_batch_size or lower "
                              "train.micro_batch_size")
            self.model = build_pipeline(config.model, context.tp_group, context.topology,
                                        config.parallel.pp_partition.value, config.train.seed)
        else:
            self.model = Llama(config.model, context.tp_group)
            self.model.init_weights(config.train.seed)
        apply_execution(self.model, config.execution, resolve_compile(config, context.device))
        starts_from_weights = resume_from is not None and checkpoint.checkpoint_format(resume_from) == checkpoint.WEIGHTS
        if starts_from_weights:  # before DeepSpeed copies the weights into its optimizer
            self._load_weights(resume_from)
        self.model.universal_checkpoint_info = checkpoint.universal_checkpoint_info(config.model.vocab_size)
        optimizer = build_optimizer(self.model, config.optimizer)
        scheduler = build_scheduler(optimizer, config.schedule, self.steps)
        self.engine, *_ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(config, layout, self.precision),
            mpu=None if self.pipelined else parallel.MegatronMpu(),  # the pipeline module brings its own grid
        )
        if context.rank == 0:
            print(plan.memory_check(config, layout.world_size, context.device), flush=True)
        self.device_update = DeviceUpdate(self.engine.optimizer, config.optimizer.grad_clip, config.train.max_bad_steps) \
            if config.optimizer.zero_stage in DEVICE_UPDATE_STAGES else None
        self.metrics = MetricsWriter(self.log_dir, self.steps, enabled=context.rank == 0, wandb=self._wandb_settings())
        self.sampler = self._sampler()
        self.samples_per_step = layout.global_batch_size
        self.consumed_samples = 0
        self.skipped_corrupt = 0
        # each damaged sample is counted once per replica: by its first-stage, TP-rank-0 process
        self.counts_damage = context.is_first_stage and context.tp_rank == 0
        self.window_damaged = 0
        self.raw_state = None  # data.source=raw: the per-rank stream position after the last batch
        self.start_step, self.tokens = 0, 0
        self.stop_signals = StopSignals()
        # Without DeviceUpdate (ZeRO-0/3): DeepSpeed skips updates with a non-finite gradient norm
        # with its bf16 ZeRO-0 optimizer; elsewhere a non-finite loss stops the run.
        self.deepspeed_skips_bad_updates = config.optimizer.zero_stage == 0 and self.precision == Precision.bf16
        # DeepSpeed clips ZeRO-0 fp32 gradients without keeping the norm: measure it ourselves.
        self.engine_reports_norm = config.optimizer.zero_stage > 0 or self.precision != Precision.fp32
        if resume_from is not None and not starts_from_weights:
            self._resume(resume_from)

    def _wandb_settings(self) -> dict | None:
        if not self.config.log.wandb:
            return None
        log = self.config.log
        run_id = hashlib.sha256(str(self.log_dir.resolve()).encode()).hexdigest()[:16]  # a resumed run continues it
        return {"project": log.wandb_project, "name": log.wandb_run_name, "id": run_id,
                "config": OmegaConf.to_container(OmegaConf.structured(self.config), resolve=True)}

    def _sampler(self) -> tuple[Tokenizer, list[list[int]]] | None:
        """log.sample_prompts tokenized, when the run samples."""
        if not self.config.log.sample_interval:
            return None
        if not self.config.data.tokenizer:
            raise ConfigError("log.sample_interval needs a tokenizer: set data.tokenizer (shards built before "
                              "they carried their tokenizer do not name one)")
        tokenizer = Tokenizer.load(self.config.data.tokenizer)
        return tokenizer, tokenizer.encode(list(self.config.log.sample_prompts))

    def sample(self, step: int) -> None:
        """Complete log.sample_prompts with the current weights (greedy), as the training ranks:
        TP peers together, pipeline stages in turn; one data-parallel replica. Nothing of the
        training state changes (the weights are only read; sampling has its own generator)."""
        if self.context.dp_rank != 0:
            return
        tokenizer, prompts = self.sampler
        if self.pipelined:
            decoder = PipelineDecoder(self.model, self.config.model, self.context.tp_group,
                                      head_weight(self.model, self.config.model) if self.context.is_last_stage else None)
        else:
            decoder = ModelDecoder(self.model)
        sampling = Sampling(max_new_tokens=self.config.log.sample_tokens, seed=self.config.train.seed)
        ids = generate(decoder, prompts, sampling, tokenizer.eos_id, tokenizer.pad_id)
        self.metrics.write_samples(step, list(self.config.log.sample_prompts), [tokenizer.decode(row) for row in ids])

    def _find_checkpoint(self) -> Path | None:
        found = [checkpoint.find_checkpoint(Path(self.config.checkpoint.dir), self.config.checkpoint.resume)
                 if self.context.rank == 0 else None]
        dist.broadcast_object_list(found, src=0)  # one decision, whatever each rank's view of the disk
        return found[0]

    def _load_weights(self, path: Path) -> None:
        """Start from a weights-only checkpoint (`pretrain convert from-hf`): step 0, fresh optimizer."""
        from pretrain.convert.reader import CheckpointReader, LazyTensors

        reader = CheckpointReader(path)
        differences = [f"model.{key}: checkpoint {value!r}, this run {getattr(self.config.model, key)!r}"
                       for key, value in vars(reader.args).items()
                       if key in ARCHITECTURE and getattr(self.config.model, key) != value]
        if differences:
            raise checkpoint.CheckpointError(f"{path} holds another model than this run's config:\n  "
                                             + "\n  ".join(differences))
        canonical = (lambda name: canonical_name(name, self.config.model.num_layers)) if self.pipelined else (lambda name: name)
        started = time.perf_counter()
        load_full_state_dict(self.model, LazyTensors(reader), self.context.tp_rank, self.layout.tp, canonical)
        if self.context.rank == 0:
            print(f"loaded the weights of {path} in {time.perf_counter() - started:.1f} s", flush=True)

    def _resume(self, path: Path) -> None:
        started = time.perf_counter()
        with self.device_update.loading_checkpoint() if self.device_update else contextlib.nullcontext():
            client, rank_state = checkpoint.load(self.engine, path, self._layout_record(),
                                                 self.config.optimizer.zero_stage)
        self.start_step, self.tokens = client["step"], client["tokens"]
        self.consumed_samples = client["data"]["consumed_samples"]
        if self.data is not None and self.data.raw_files:
            if rank_state is None:
                raise checkpoint.CheckpointError(
                    f"{path} was written by another number of processes: data.source=raw resumes only at the "
                    "same data-parallel size (build shards with `pretrain data build` for elastic resumes)")
            self.raw_state = rank_state["raw_state"]
        if self.context.rank == 0:
            print(f"resumed from {path} (step {self.start_step}, {self.consumed_samples} samples consumed) "
                  f"in {time.perf_counter() - started:.1f} s", flush=True)

    def _batches(self):
        batches = stream.training_batches(self.config, self.data, self.layout, self.context.dp_rank,
                                            self.consumed_samples, pin_memory=self.context.device.type == "cuda",
                                            raw_state=self.raw_state)
        first = next(batches)
        stream.check_batch_agreement(first["tokens"], self.context.dp_rank)
        return self._counted(itertools.chain([first], batches))

    def _counted(self, batches):
        for batch in batches:
            if self.counts_damage:
                self.window_damaged += batch.get("corrupt", 0)
            self.raw_state = batch.get("state", self.raw_state)
            yield batch

    def _pipeline_feed(self, batches):
        """Micro-batch dicts -> the pipeline engine's ((tokens, position_ids[, document_ids]), labels),
        already on the device (DeepSpeed's own copy would block the host)."""
        device = self.context.device
        for batch in batches:
            tokens = batch["tokens"].to(device, non_blocking=True)
            position_ids = batch.get("position_ids")
            position_ids = torch.arange(tokens.shape[1], device=device).repeat(tokens.shape[0], 1) \
                if position_ids is None else position_ids.to(device, non_blocking=True)
            extra = (batch["document_ids"].to(device, non_blocking=True),) if "document_ids" in batch else ()
            yield (tokens, position_ids, *extra), batch["labels"].to(device, non_blocking=True)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss of a micro-batch and its number of predicted tokens."""
        device = self.context.device
        labels = batch["labels"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True) if "position_ids" in batch else None
        document_ids = batch["document_ids"].to(device, non_blocking=True) if "document_ids" in batch else None
        loss = self.engine(batch["tokens"].to(device, non_blocking=True), position_ids, document_ids, labels)
        return loss, (labels != -100).sum()

    def _step(self, step: int, batches, log_step: bool) -> tuple[torch.Tensor, float | None]:
        """One optimizer step; returns this rank's loss contribution (summed over DP ranks and
        divided by dp x accumulation it is the step's mean loss) and, when DeepSpeed does not
        report it, the gradient norm."""
        accumulation = self.layout.grad_accumulation
        if self.pipelined:
            loss = self.engine.train_batch(data_iter=batches)  # already averaged over micro-batches and DP
            return loss.detach() * accumulation, None
        total, grad_norm = torch.zeros((), device=self.context.device), None
        for micro in range(accumulation):
            loss, _ = self._loss(next(batches))
            if step in self.config.debug.inject_nan_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            if log_step and not self.engine_reports_norm and micro == accumulation - 1:
                grad_norm = reduced_grad_norm(self.model, self.context)
            self.engine.step()
            total += loss.detach()
        return total, grad_norm

    def run(self) -> TrainResult:
        self._report_restart()
        self.watchdog = Watchdog(self.config.train.hang_timeout_s, self.context.rank)
        try:
            return self._train_loop()
        finally:
            self.watchdog.stop()

    def _report_restart(self) -> None:
        """Under torchrun, after a worker failed: say which restart this is and from where it resumes."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and self.context.rank == 0:
            limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
            print(f"restart {restart} of at most {limit}: torchrun restarted the workers after one failed; "
                  f"continuing after step {self.start_step}", flush=True)
            self.metrics.write(self.start_step, {"restarts": restart}, group="fault", console=False)

    def _train_loop(self) -> TrainResult:
        config, layout, context = self.config, self.layout, self.context
        batches = self._batches()
        if self.pipelined:
            batches = self._pipeline_feed(batches) if context.is_first_stage or context.is_last_stage else None
        flops_per_token, peak = config.model.flops_per_token(), peak_flops(context.device)
        tokens_per_step = layout.global_batch_size * config.model.seq_len
        result = TrainResult(steps=self.start_step, tokens=self.tokens, resumed_from=self.start_step)
        window_start, window_steps = time.perf_counter(), 0
        window_loss = torch.zeros((), device=context.device)
        bad_in_a_row = 0
        self.metrics.advance(self.start_step)
        for step in range(self.start_step + 1, self.steps + 1):
            lr = self.engine.get_lr()[0]
            log_step = step % config.log.interval == 0 or step == self.steps
            skipped_before = self.engine.skipped_steps
            loss, grad_norm = self._step(step, batches, log_step)
            self.watchdog.progress(f"step {step}")
            if self.device_update is None:
                bad_in_a_row = self._check_update(step, loss, skipped_before, bad_in_a_row, result)
            window_loss += loss
            self.consumed_samples += self.samples_per_step
            result.steps, result.tokens = step, result.tokens + tokens_per_step
            window_steps += 1

            if log_step:
                if self.device_update is not None:
                    grad_norm = self._read_device_update(step, result)
                elif grad_norm is None:
                    grad_norm = float(self.engine.get_global_grad_norm())
                dist.all_reduce(window_loss, group=context.dp_group)
                damaged = torch.tensor(self.window_damaged, device=context.device)
                dist.all_reduce(damaged)
                self.skipped_corrupt += int(damaged)
                elapsed = time.perf_counter() - window_start
                values = {"loss": window_loss.item() / (context.dp * layout.grad_accumulation * window_steps),
                          "lr": lr, "grad_norm": grad_norm,
                          **throughput(tokens_per_step * window_steps, elapsed, flops_per_token,
                                       context.world_size, peak),
                          "step_time": elapsed / window_steps, "mem_peak_gib": peak_memory_gib(context.device),
                          "skipped_steps": result.skipped_steps, "consumed_samples": self.consumed_samples}
                result.losses[step], result.grad_norms[step] = values["loss"], grad_norm
                self.metrics.write(step, values)
                if self.data is not None:
                    self.metrics.write(step, {"skipped_corrupt": self.skipped_corrupt}, group="data", console=False)
                if self.skipped_corrupt > config.data.skip_corrupt:
                    raise ShardError(f"{self.skipped_corrupt} damaged samples so far, more than data.skip_corrupt="
                                     f"{config.data.skip_corrupt}: see the warnings above for the shards")
                window_loss.zero_()
                self.window_damaged = 0
                window_start, window_steps = time.perf_counter(), 0
            self.metrics.advance(1)
            if config.train.eval_interval and (step % config.train.eval_interval == 0 or step == self.steps):
                result.valid_losses[step] = self.evaluate(step)
                self.watchdog.progress(f"the evaluation at step {step}")
            if config.log.sample_interval and step % config.log.sample_interval == 0:
                self.sample(step)
                self.watchdog.progress(f"the samples at step {step}")
            stop = self.stop_signals.agreed()
            if config.checkpoint.dir and (step == self.steps or stop or (
                    config.checkpoint.interval and step % config.checkpoint.interval == 0)):
                self.save(step, result.tokens)
                self.watchdog.progress(f"the checkpoint of step {step}")
            if stop:
                if context.rank == 0:
                    print(f"stop signal received: stopped after step {step}"
                          + (" with a checkpoint saved" if config.checkpoint.dir else " (no checkpoint.dir set)"),
                          flush=True)
                result.stopped_by_signal = True
                break
        self.metrics.close()
        self.stop_signals.restore()
        return result

    def _read_device_update(self, step: int, result: TrainResult) -> float:
        """At a log step: DeviceUpdate's gradient norm and skipped updates (counted and printed);
        stop once train.max_bad_steps updates in a row were skipped."""
        grad_norm, skipped, limit_step = self.device_update.read()
        if skipped > result.skipped_steps and self.context.rank == 0:
            print(f"step {step}: {skipped - result.skipped_steps} update(s) skipped for a non-finite loss or gradient "
                  f"since the last log step ({skipped} in this run)", flush=True)
        result.skipped_steps = skipped
        if limit_step:
            max_bad = self.config.train.max_bad_steps
            raise FloatingPointError(
                f"{max_bad} updates in a row skipped for a non-finite loss (train.max_bad_steps={max_bad}) at step "
                f"{self.start_step + limit_step}: lower optimizer.lr, check the data, or resume from an earlier checkpoint")
        return grad_norm

    def _check_update(self, step: int, loss: torch.Tensor, skipped_before: int, bad_in_a_row: int,
                      result: TrainResult) -> int:
        """Without DeviceUpdate: count updates DeepSpeed skipped for a non-finite loss (or stop at
        once when it cannot skip); stop after train.max_bad_steps in a row."""
        if self.deepspeed_skips_bad_updates:
            bad = self.engine.skipped_steps > skipped_before
        else:
            nonfinite = (~torch.isfinite(loss)).to(torch.int32)
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)  # every rank stops together
            if nonfinite.item():
                raise FloatingPointError(
                    f"non-finite loss at step {step}: with optimizer.zero_stage={self.config.optimizer.zero_stage} "
                    f"and {self.precision.value} DeepSpeed cannot skip the update, so training stops here; "
                    "ZeRO-1/2 skip such updates and count them")
            return 0
        if not bad:
            return 0
        result.skipped_steps += 1
        if self.context.rank == 0:
            print(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_a_row + 1} in a row)", flush=True)
        if bad_in_a_row + 1 >= self.config.train.max_bad_steps:
            raise FloatingPointError(
                f"{bad_in_a_row + 1} updates in a row skipped for a non-finite loss (train.max_bad_steps="
                f"{self.config.train.max_bad_steps}) at step {step}: lower optimizer.lr, check the data, or resume "
                "from an earlier checkpoint")
        return bad_in_a_row + 1

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Mean loss per predicted token over the fixed validation batches; logs valid/loss and valid/ppl."""
        batches = list(stream.validation_batches(self.config, self.data, self.layout, self.context.dp_rank))
        totals = torch.zeros(2, device=self.context.device)  # loss sum, predicted tokens
        totals[1] = sum(int((batch["labels"] != -100).sum()) for batch in batches)
        if self.pipelined:
            mean_loss = self.model.loss_fn  # None but on the last stage
            if mean_loss is not None:
                self.model.loss_fn = partial(mean_loss, reduction="sum")
            per_micro_batch = self.engine.eval_batch(iter(self._pipeline_feed(batches)),
                                                     num_micro_batches=len(batches))  # averaged over DP too
            self.model.loss_fn = mean_loss
            totals[0] = per_micro_batch * len(batches)  # summed over DP below: the loss sum of all batches
        else:
            self.engine.eval()
            for batch in batches:
                loss, count = self._loss(batch)
                totals[0] += loss * count
            self.engine.train()
        dist.all_reduce(totals, group=self.context.dp_group)
        mean = (totals[0] / totals[1]).item()
        self.metrics.write(step, {"loss": mean, "ppl": math.exp(min(mean, 50.0))}, group="valid")
        return mean

    def save(self, step: int, tokens: int) -> None:
        config = self.config.checkpoint
        client_state = {"step": step, "tokens": tokens, "data": {"consumed_samples": self.consumed_samples},
                        "config": to_yaml(self.config),
                        "tokenizer": {"path": self.config.data.tokenizer,
                                      "sha256": self.data.tokenizer_sha256 if self.data else None}}
        tokenizer = Path(self.config.data.tokenizer) if self.config.data.tokenizer else None
        checkpoint.save(self.engine, Path(config.dir), step, client_state, {"raw_state": self.raw_state},
                        self._layout_record(), config.keep_last, config.keep_every, tokenizer)

    def _layout_record(self) -> dict:
        return {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}


def reduced_grad_norm(model: torch.nn.Module, context: parallel.ParallelContext) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients; parameters replicated
    across TP ranks are counted once."""
    squares = torch.zeros((), device=context.device)
    for param in model.parameters():
        if param.grad is not None and (param.tensor_model_parallel or context.tp_rank == 0):
            squares += param.grad.float().pow(2).sum()
    dist.all_reduce(squares, group=context.tp_group)
    return squares.sqrt().item()
