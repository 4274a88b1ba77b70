"""The IsoFLOP grid (Hoffmann et al. 2022, approach 2): per compute budget C, K Llama-shaped
models spanning a range of N, each trained on D = C / (6 N) tokens with its schedule scaled
to its own length.

Shape rule: the width is the ladder, in steps of the head dimension (hidden_size = k x
head_dim, k = 1, 2, ...); the depth follows from an aspect ratio, num_layers =
max(1, round(hidden_size / aspect)); num_heads = hidden_size / head_dim; num_kv_heads keeps
the base config's group of query heads per key/value head where it divides num_heads (else
every head has its own); ffn_hidden_size = the base's ffn/hidden ratio x hidden_size, rounded
up to a multiple of head_dim. head_dim and aspect default to the base config's. Each target N
takes the ladder's shape nearest to it on a log scale.

N counts all parameters (embedding and output head included, Hoffmann et al.) or, with
count=non-embedding, the parameters without the token embedding and the output head
(Kaplan et al. 2020); C = 6 N D uses the same N."""

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pretrain.config import Config, ConfigError, DataSource, load, to_yaml, total_steps, validate
from pretrain.model.args import LlamaArgs
from pretrain.scaling import ScalingError
from pretrain.scaling.sweep import Sweep

COUNTS = ("all", "non-embedding")
MIN_STEPS = 10  # fewer optimizer steps than this make a point's loss meaningless


def count_params(model: LlamaArgs, count: str) -> int:
    """N of a model: all parameters, or without the token embedding and output head."""
    total = model.num_params()
    if count == "all":
        return total
    return total - model.vocab_size * model.hidden_size * (1 if model.tie_embeddings else 2)


