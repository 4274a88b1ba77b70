"""Reading documents from input files: jsonl (one JSON object per line), parquet (a text
column) or any other file as one plain-text document. Invalid UTF-8 is replaced and counted;
empty documents are skipped and counted."""

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class InputError(ValueError):
    """An input file is missing or unreadable; the message names it."""


@dataclass
class DocumentStats:
    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    characters: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


def check_inputs(paths: list[str | Path]) -> list[Path]:
    """Every input exists and is a file: checked before any work starts."""
    if not paths:
        raise InputError("no input files given")
    resolved = [Path(p) for p in paths]
    missing = [str(p) for p in resolved if not p.is_file()]
    if missing:
        raise InputError(f"input file(s) not found: {', '.join(missing)}")
    return resolved


def _decode(raw: bytes, stats: DocumentStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_replaced += 1
        return raw.decode("utf-8", errors="replace")


def _without_lone_surrogates(text: str, stats: DocumentStats) -> str:
    """JSON escapes can hold half a surrogate pair (text cut inside an emoji): not text, so
    replaced and counted like invalid UTF-8; tokenizers cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        stats.invalid_utf8_replaced += 1
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", errors="replace")
    return text


def _texts(path: Path, text_field: str, stats: DocumentStats) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(_decode(raw, stats))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not a JSON object ({error.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise InputError(f"{path}:{number}: no field '{text_field}' (choose it with --text-field)")
                yield _without_lone_surrogates(str(record[text_field]), stats)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = parquet.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            raise InputError(f"{path}: no column '{text_field}' (choose it with --text-field)")
        for batch in table.iter_batches(columns=[text_field]):
            yield from (text or "" for text in batch.column(0).to_pylist())
    else:
        yield _decode(path.read_bytes(), stats)


def iter_documents(paths: list[Path], text_field: str = "text",
                   stats: DocumentStats | None = None) -> Iterator[str]:
    """Non-empty documents of all inputs, in order."""
    stats = stats if stats is not None else DocumentStats()
    for path in paths:
        count = 0
        for text in _texts(path, text_field, stats):
            if not text.strip():
                stats.empty_skipped += 1
                continue
            count += 1
            stats.documents += 1
            stats.characters += len(text)
            yield text
        stats.per_file[str(path)] = count
