"""Downstream tasks: a small YAML spec names the fields of local JSON-lines or parquet records,
and each record becomes an example of (context, continuation) requests as lm-evaluation-harness
0.4.13 builds them, with its metrics.

- multiple_choice: one request per choice, (context, target_delimiter + choice); acc is the
  choice of highest log-likelihood, acc_norm divides it by the choice's length in characters,
  acc_bytes by its UTF-8 bytes. With `scoring: partial` (Winogrande) the choices are contexts,
  each scored on the same `continuation` (acc only: the normalisations would compare contexts).
- cloze (LAMBADA): one request (context, continuation); acc is 1 when the greedy tokens are the
  continuation's, ppl = exp(-mean log-likelihood) over the examples.

Few-shot prefixes are `fewshot` solved examples drawn from the pool (`fewshot_path`, or the task's
other examples) by a generator seeded with the seed and the example's index, so an example's
prompt is the same in every run and on every rank whatever the sharding. A prefix is each
example's context + target_delimiter + answer + fewshot_delimiter, as lm-evaluation-harness
writes them (its own draws come from one generator in document order and differ)."""

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pretrain.errors import UserError

KINDS = ("multiple_choice", "cloze")
METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_bytes"), "partial": ("acc",), "cloze": ("acc", "ppl")}
SPEC_KEYS = {"name", "kind", "path", "context", "choices", "gold", "labels", "continuation", "scoring", "clean",
             "target_delimiter", "fewshot_delimiter", "fewshot", "fewshot_path", "generate"}