@dataclass(frozen=True)
class ShapeRule:
    head_dim: int
    aspect: float  # hidden_size per layer
    ffn_ratio: float  # ffn_hidden_size / hidden_size
    kv_group: int  # query heads per key/value head

    @classmethod
    def from_base(cls, base: LlamaArgs, head_dim: int | None = None, aspect: float | None = None) -> "ShapeRule":
        if (head_dim is not None and head_dim < 2) or (aspect is not None and aspect <= 0):
            raise ScalingError("--head-dim must be at least 2 and --aspect positive")
        return cls(head_dim=head_dim or base.head_dim, aspect=aspect or base.hidden_size / base.num_layers,
                   ffn_ratio=base.ffn_hidden_size / base.hidden_size,
                   kv_group=max(1, base.num_heads // base.num_kv_heads))

    def shape(self, width: int, base: LlamaArgs) -> LlamaArgs:
        """The model of ladder step `width` (hidden_size = width x head_dim), otherwise as `base`."""
        hidden = width * self.head_dim
        heads = width
        ffn = -(-round(self.ffn_ratio * hidden) // self.head_dim) * self.head_dim
        model = copy.deepcopy(base)
        model.hidden_size, model.num_heads, model.ffn_hidden_size = hidden, heads, ffn
        model.num_layers = max(1, int(hidden / self.aspect + 0.5))
        model.num_kv_heads = heads // self.kv_group if heads % self.kv_group == 0 else heads
        return model


def nearest_shape(target: float, rule: ShapeRule, base: LlamaArgs, count: str) -> LlamaArgs:
    """The ladder's model whose N is nearest to `target` on a log scale."""
    previous, width = None, 1
    while True:
        model = rule.shape(width, base)
        n = count_params(model, count)
        if n >= target:
            if previous is None or math.log(n / target) <= math.log(target / count_params(previous, count)):
                return model
            return previous
        previous, width = model, width + 1


def params_range(compute: float, spread: float, tokens_per_param: float) -> tuple[float, float]:
    """N from N_c / spread to N_c x spread around N_c = sqrt(C / (6 x tokens_per_param)), the
    size that trains on tokens_per_param tokens per parameter (Hoffmann et al.: about 20)."""
    center = math.sqrt(compute / (6 * tokens_per_param))
    return center / spread, center * spread


def base_config(path: str, overrides: list[str]) -> Config:
    """The base config with its data checked: vocab_size from the data's tokenizer when 0,
    data paths made absolute (point configs run from anywhere)."""
    config = load(path, overrides)
    if config.data.source != DataSource.synthetic:
        from pretrain.data import stream

        stream.resolve(config)
    if config.model.vocab_size < 1:
        raise ScalingError("the base config needs model.vocab_size (or data whose tokenizer gives it): "
                           "parameter counts depend on it")
    return config


def plan(base_path: str, overrides: list[str], budgets: list[float], points: int, out: str,
         count: str = "all", params: tuple[float, float] | None = None, spread: float = 3.0,
         tokens_per_param: float = 20.0, head_dim: int | None = None, aspect: float | None = None,
         warmup_fraction: float | None = None) -> Sweep:
    """Write one config per (budget, model) point under `out`/points and the manifest."""
    if points < 2 or not budgets or any(c <= 0 for c in budgets):
        raise ScalingError("give at least one positive --compute budget (FLOPs, e.g. 1e15) and --points >= 2")
    if params is not None and not 0 < params[0] < params[1]:
        raise ScalingError(f"--params {params[0]:g} {params[1]:g}: give MIN < MAX, both positive")
    if warmup_fraction is not None and not 0 <= warmup_fraction <= 1:
        raise ScalingError(f"--warmup-fraction {warmup_fraction:g} must lie in [0, 1]")
    if spread <= 1:
        raise ScalingError(f"--spread {spread:g} must exceed 1 (N spans N_c / spread .. N_c x spread)")
    root = Path(out).resolve()
    if Sweep.exists(root):
        raise ScalingError(f"{root} already holds a sweep: choose another --out or remove it")
    base = base_config(base_path, overrides)
    rule = ShapeRule.from_base(base.model, head_dim, aspect)
    if warmup_fraction is None:
        warmup_fraction = min(1.0, base.schedule.warmup_steps / total_steps(base))
    tokens_per_step = base.train.global_batch_size * base.model.seq_len
    entries = []
    for compute in sorted(budgets):
        low, high = params or params_range(compute, spread, tokens_per_param)
        models = {}
        for target in np.geomspace(low, high, points):
            model = nearest_shape(target, rule, base.model, count)
            models[model.hidden_size] = model
        if len(models) < points:
            raise ScalingError(
                f"budget {compute:.3g}: {points} sizes between {low:.3g} and {high:.3g} parameters give only "
                f"{len(models)} distinct shapes (widths step by head_dim {rule.head_dim}): widen --params or "
                "--spread, lower --points or --head-dim")
        for model in models.values():
            entries.append(_point(base, model, compute, count, len(entries), tokens_per_step, warmup_fraction,
                                  root))
    sweep = Sweep.create(root, {"base_config": str(Path(base_path).resolve()), "overrides": list(overrides),
                                "count": count, "shape_rule": asdict(rule), "budgets": sorted(budgets),
                                "tokens_per_step": tokens_per_step, "points": [p for p, _ in entries]})
    for point, config in entries:
        sweep.config_path(point).parent.mkdir(parents=True, exist_ok=True)
        sweep.config_path(point).write_text(to_yaml(config))
    return sweep


def _point(base: Config, model: LlamaArgs, compute: float, count: str, index: int, tokens_per_step: int,
           warmup_fraction: float, root: Path) -> tuple[dict, Config]:
    n = count_params(model, count)
    tokens = compute / (6 * n)
    steps = math.ceil(tokens / tokens_per_step)
    name = f"{index:03d}_C{compute:.3g}_N{n}"
    if steps < MIN_STEPS:
        raise ScalingError(f"point {name}: {tokens:.3g} tokens are only {steps} steps of train.global_batch_size x "
                           f"model.seq_len = {tokens_per_step} tokens (at least {MIN_STEPS}): raise the budget "
                           "or lower train.global_batch_size")
    config = copy.deepcopy(base)
    config.model = model
    config.train.max_tokens, config.train.max_steps = round(tokens), steps
    config.schedule.warmup_steps = round(warmup_fraction * steps)
    if config.data.valid_path and not config.train.eval_interval:
        config.train.eval_interval = steps  # one validation pass, at the end: the point's loss
    folder = root / "points" / name
    config.log.dir, config.checkpoint.dir = str(folder / "log"), str(folder / "checkpoints")
    try:
        validate(config, config.parallel.tp * config.parallel.pp)
    except ConfigError as error:
        raise ScalingError(f"point {name} ({model.hidden_size} wide, {model.num_layers} layers): {error}") from None
    shape = {k: getattr(model, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size")}
    return {"index": index, "name": name, "compute": compute, "params": n,
            "params_all": count_params(model, "all"), "params_non_embedding": count_params(model, "non-embedding"),
            "tokens": steps * tokens_per_step, "steps": steps, "warmup_steps": config.schedule.warmup_steps,
            "shape": shape}, config
