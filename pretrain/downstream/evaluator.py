"""Downstream evaluation during training: every downstream.interval steps (and at the last step)
the training ranks score downstream.tasks with the current weights (pretrain.downstream.scoring)
and rank 0 writes downstream/<task>/<metric> records (TensorBoard, metrics.jsonl, W&B), with
downstream.log_examples each example's results to <log.dir>/downstream/<task>.jsonl, and a table
of every evaluation at the end. Nothing of the training state changes: the weights are only
read, through the uncompiled decoding path, and no random generator is drawn from."""

import json
from pathlib import Path

from torch import nn

from pretrain import parallel
from pretrain.config import Config, ConfigError
from pretrain.downstream.scoring import TaskResult, encode_requests, results_table, score_task
from pretrain.downstream.tasks import load_task
from pretrain.generate import training_decoder
from pretrain.metrics import MetricsWriter
from pretrain.tokenizer import Tokenizer


class DownstreamEvaluator:
    def __init__(self, config: Config, model: nn.Module, context: parallel.ParallelContext, metrics: MetricsWriter,
                 last_step: int):
        settings = config.downstream
        if not config.data.tokenizer:
            raise ConfigError("downstream.tasks need a tokenizer: set data.tokenizer (shards built before they "
                              "carried their tokenizer do not name one)")
        self.config, self.model, self.context, self.metrics = config, model, context, metrics
        self.interval, self.last_step = settings.interval, last_step
        tokenizer = Tokenizer.load(config.data.tokenizer)
        self.tasks = [load_task(reference, settings.examples, settings.fewshot, settings.seed)
                      for reference in settings.tasks]
        self.requests = [encode_requests(task, tokenizer, config.model.seq_len) for task in self.tasks]
        self.batch_tokens = config.train.micro_batch_size * config.model.seq_len
        self.chunk_positions = max(1, config.execution.loss_chunk_tokens // context.tp)
        self.examples_dir = Path(config.log.dir) / "downstream" if settings.log_examples else None
        self.history: list[tuple[int, str, TaskResult]] = []

    def should_evaluate(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.last_step

    def evaluate(self, step: int) -> dict[str, dict[str, float]]:
        """Score every task with the current weights and write the results (collective)."""
        context = self.context
        decoder = training_decoder(self.model, self.config.model, context.tp_group, context.pp > 1)
        reports = context.is_last_stage and context.tp_rank == 0
        results = {}
        for task, requests in zip(self.tasks, self.requests):
            result = score_task(task, requests, decoder, self.batch_tokens, self.chunk_positions, context.dp_rank,
                                context.dp, reports, context.device)
            self.metrics.write(step, {**result.metrics, "seconds": result.seconds}, group=f"downstream/{task.name}")
            if self.examples_dir is not None and context.rank == 0:
                self.examples_dir.mkdir(parents=True, exist_ok=True)
                with open(self.examples_dir / f"{task.name}.jsonl", "a", encoding="utf-8") as out:
                    out.writelines(json.dumps({"step": step, **record}) + "\n" for record in result.examples(task))
            self.history.append((step, task.name, result))
            results[task.name] = result.metrics
        return results

    def report(self) -> None:
        """Print the table of every evaluation of this run (rank 0)."""
        if self.history and self.context.rank == 0:
            print(f"downstream evaluation:\n{results_table(self.history)}", flush=True)