_FILTERS: dict[str, Callable[[str], str]] = {
    "capitalize": str.capitalize,
    "strip": str.strip,
    "but_last_word": lambda text: " ".join(text.split(" ")[:-1]),
    "last_word": lambda text: text.split(" ")[-1],
    "before_blank": lambda text: text[:text.index("_")] if "_" in text else text,
    "after_blank": lambda text: text[text.index("_") + 1:] if "_" in text else "",
}
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class TaskError(UserError, ValueError):
    """A task spec or task file that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Example:
    index: int
    where: str  # its file and line
    requests: tuple[Request, ...]  # one per choice (multiple choice) or one (cloze)
    choices: tuple[str, ...]  # the texts acc_norm and acc_bytes divide by (multiple choice)
    gold: int  # index of the right request (0 for cloze)


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice, partial or cloze: what METRICS it reports
    examples: list[Example]


@dataclass(frozen=True)
class Spec:
    """A task spec (YAML), checked when read; `where` names it in messages."""

    where: str
    name: str
    kind: str
    path: str | None = None
    context: str = ""  # a template (unused with scoring: partial)
    choices: Any = None  # a field holding a list, or a list of templates
    gold: str | None = None  # a field: the index of the right choice, or with labels its label
    labels: Any = None  # a field holding a list, or a literal list
    continuation: str | None = None
    scoring: str = "full"
    clean: list = field(default_factory=list)  # [regex, replacement] pairs for contexts and choices
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot: int = 0
    fewshot_path: str | None = None
    generate: str | None = None  # records made by a built-in generator (pretrain.downstream.builtin)


def ready_specs() -> dict[str, Path]:
    """The specs shipped in pretrain/downstream/specs, by name."""
    folder = resources.files("pretrain.downstream") / "specs"
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def read_spec(reference: str) -> Spec:
    """`NAME_OR_FILE[=DATA]`: a ready spec by name or a YAML spec file; DATA replaces its `path`."""
    name, _, data = reference.partition("=")
    ready = ready_specs()
    file = ready.get(name) or Path(name)
    if not file.is_file():
        raise TaskError(f"task {name!r} is neither a ready spec ({', '.join(sorted(ready))}) nor a YAML file")
    where = str(file)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TaskError(f"{where}: not a readable YAML task spec ({error})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: a task spec is a mapping of settings (kind, path, context, ...)")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise TaskError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}; a spec takes "
                        f"{', '.join(sorted(SPEC_KEYS))}")
    for key in ("path", "fewshot_path"):  # relative to the spec
        if isinstance(raw.get(key), str) and name not in ready:
            raw[key] = str(file.parent / raw[key])
    if data:
        raw["path"] = data
    raw.setdefault("name", file.stem)
    spec = Spec(where=where, **raw)
    _check_spec(spec, name in ready)
    return spec


def _check_spec(spec: Spec, ready: bool) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TaskError(f"{spec.where}: {message}")

    need(spec.kind in KINDS, f"kind {spec.kind!r} must be one of {', '.join(KINDS)}")
    for key in ("context", "gold", "continuation", "target_delimiter", "fewshot_delimiter"):
        value = getattr(spec, key)
        need(value is None or isinstance(value, str), f"{key} must be text (quote it), not {value!r}")
    for key in ("choices", "labels"):
        value = getattr(spec, key)
        need(value is None or isinstance(value, (str, list)), f"{key} must be a field name or a list, not {value!r}")
    need(bool(spec.path) or spec.generate is not None,
         f"no data: give the task's file as {spec.name}=FILE" if ready else "path: the task's JSON-lines or parquet "
         "file (relative to the spec), or give it as SPEC=FILE")
    need(spec.scoring in ("full", "partial"), f"scoring {spec.scoring!r} must be full or partial")
    if spec.kind == "multiple_choice":
        need(spec.choices is not None, "choices: a field holding the list of choices, or a list of templates")
        need(spec.gold is not None, "gold: the field holding the right choice's index (or, with labels, its label)")
        need(spec.scoring == "full" or spec.continuation is not None,
             "scoring: partial needs continuation, the text every choice is scored on")
    else:
        need(spec.continuation is not None, "a cloze task needs continuation, the template of the text to predict")
    need(isinstance(spec.fewshot, int) and spec.fewshot >= 0, f"fewshot {spec.fewshot!r} must be a number >= 0")
    need(isinstance(spec.clean, list) and all(isinstance(p, list) and len(p) == 2 for p in spec.clean),
         "clean must be a list of [regex, replacement] pairs")
    for pattern, _ in spec.clean:
        try:
            re.compile(pattern)
        except re.error as error:
            need(False, f"clean: {pattern!r} is not a regular expression ({error})")


def read_records(path: str) -> list[tuple[str, dict]]:
    """(where, record) of every record of a JSON-lines (.jsonl, .json) or parquet file."""
    file = Path(path)
    if not file.is_file():
        raise TaskError(f"task file {path} does not exist")
    if file.suffix == ".parquet":
        import pyarrow.parquet as parquet

        try:
            rows = parquet.read_table(file).to_pylist()
        except Exception as error:
            raise TaskError(f"{path}: not a readable parquet file ({error})") from None
        return [(f"{path} row {number}", row) for number, row in enumerate(rows, 1)]
    if file.suffix not in (".jsonl", ".json"):
        raise TaskError(f"{path}: task files are JSON lines (.jsonl, .json) or parquet (.parquet)")
    records = []
    with open(file, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise TaskError(f"{path} line {number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict):
                raise TaskError(f"{path} line {number}: not a JSON object")
            records.append((f"{path} line {number}", record))
    return records


def _lookup(record: dict, name: str, where: str, setting: str) -> Any:
    """The value of dotted field `name` (e.g. choices.text) of a record."""
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TaskError(f"{where}: no field '{name}' (the spec's {setting})")
        value = value[part]
    return value


def _render(template: str, record: dict, where: str, setting: str) -> str:
    """`{field}`, `{a.b}` and `{field|filter|...}` replaced by the record's text ({{ and }}: braces)."""
    def replace(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)[0]
        name, *filters = match.group(1).split("|")
        value = _lookup(record, name.strip(), where, setting)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TaskError(f"{where}: field '{name}' (the spec's {setting}) holds {type(value).__name__}, not text")
        text = str(value)
        for name in map(str.strip, filters):
            if name not in _FILTERS:
                raise TaskError(f"{where}: unknown filter '{name}' in the spec's {setting}: use "
                                f"{', '.join(_FILTERS)}")
            text = _FILTERS[name](text)
        return text

    return _PLACEHOLDER.sub(replace, template)


