"""Samples during training: every log.sample_interval steps the model completes
log.sample_prompts (greedy) as the training ranks hold it — TP peers together, pipeline stages in
turn, one data- and context-parallel replica — and the completions go to samples.jsonl,
TensorBoard and W&B.
Nothing of the training state changes (the weights are only read; sampling has its own generator)."""

from torch import nn

from pretrain import parallel
from pretrain.config import Config, ConfigError
from pretrain.generate import Sampling, generate, training_decoder
from pretrain.metrics import MetricsWriter
from pretrain.tokenizer import Tokenizer


class TrainingSamples:
    def __init__(self, config: Config, model: nn.Module, context: parallel.ParallelContext, metrics: MetricsWriter):
        log = config.log
        if not config.data.tokenizer:
            raise ConfigError("log.sample_interval needs a tokenizer: set data.tokenizer (shards built before "
                              "they carried their tokenizer do not name one)")
        self.config, self.model, self.context, self.metrics = config, model, context, metrics
        self.interval, self.prompts = log.sample_interval, list(log.sample_prompts)
        self.tokenizer = Tokenizer.load(config.data.tokenizer)
        self.prompt_ids = self.tokenizer.encode(self.prompts)
        self.sampling = Sampling(max_new_tokens=log.sample_tokens, seed=config.train.seed)

    def should_sample(self, step: int) -> bool:
        return step % self.interval == 0

    def sample(self, step: int) -> None:
        """Complete the prompts with the current weights and write the completions (collective)."""
        if self.context.dp_rank != 0 or self.context.cp_rank != 0:
            return
        decoder = training_decoder(self.model, self.config.model, self.context.tp_group, self.context.pp > 1)
        ids = generate(decoder, self.prompt_ids, self.sampling, self.tokenizer.eos_id, self.tokenizer.pad_id)
        self.metrics.write_samples(step, self.prompts, [self.tokenizer.decode(row) for row in ids])
