"""Task records made rather than read: `python_next_line`, the true next line of a Python function
among 4 (the 3 others drawn from other functions), from Python files; by default from the
standard library's files that `make demo` holds out for validation, so that the demo's model is
tested on code it did not train on."""

import ast
import glob
import random
from collections.abc import Callable
from pathlib import Path

from pretrain.bench.data import stdlib_sources

HELD_OUT_EVERY = 20  # launch/demo.sh holds out every 20th file of its corpus for validation
CHOICES = 4
MAX_CONTEXT_LINES = 12  # the cut falls within a function's first lines: short prompts


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


def next_line_records(path: str | None) -> list[tuple[str, dict]]:
    """(where, {context, choices, gold}) per function with a non-blank line to predict."""
    functions = [(f"{file} line {start}", lines) for file in python_files(path) for start, lines in _functions(file)]
    pool = sorted({line for _, lines in functions for line in lines[1:] if line.strip()})
    rng = random.Random(0)  # the task is the same in every run
    records = []
    for where, lines in functions:
        cuts = [k for k in range(1, min(len(lines), MAX_CONTEXT_LINES + 1)) if lines[k].strip()]
        if not cuts or len(pool) <= CHOICES:
            continue
        cut = rng.choice(cuts)
        choices = [lines[cut]]
        while len(choices) < CHOICES:
            line = rng.choice(pool)
            if line.strip() not in {choice.strip() for choice in choices}:
                choices.append(line)
        rng.shuffle(choices)
        records.append((where, {"context": "\n".join(lines[:cut]) + "\n", "choices": choices,
                                "gold": choices.index(lines[cut])}))
    return records


GENERATORS: dict[str, Callable[[str | None], list[tuple[str, dict]]]] = {"python_next_line": next_line_records}