@dataclass(frozen=True)
class _Solved:
    """A record as prompt parts: contexts (one, or one per choice when partial), the choices, the
    continuation (cloze and partial) and the gold index."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    continuation: str
    gold: int


def _solve(spec: Spec, record: dict, where: str) -> _Solved:
    def clean(text: str) -> str:
        for pattern, replacement in spec.clean:
            text = re.sub(pattern, replacement, text)
        return text

    context = clean(_render(spec.context, record, where, "context"))
    continuation = _render(spec.continuation, record, where, "continuation") if spec.continuation is not None else ""
    if spec.kind == "cloze":
        if not continuation:
            raise TaskError(f"{where}: the continuation (the spec's continuation) is empty")
        return _Solved((context,), (), continuation, 0)
    if isinstance(spec.choices, list):
        choices = [_render(template, record, where, "choices") for template in spec.choices]
    else:
        choices = _lookup(record, spec.choices, where, "choices")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{where}: field '{spec.choices}' (the spec's choices) must be a list of texts")
    choices = [clean(choice) for choice in choices]
    if len(choices) < 2 or any(not choice for choice in choices):
        named = f"field '{spec.choices}' (the spec's choices)" if isinstance(spec.choices, str) else "the choices"
        raise TaskError(f"{where}: {named} must be two or more non-empty texts")
    gold = _gold(spec, record, where, len(choices))
    if spec.scoring == "partial":
        return _Solved(tuple(choices), tuple(choices), continuation, gold)
    return _Solved((context,), tuple(choices), "", gold)


def _gold(spec: Spec, record: dict, where: str, count: int) -> int:
    value = _lookup(record, spec.gold, where, "gold")
    if spec.labels is not None:
        labels = spec.labels if isinstance(spec.labels, list) else _lookup(record, spec.labels, where, "labels")
        if not isinstance(labels, list) or value not in labels:
            raise TaskError(f"{where}: field '{spec.gold}' (the spec's gold) is {value!r}, not one of the labels "
                            f"{labels!r}")
        value = labels.index(value)
    elif isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < count:
        raise TaskError(f"{where}: field '{spec.gold}' (the spec's gold) is {value!r}: it must be the index of the "
                        f"right choice, 0 to {count - 1}")
    return value


def _example(spec: Spec, index: int, where: str, solved: _Solved, shots: list[_Solved]) -> Example:
    """The requests of `solved`, each context behind the few-shot prefix of `shots`."""
    prefix = "".join(_answered(spec, shot) + spec.fewshot_delimiter for shot in shots)
    if spec.kind == "cloze":
        requests = (Request(prefix + solved.contexts[0], solved.continuation),)
    elif spec.scoring == "partial":
        requests = tuple(Request(prefix + context, spec.target_delimiter + solved.continuation)
                         for context in solved.contexts)
    else:
        requests = tuple(Request(prefix + solved.contexts[0], spec.target_delimiter + choice)
                         for choice in solved.choices)
    return Example(index, where, requests, solved.choices, solved.gold)


def _answered(spec: Spec, solved: _Solved) -> str:
    """A solved example as a few-shot prefix shows it."""
    if spec.kind == "cloze":
        return solved.contexts[0] + spec.target_delimiter + solved.continuation
    if spec.scoring == "partial":
        return solved.contexts[solved.gold] + spec.target_delimiter + solved.continuation
    return solved.contexts[0] + spec.target_delimiter + solved.choices[solved.gold]


def load_task(reference: str, examples: int = 0, fewshot: int | None = None, seed: int = 1234) -> Task:
    """The first `examples` examples (0: all) of the task `reference` names (see read_spec), with
    `fewshot` solved examples before each (None: the spec's own number), drawn with `seed`."""
    from pretrain.downstream.builtin import GENERATORS

    spec = read_spec(reference)
    if spec.generate is not None:
        if spec.generate not in GENERATORS:
            raise TaskError(f"{spec.where}: generate {spec.generate!r} is not one of {', '.join(GENERATORS)}")
        records = GENERATORS[spec.generate](spec.path)
    else:
        records = read_records(spec.path)
    if not records:
        raise TaskError(f"{spec.path}: holds no examples")
    solved = [_solve(spec, record, where) for where, record in records]
    shots = spec.fewshot if fewshot is None else fewshot
    pool = solved if spec.fewshot_path is None else [
        _solve(spec, record, where) for where, record in read_records(spec.fewshot_path)]
    own_pool = spec.fewshot_path is None
    if shots > len(pool) - own_pool:
        raise TaskError(f"{spec.where}: {shots} few-shot examples asked for, but the pool holds "
                        f"{len(pool) - own_pool}")
    chosen = solved[:examples] if examples else solved
    task_examples = []
    for index, (item, (where, _)) in enumerate(zip(chosen, records)):
        drawn = random.Random(f"{seed}/{index}").sample(range(len(pool)), shots + own_pool) if shots else []
        drawn = [k for k in drawn if not (own_pool and k == index)][:shots]
        task_examples.append(_example(spec, index, where, item, [pool[k] for k in drawn]))
    kind = "partial" if spec.kind == "multiple_choice" and spec.scoring == "partial" else spec.kind
    return Task(spec.name, kind, task_examples)
