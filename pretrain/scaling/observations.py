"""The (N, D, loss) points a fit reads: a finished sweep's results, or a CSV table."""

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.scaling import ScalingError
from pretrain.scaling.sweep import Sweep

BUDGET_TOLERANCE = 1.1  # table rows whose 6 N D lie within this factor form one compute budget


@dataclass
class Observations:
    params: np.ndarray  # N
    tokens: np.ndarray  # D
    loss: np.ndarray
    compute: np.ndarray  # the compute budget (FLOPs) each point belongs to
    source: str
    count: str  # which parameters N counts, as far as known

    def __len__(self) -> int:
        return len(self.loss)


def from_sweep(sweep: Sweep, count: str | None = None) -> Observations:
    """Every point's result; all must have finished."""
    unfinished = sweep.unfinished()
    if unfinished:
        names = ", ".join(p["name"] for p in unfinished[:10]) + (", ..." if len(unfinished) > 10 else "")
        raise ScalingError(f"{len(unfinished)} of {len(sweep.points)} points of {sweep.root} have not finished "
                           f"(no result.json): {names}; run `pretrain scaling launch {sweep.root} --local` "
                           "(or --slurm) first: finished points are skipped")
    count = count or sweep.data["count"]
    key = "params_" + count.replace("-", "_")
    results = [sweep.result(p) for p in sweep.points]
    return Observations(params=np.array([r[key] for r in results], float),
                        tokens=np.array([r["tokens"] for r in results], float),
                        loss=np.array([r["loss"] for r in results], float),
                        compute=np.array([r["compute"] for r in results], float),
                        source=str(sweep.root), count=count)


def read_table(path: str | Path, columns: str = "params,tokens,loss") -> Observations:
    """A CSV file with a header row; `columns` names its N, D and loss columns and, optionally
    fourth, a column with each row's compute budget (else rows within 10% of each other's
    6 N D form one budget)."""
    path = Path(path)
    names = [c.strip() for c in columns.split(",")]
    if len(names) not in (3, 4) or not all(names):
        raise ScalingError(f"--columns {columns!r}: give the N, D and loss column names (and optionally the "
                           "compute budget's), comma-separated, e.g. --columns params,tokens,loss")
    if not path.is_file():
        raise ScalingError(f"--table {path} does not exist: give a CSV file with a header row")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0]) if rows else []
    missing = [n for n in names if n not in header]
    if missing:
        raise ScalingError(f"{path} has no column {', '.join(map(repr, missing))} (its columns: "
                           f"{', '.join(header) or 'none'}): name its N, D and loss columns with --columns, e.g. "
                           f"--columns {','.join(header[:3]) or 'params,tokens,loss'}")
    values = np.empty((len(rows), len(names)))
    for line, row in enumerate(rows, start=2):
        for column, name in enumerate(names):
            try:
                values[line - 2, column] = float(row[name])
            except (TypeError, ValueError):
                raise ScalingError(f"{path} line {line}: column {name!r} holds {row[name]!r}, not a number") from None
            if not math.isfinite(values[line - 2, column]) or values[line - 2, column] <= 0:
                raise ScalingError(f"{path} line {line}: column {name!r} must be a positive number, not {row[name]!r}")
    params, tokens, loss = values[:, 0], values[:, 1], values[:, 2]
    compute = values[:, 3] if len(names) == 4 else group_budgets(6 * params * tokens)
    return Observations(params, tokens, loss, compute, source=str(path), count=f"column {names[0]!r}")


def group_budgets(compute: np.ndarray) -> np.ndarray:
    """Each value replaced by its budget: runs of sorted values within BUDGET_TOLERANCE of the
    run's first value, labelled with their geometric mean."""
    order = np.argsort(compute)
    budgets = np.empty_like(compute)
    group = [order[0]] if len(order) else []
    for index in list(order[1:]) + [None]:
        if index is not None and compute[index] <= BUDGET_TOLERANCE * compute[group[0]]:
            group.append(index)
            continue
        budgets[group] = np.exp(np.log(compute[group]).mean())
        group = [index]
    return budgets
