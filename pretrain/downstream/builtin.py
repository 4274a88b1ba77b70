"""Task records made rather than read: `python_next_line`, the true next line of a Python function
among 4: the line and 3 other orders of its words (all with the line's indentation and single
spaces, so that only the order tells them apart: a model that knows Python's syntax prefers the
true one). Made from Python files; by default from the standard library's files that `make demo`
holds out for validation, so that the demo's model is tested on code it did not train on."""

import ast
import glob
import random
from collections.abc import Callable
from pathlib import Path

from pretrain.bench.data import stdlib_sources

HELD_OUT_EVERY = 20  # launch/demo.sh holds out every 20th file of its corpus for validation
CHOICES = 4
MAX_CONTEXT_LINES = 12  # the cut falls within a function's first lines: short prompts
SHUFFLES = 50  # tries at finding the other orders of a line's words


def python_files(path: str | None) -> list[Path]:
    """A .py file, the .py files below a folder or matching a glob; None: the demo's held-out files."""
    if path is None:
        return [Path(file) for file in stdlib_sources()[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]]
    if Path(path).is_dir():
        return sorted(Path(path).rglob("*.py"))
    return [Path(file) for file in sorted(glob.glob(path, recursive=True))]


def _functions(file: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every function in a Python file that parses."""
    source = file.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = [line.rstrip() for line in source.splitlines()]
    return [(node.lineno, lines[node.lineno - 1:node.end_lineno]) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _orders(line: str, rng: random.Random) -> list[str] | None:
    """The line and CHOICES - 1 other orders of its words, shuffled; None when it has too few."""
    indent, words = line[:len(line) - len(line.lstrip())], line.split()
    choices = [indent + " ".join(words)]
    for _ in range(SHUFFLES):
        order = rng.sample(words, len(words))
        if indent + " ".join(order) not in choices:
            choices.append(indent + " ".join(order))
        if len(choices) == CHOICES:
            return rng.sample(choices, CHOICES)
    return None


def next_line_records(path: str | None) -> list[tuple[str, dict]]:
    """(where, {context, choices, gold}) per function with a line of 3 or more words to predict."""
    rng = random.Random(0)  # the task is the same in every run
    records = []
    for file in python_files(path):
        for start, lines in _functions(file):
            cuts = [k for k in range(1, min(len(lines), MAX_CONTEXT_LINES + 1)) if len(lines[k].split()) >= 3]
            if not cuts:
                continue
            cut = rng.choice(cuts)
            choices = _orders(lines[cut], rng)
            if choices is not None:
                truth = lines[cut][:len(lines[cut]) - len(lines[cut].lstrip())] + " ".join(lines[cut].split())
                records.append((f"{file} line {start}", {"context": "\n".join(lines[:cut]) + "\n",
                                                         "choices": choices, "gold": choices.index(truth)}))
    return records


GENERATORS: dict[str, Callable[[str | None], list[tuple[str, dict]]]] = {"python_next_line": next_line_records}
