"""Log-likelihoods of task requests and the metrics made of them, as lm-evaluation-harness 0.4.13's
`hf` model computes them: trailing whitespace of a context moves to its continuation, the
continuation's tokens are those of encode(context + continuation) after encode(context)'s (an
empty context is the BOS token), the input is the last seq_len tokens before the final one, and a
request's log-likelihood is the sum of the fp32 log-softmax of its continuation's tokens (greedy:
every one is the argmax).

The model runs where the training ranks hold it, through a decoder of pretrain.generate (never
the compiled forward): each data-parallel replica takes every dp-th example, TP peers run each
batch together and pipeline stages in turn; requests are sorted by length and batched up to
`batch_tokens` tokens. The results meet on every rank by one all-reduce."""

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.downstream.tasks import METRICS, Example, Task, TaskError
from pretrain.tokenizer import Tokenizer


@dataclass
class TaskResult:
    """Every example's log-likelihoods and greedy flags per request, and the task's metrics."""

    name: str
    metrics: dict[str, float]
    log_likelihoods: list[list[float]]
    greedy: list[list[bool]]
    seconds: float

    def examples(self, task: Task) -> list[dict]:
        """One record per example: its log-likelihoods, greedy flags, gold index and metrics."""
        return [{"index": example.index, "log_likelihoods": lls, "greedy": greedy, "gold": example.gold,
                 **example_metrics(task.kind, example, lls, greedy)}
                for example, lls, greedy in zip(task.examples, self.log_likelihoods, self.greedy)]


def encode_requests(task: Task, tokenizer: Tokenizer, max_length: int) -> list[list[tuple[list[int], list[int]]]]:
    """Per example, per request: (input ids, continuation ids); the input ends one token before
    the continuation does and holds at most max_length tokens."""
    pairs, sources = [], []
    for example in task.examples:
        for request in example.requests:
            sources.append(example.where)
            context, continuation = request.context, request.continuation
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            pairs.append((context, continuation))
    contexts = sorted({context for context, _ in pairs if context})
    context_ids = dict(zip(contexts, tokenizer.encode(contexts)))
    wholes = tokenizer.encode([context + continuation if context else continuation for context, continuation in pairs])
    bos = tokenizer.card["special_ids"]["bos"]
    encoded = []
    for (context, _), whole, where in zip(pairs, wholes, sources):
        if context:
            prefix = context_ids[context]
            continuation_ids = whole[len(prefix):]
        else:
            prefix, continuation_ids = ([bos], whole) if whole[:1] != [bos] else (whole[:1], whole[1:])
        if not continuation_ids or len(continuation_ids) > max_length:
            raise TaskError(f"{where}: a continuation of task {task.name} has {len(continuation_ids)} tokens: it "
                            f"needs 1 to model.seq_len ({max_length})")
        encoded.append(((prefix + continuation_ids)[-(max_length + 1):][:-1], continuation_ids))
    per_example, start = [], 0
    for example in task.examples:
        per_example.append(encoded[start:start + len(example.requests)])
        start += len(example.requests)
    return per_example


def _batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices longest first, grouped so that a batch's rows x longest row stay within batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def log_likelihoods(decoder, requests: list[tuple[list[int], list[int]]], batch_tokens: int,
                    chunk_positions: int) -> list[tuple[float, bool]] | None:
    """(log-likelihood, greedy) of each request, on the last pipeline stage (None elsewhere); every
    rank of the replica calls it with the same requests. Logits of at most `chunk_positions`
    continuation positions exist at a time."""
    device, results = decoder.device, [None] * len(requests)
    for batch in _batches([len(tokens) for tokens, _ in requests], batch_tokens):
        width = len(requests[batch[0]][0])
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        for row, index in enumerate(batch):  # right padding: causal attention keeps it out of real positions
            tokens[row, :len(requests[index][0])] = torch.tensor(requests[index][0], device=device)
        positions = torch.arange(width, device=device).expand(len(batch), width)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None, None]
        decoder.reset(len(batch), None)
        hidden = decoder.hidden(tokens, positions, causal)
        if hidden is None:
            continue
        rows, columns, targets = [], [], []
        for row, index in enumerate(batch):
            length, continuation = len(requests[index][0]), requests[index][1]
            rows += [row] * len(continuation)
            columns += range(length - len(continuation), length)
            targets += continuation
        selected, targets = hidden[rows, columns], torch.tensor(targets, device=device)
        token_lls, token_greedy = [], []
        for start in range(0, len(targets), chunk_positions):
            logits = decoder.logits(selected[start:start + chunk_positions])
            wanted = targets[start:start + chunk_positions, None]
            token_lls.append(logits.log_softmax(dim=-1).gather(1, wanted).squeeze(1))
            token_greedy.append(logits.argmax(dim=-1) == wanted.squeeze(1))
        counts = [len(requests[index][1]) for index in batch]
        for index, lls, greedy in zip(batch, torch.cat(token_lls).split(counts), torch.cat(token_greedy).split(counts)):
            results[index] = (float(lls.sum()), bool(greedy.all()))
    return None if any(result is None for result in results) else results


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy's


