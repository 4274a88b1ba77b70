"""The training loop. `Trainer` wires the parts together once — the model and its DeepSpeed
engine (pretrain.engine), the data stream split by data-parallel rank (pretrain.data.stream),
the step runner (pretrain.step), the guard of non-finite updates (pretrain.update), and one
component per decision: when to log (metrics.StepLog), validate (evaluation.Validator), sample
(samples.TrainingSamples), score downstream tasks (downstream.evaluator.DownstreamEvaluator),
save (checkpointer.Checkpointer) and stop (signals.StopSignals) — and `Trainer.run` is the loop
that asks them."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain import parallel, plan
from pretrain.checkpointer import Checkpointer, Progress
from pretrain.config import Config, Layout, Precision, to_yaml, total_steps, validate
from pretrain.data import stream
from pretrain.downstream.evaluator import DownstreamEvaluator
from pretrain.engine import build_engine, build_model, resolve_precision, single_stage_names
from pretrain.evaluation import Validator
from pretrain.expert_load import ExpertLoad
from pretrain.metrics import MetricsWriter, StepLog, wandb_settings
from pretrain.model.moe import update_router_biases
from pretrain.samples import TrainingSamples
from pretrain.signals import StopSignals
from pretrain.step import ModelSteps, PipelineSteps
from pretrain.update import loading_checkpoint, update_guard
from pretrain.watchdog import Watchdog


@dataclass
class TrainResult:
    """What a finished run reports back (rank-independent values)."""

    steps: int
    tokens: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> global mean loss, at logged steps
    grad_norms: dict[int, float] = field(default_factory=dict)  # step -> global gradient norm, likewise
    valid_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    downstream: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # step -> task -> metrics
    resumed_from: int = 0  # step of the checkpoint the run started from (0: a fresh start)
    stopped_by_signal: bool = False  # a stop signal ended the run early (after saving a checkpoint)
    skipped_steps: int = 0  # updates skipped for a non-finite loss


def train(config: Config) -> TrainResult:
    """Run training as this process's share of the job (torchrun sets the world; else 1 process).

    The config is validated and the data checked against it before any process group exists.
    A process group that already exists is used and left running (several runs in one launch)."""
    layout = validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    data = stream.resolve(config)
    owns_process_group = not dist.is_initialized()
    context = parallel.initialize(layout.tp, layout.pp, config.parallel.backend.value,
                                  config.parallel.timeout_minutes, layout.cp, layout.ep)
    try:
        return Trainer(config, layout, context, data).run()
    finally:
        parallel.shutdown(destroy_process_group=owns_process_group)


class Trainer:
    def __init__(self, config: Config, layout: Layout, context: parallel.ParallelContext,
                 data: stream.DataInfo | None):
        self.config, self.layout, self.context, self.data = config, layout, context, data
        self.last_step = total_steps(config)
        log_dir = Path(config.log.dir)
        if context.rank == 0:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "config.yaml").write_text(to_yaml(config))
        if data is not None and config.data.verify:
            stream.verify_shards(data, context.rank, context.world_size, tolerate=config.data.skip_corrupt > 0)

        memory = plan.memory_check(config, layout.world_size, context.device)  # refuses a run that cannot fit
        if context.rank == 0:
            print(memory, flush=True)
        torch.manual_seed(config.train.seed)
        self.checkpointer = Checkpointer(config, layout, data.tokenizer_sha256 if data else None)
        resume_from = self.checkpointer.start()
        try:
            self._build(resume_from, log_dir)
        except BaseException:
            self.checkpointer.close()
            raise

    def _build(self, resume_from: Path | None, log_dir: Path) -> None:
        config, layout, context, data = self.config, self.layout, self.context, self.data
        self.model = build_model(config, layout, context)
        if self.checkpointer.from_weights_only:  # before DeepSpeed copies the weights into its optimizer
            self.checkpointer.load_weights(self.model, resume_from, context.tp_rank, single_stage_names(config, layout))
        precision = resolve_precision(config.train.precision, context.device)
        self.engine = build_engine(self.model, config, layout, context, precision, self.last_step)
        self.progress = Progress()
        if resume_from is not None and not self.checkpointer.from_weights_only:
            with loading_checkpoint(self.engine, config.optimizer.zero_stage):
                self.progress = self.checkpointer.resume(self.engine, resume_from)
        self.start_step = self.progress.step
        self.guard = update_guard(self.engine, config.optimizer.zero_stage, precision == Precision.bf16,
                                  config.optimizer.grad_clip, config.train.max_bad_steps, self.model,
                                  context.tp_group)

        self.metrics = MetricsWriter(log_dir, self.last_step, enabled=context.rank == 0,
                                     wandb=wandb_settings(config))
        self.step_log = StepLog(self.metrics, config, layout, context.device, context.replica_group, self.last_step)
        self.expert_load = ExpertLoad(
            self.model, self.metrics, context.replica_group, context.pp_group, config.model.moe.num_experts,
            config.log.moe_idle_intervals, warns=context.dp_rank == 0 and context.tp_rank == 0 and context.cp_rank == 0,
        ) if config.model.moe.num_experts else None
        if layout.pp > 1:
            self.steps = PipelineSteps(self.engine, self.model, context.device, layout.grad_accumulation,
                                       reads_data=context.is_first_stage or context.is_last_stage,
                                       moe=config.model.moe.num_experts > 0, pipeline_group=context.pp_group)
        else:
            self.steps = ModelSteps(self.engine, context.device, layout.grad_accumulation, self.guard,
                                    config.debug.inject_nan_steps)
        self.validator = Validator(config, data, layout, context, self.steps, self.metrics, self.last_step)
        self.samples = TrainingSamples(config, self.model, context, self.metrics) if config.log.sample_interval \
            else None
        self.downstream = DownstreamEvaluator(config, self.model, context, self.metrics, self.last_step) \
            if config.downstream.interval else None
        self.stop_signals = StopSignals()

    def run(self) -> TrainResult:
        self._report_restart()
        self.watchdog = Watchdog(self.config.train.hang_timeout_s, self.context.rank)
        try:
            return self._train_loop()
        finally:
            self.watchdog.stop()
            self.checkpointer.close()

    def _report_restart(self) -> None:
        """Under torchrun, after a worker failed: say which restart this is and from where it resumes."""
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart and self.context.rank == 0:
            limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
            print(f"restart {restart} of at most {limit}: torchrun restarted the workers after one failed; "
                  f"continuing after step {self.start_step}", flush=True)
            self.metrics.write(self.start_step, {"restarts": restart}, group="fault", console=False)

    def _train_loop(self) -> TrainResult:
        progress = self.progress
        raw_state = (progress.rank_state or {}).get("raw_state")
        self.stream = stream.TrainingStream(self.config, self.data, self.layout, self.context,
                                            progress.consumed_samples, raw_state)
        self.batches = self.steps.input(iter(self.stream))
        result = TrainResult(steps=progress.step, tokens=progress.tokens, resumed_from=self.start_step)
        self.metrics.advance(self.start_step)
        for step in range(self.start_step + 1, self.last_step + 1):
            log_step = self.step_log.should_log(step)
            loss, parts, lr = self._step(step, log_step)
            self.watchdog.progress(f"step {step}")
            self.step_log.add(loss, parts)
            self._advance(progress, step)
            if log_step:
                self._log(step, lr, result)
            self.metrics.advance(1)
            if self.validator.should_validate(step):
                result.valid_losses[step] = self.validator.run(step)
                self.watchdog.progress(f"the evaluation at step {step}")
            if self.samples is not None and self.samples.should_sample(step):
                self.samples.sample(step)
                self.watchdog.progress(f"the samples at step {step}")
            if self.downstream is not None and self.downstream.should_evaluate(step):
                result.downstream[step] = self.downstream.evaluate(step)
                self.watchdog.progress(f"the downstream evaluation at step {step}")
            stop = self.stop_signals.agreed()
            if self.checkpointer.should_save(step, self.last_step, stop):
                self.checkpointer.save(self.engine, progress)
                self.watchdog.progress(f"the checkpoint of step {step}")
            if stop:
                self._stopped(step, result)
                break
        result.steps, result.tokens = progress.step, progress.tokens
        if self.downstream is not None:
            self.downstream.report()
        self.metrics.close()
        self.stop_signals.restore()
        return result

    def _step(self, step: int, log_step: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step: this rank's contributions to the loss and its parts besides the
        cross-entropy (pretrain.model.llama.LOSS_PARTS), and the learning rate it used."""
        lr = self.engine.get_lr()[0]
        loss, parts = self.steps.train(self.batches, step, log_step)
        if self.config.model.moe.bias_update_rate > 0:
            update_router_biases(self.model, self.context.replica_group)
        self.guard.step_finished(step, loss)
        return loss, parts, lr

    def _advance(self, progress: Progress, step: int) -> None:
        progress.step = step
        progress.tokens += self.layout.global_batch_size * self.config.model.seq_len
        progress.consumed_samples += self.layout.global_batch_size
        progress.rank_state = {"raw_state": self.stream.raw_state}

    def _log(self, step: int, lr: float, result: TrainResult) -> None:
        grad_norm = self.guard.report(step)
        result.skipped_steps = self.guard.skipped
        values = self.step_log.write(step, lr, grad_norm, {"skipped_steps": result.skipped_steps,
                                                           "consumed_samples": self.progress.consumed_samples})
        result.losses[step], result.grad_norms[step] = values["loss"], grad_norm
        if self.expert_load is not None:
            self.expert_load.write(step)
        self.stream.report_damage(step, self.metrics)

    def _stopped(self, step: int, result: TrainResult) -> None:
        if self.context.rank == 0:
            print(f"stop signal received: stopped after step {step}"
                  + (" with a checkpoint saved" if self.config.checkpoint.dir else " (no checkpoint.dir set)"),
                  flush=True)
        result.stopped_by_signal = True
