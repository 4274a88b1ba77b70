"""Reading documents from input files, folders and globs.

Formats, by name: JSON lines (`.jsonl`, gzip-compressed `.jsonl.gz`/`.json.gz` as Dolma ships
them, zstd-compressed `.jsonl.zst` as the Pile and RedPajama do; one object per line, the text
in a field), `.parquet` (a text column, as FineWeb), a Hugging Face `datasets` folder made by
`save_to_disk` (read through its `.arrow` files; needs `pip install datasets`), and any other file
as one plain-text document. A folder stands for the files of known formats below it (sorted),
a glob for its matches. Plain text must be text: compressed data, archives or NUL bytes under a
text name are refused with the file named. Invalid UTF-8 is replaced and counted; empty
documents and null texts are skipped and counted; a text that is not a string is refused."""

import glob
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.errors import UserError

JSON_LINES = (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst")
FOLDER_SUFFIXES = (*JSON_LINES, ".parquet", ".txt")  # what a folder contributes (and .tar for raw text shards)
TEXT_TAR = ".tar"  # data.source=raw: a tar of <key>.txt documents
HF_STATE, HF_SPLITS = "state.json", "dataset_dict.json"
# Leading bytes of data that is not text, and what to do about a file that starts with them.
BINARY_MAGIC = {
    b"\x1f\x8b": ("gzip-compressed data", "name it .jsonl.gz or .json.gz if it holds JSON lines, or decompress it"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed data", "name it .jsonl.zst if it holds JSON lines, or decompress it"),
    b"PK\x03\x04": ("a zip archive", "unpack it and pass the files or their folder"),
    b"BZh": ("bzip2-compressed data", "decompress it (bunzip2)"),
    b"\xfd7zXZ\x00": ("xz-compressed data", "decompress it (unxz)"),
    b"PAR1": ("a parquet file", "name it .parquet"),
}


class InputError(UserError, ValueError):
    """An input file is missing or unreadable; the message names it."""


@dataclass
class DocumentStats:
    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0
    characters: int = 0
    bytes_read: int = 0  # of the input files (compressed sizes), for progress
    per_file: dict[str, int] = field(default_factory=dict)


def suffix_of(path: Path) -> str:
    """The format-naming suffix: `.jsonl.gz` for `a.jsonl.gz`, `.txt` for `a.txt`."""
    name = path.name.lower()
    return next((s for s in (*JSON_LINES, ".parquet", ".arrow", TEXT_TAR) if name.endswith(s)), path.suffix.lower())


def resolve_inputs(specs: list[str | Path], text_tars: bool = False) -> list[Path]:
    """Files, folders and globs -> the input files, checked before any work starts. Given files
    keep their order; a folder or glob adds its files sorted. `text_tars`: folders also give
    their .tar files (raw text shards)."""
    if not specs:
        raise InputError("no input files given")
    suffixes = (*FOLDER_SUFFIXES, TEXT_TAR) if text_tars else FOLDER_SUFFIXES
    files, missing = [], []
    for spec in map(str, specs):
        matches = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
        if not matches or not all(Path(m).exists() for m in matches):
            missing.append(spec)
            continue
        for match in map(Path, matches):
            files.extend(_folder_files(match, suffixes) if match.is_dir() else [match])
    if missing:
        raise InputError(f"input file(s) not found: {', '.join(missing)}")
    return files


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if (folder / HF_SPLITS).is_file():
        splits = json.loads((folder / HF_SPLITS).read_text()).get("splits", [])
        raise InputError(f"{folder} is a Hugging Face DatasetDict with splits {', '.join(splits)}: pass one split's "
                         f"folder, e.g. {folder / (splits[0] if splits else 'train')}")
    if (folder / HF_STATE).is_file():
        state = json.loads((folder / HF_STATE).read_text())
        return [folder / entry["filename"] for entry in state["_data_files"]]
    datasets = sorted(p.parent for p in folder.rglob(HF_STATE))
    found = sorted(p for p in folder.rglob("*") if p.is_file() and suffix_of(p) in suffixes
                   and not any(d in p.parents for d in datasets))
    found += [f for d in datasets for f in _folder_files(d, suffixes)]
    if not found:
        raise InputError(f"folder {folder} holds no input files ({', '.join(suffixes)} or a datasets folder)")
    return sorted(found)


def describe(paths: list[Path], most: int = 3) -> str:
    """Input files for a message: the first few and how many more."""
    shown = ", ".join(map(str, paths[:most]))
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def input_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


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


def _refuse_binary(path: Path, head: bytes, what: str) -> None:
    for magic, (kind, remedy) in BINARY_MAGIC.items():
        if head.startswith(magic):
            raise InputError(f"{path} is {kind}, not {what}: {remedy}")
    if b"\0" in head:
        raise InputError(f"{path} holds NUL bytes: it is binary, not {what}; pass text, JSON lines, parquet "
                         "or a datasets folder")


def _open_json_lines(path: Path, suffix: str):
    """(line reader, the raw file whose position tells the compressed bytes consumed, the errors
    that mean the compressed data is damaged)."""
    raw = open(path, "rb")
    if suffix in (".jsonl.gz", ".json.gz"):
        return gzip.GzipFile(fileobj=raw), raw, (OSError, EOFError)
    if suffix == ".jsonl.zst":
        import zstandard

        lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        return lines, raw, (OSError, zstandard.ZstdError)
    _refuse_binary(path, raw.read(4096), "JSON lines")
    raw.seek(0)
    return raw, raw, OSError


def _text_value(value: object, path: Path, line: int, text_field: str) -> str:
    """A JSON text field: null is an empty document (skipped and counted); other non-strings are refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        kind = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}[type(value)]
        raise InputError(f"{path}:{line}: field '{text_field}' holds {kind}, not a string: fix that line, or name "
                         "the text field with --text-field")
    return value


def _check_text_column(where: Path, text_field: str, column_type) -> None:
    """Parquet and datasets columns: strings (nulls are empty documents), nothing else."""
    import pyarrow as pa

    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InputError(f"{where}: column '{text_field}' holds {column_type}, not strings: name the text column "
                         "with --text-field")


def _json_lines(path: Path, suffix: str, text_field: str, stats: DocumentStats) -> Iterator[tuple[str, int]]:
    lines, raw, damaged = _open_json_lines(path, suffix)
    number = 0
    with raw, lines:
        try:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(_decode(line, stats))
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not a JSON object ({error.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise InputError(f"{path}:{number}: no field '{text_field}' (choose it with --text-field)")
                text = _text_value(record[text_field], path, number, text_field)
                yield _without_lone_surrogates(text, stats), raw.tell()
        except damaged as error:
            raise InputError(f"{path}: cannot be read after line {number} ({error}): it is damaged or not what "
                             "its name says") from None


def _parquet(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as parquet

    try:
        table = parquet.ParquetFile(path)
    except Exception as error:
        raise InputError(f"{path}: not a readable parquet file ({error})") from None
    if text_field not in table.schema_arrow.names:
        raise InputError(f"{path}: no column '{text_field}' (choose it with --text-field)")
    _check_text_column(path, text_field, table.schema_arrow.field(text_field).type)
    size, groups = path.stat().st_size, table.num_row_groups
    for group in range(groups):
        texts = table.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for text in texts:
            yield text or "", size * (group + 1) // groups


def _datasets_file(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    try:
        import datasets
    except ImportError:
        raise InputError(f"{path.parent} is a Hugging Face datasets folder: reading it needs "
                         "`pip install datasets`") from None
    dataset = datasets.Dataset.from_file(str(path))
    if text_field not in dataset.column_names:
        raise InputError(f"{path.parent}: no column '{text_field}' (choose it with --text-field; it has "
                         f"{', '.join(dataset.column_names)})")
    _check_text_column(path.parent, text_field, dataset.data.schema.field(text_field).type)
    size, rows, done = path.stat().st_size, max(len(dataset), 1), 0
    for batch in dataset.select_columns([text_field]).with_format("arrow").iter(batch_size=1000):
        done += batch.num_rows
        for text in batch.column(0).to_pylist():
            yield text or "", size * done // rows


def _texts(path: Path, text_field: str, stats: DocumentStats) -> Iterator[tuple[str, int]]:
    """(document, bytes of the file consumed so far)."""
    suffix = suffix_of(path)
    if suffix in JSON_LINES:
        yield from _json_lines(path, suffix, text_field, stats)
    elif suffix == ".parquet":
        yield from _parquet(path, text_field)
    elif suffix == ".arrow":
        yield from _datasets_file(path, text_field)
    else:
        raw = path.read_bytes()
        _refuse_binary(path, raw, "text")
        yield _decode(raw, stats), len(raw)


def iter_documents(paths: list[Path], text_field: str = "text",
                   stats: DocumentStats | None = None) -> Iterator[str]:
    """Non-empty documents of all inputs, in order."""
    stats = stats if stats is not None else DocumentStats()
    for path in paths:
        count, done = 0, stats.bytes_read
        for text, position in _texts(path, text_field, stats):
            stats.bytes_read = done + position
            if not text.strip():
                stats.empty_skipped += 1
                continue
            count += 1
            stats.documents += 1
            stats.characters += len(text)
            yield text
        stats.per_file[str(path)] = count
        stats.bytes_read = done + path.stat().st_size