def example_metrics(kind: str, example: Example, lls: list[float], greedy: list[bool]) -> dict[str, float]:
    """One example's metrics (lm-evaluation-harness's process_results)."""
    if kind == "cloze":
        return {"acc": float(greedy[0]), "log_likelihood": lls[0]}
    values = {"acc": float(_argmax(lls) == example.gold)}
    if kind == "multiple_choice":
        values["acc_norm"] = float(_argmax([ll / len(c) for ll, c in zip(lls, example.choices)]) == example.gold)
        values["acc_bytes"] = float(_argmax([ll / len(c.encode()) for ll, c in zip(lls, example.choices)])
                                    == example.gold)
    return values


def task_metrics(task: Task, lls: list[list[float]], greedy: list[list[bool]]) -> dict[str, float]:
    """The means of the examples' metrics; a cloze task's ppl is exp(-mean log-likelihood)."""
    per_example = [example_metrics(task.kind, example, *values)
                   for example, *values in zip(task.examples, lls, greedy)]
    means = {name: sum(values[name] for values in per_example) / len(per_example) for name in per_example[0]}
    if task.kind == "cloze":
        means["ppl"] = math.exp(-means.pop("log_likelihood"))
    return {name: means[name] for name in METRICS[task.kind]}


def score_task(task: Task, requests: list[list[tuple[list[int], list[int]]]], decoder, batch_tokens: int,
               chunk_positions: int, dp_rank: int = 0, dp: int = 1, reports: bool = True,
               device: torch.device | None = None) -> TaskResult:
    """The task's results on every rank: this replica scores every dp-th example from dp_rank, and
    the ranks that `reports` (one per replica, on its last stage) contribute them (collective over
    the world)."""
    started = time.perf_counter()
    mine = list(range(dp_rank, len(task.examples), dp))
    flat = [pair for index in mine for pair in requests[index]]
    scored = log_likelihoods(decoder, flat, batch_tokens, chunk_positions)
    widest = max(len(example.requests) for example in task.examples)
    table = torch.zeros(len(task.examples), widest, 2, dtype=torch.float64, device=device)
    if reports and scored is not None:
        position = 0
        for index in mine:
            count = len(requests[index])
            table[index, :count] = torch.tensor(scored[position:position + count], dtype=torch.float64)
            position += count
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    table = table.cpu()
    lls = [table[i, :len(example.requests), 0].tolist() for i, example in enumerate(task.examples)]
    greedy = [[bool(flag) for flag in table[i, :len(example.requests), 1].tolist()]
              for i, example in enumerate(task.examples)]
    return TaskResult(task.name, task_metrics(task, lls, greedy), lls, greedy, time.perf_counter() - started)


def results_table(rows: list[tuple[int | None, str, TaskResult]]) -> str:
    """A text table of (step, task, result) rows: one line per task and step."""
    names = [name for name in ("acc", "acc_norm", "acc_bytes", "ppl") if any(name in r.metrics for _, _, r in rows)]
    header = f"{'step':>7}  {'task':<24}{'examples':>9}" + "".join(f"{name:>11}" for name in names) + f"{'seconds':>9}"
    lines = [header]
    for step, name, result in rows:
        cells = "".join(f"{result.metrics[m]:>11.4f}" if m in result.metrics else f"{'':>11}" for m in names)
        lines.append(f"{'' if step is None else step:>7}  {name:<24}{len(result.log_likelihoods):>9}{cells}"
                     f"{result.seconds:>9.1f}")
    return "\n".join(lines)
