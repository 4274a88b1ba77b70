"""The on-disk format of tokenized data: webdataset tar shards plus `manifest.json`.

Each sample has two members: `<key>.tokens`, the seq_len + 1 token ids as little-endian
uint16/uint32, and `<key>.json`, {"doc_starts": [...]}, the offsets inside the sample where a
document begins. Documents end with EOS; the last sample of a dataset is filled with the pad id.
Beside each shard, `<shard>.idx` lists the byte offset of every sample's tokens (uint64), so
that a sample can be read without scanning the tar. Tar headers are fixed (mtime 0, uid 0,
mode 0644): the same input gives byte-identical shards. A sample's member name is its shard's
`key_prefix` (in the manifest) and its number in the shard. The folder also holds `tokenizer/`,
a copy of the tokenizer the shards were built with (checked against the manifest's sha256)."""

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pretrain.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "pretrain-tokens"
VERSION = 2  # 2: shards named by packing unit, key_prefix per shard, tokenizer copy
READABLE_VERSIONS = (1, 2)
TOKENIZER_DIR = "tokenizer"
# what reading shards needs of a manifest (a run also checks the tokenizer's sha256 and vocabulary)
REQUIRED_FIELDS = ("seq_len", "sample_tokens", "dtype", "eos_id", "pad_id", "tokenizer", "shards")
REQUIRED_TOKENIZER_FIELDS = ("sha256", "vocab_size")
PACKING_UNIT_MB = 256  # input per packing unit (pretrain.data.build): at most one padded sample each


class ShardError(UserError, ValueError):
    """A shard or manifest is missing, damaged or does not fit the run; the message names it."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def sample_key(key_prefix: str, sample_index: int) -> str:
    return f"{key_prefix}{sample_index:07d}"


class ShardWriter:
    """Writes one tar shard and its index; renames both into place on close."""

    def __init__(self, path: Path, key_prefix: str):
        self.path, self.key_prefix = path, key_prefix
        _, self.partial, _ = self.files(path)
        self.tar = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)
        self.offsets: list[int] = []

    @staticmethod
    def files(path: Path) -> tuple[Path, Path, Path]:
        """What a writer of shard `path` creates: the shard, the shard while written, its index."""
        return path, path.with_name(path.name + ".partial"), index_path(path)

    def _member(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o644, 0, 0
        self.tar.addfile(info, io.BytesIO(payload))

    def add(self, key: str, tokens: np.ndarray, doc_starts: list[int]) -> None:
        self.offsets.append(self.tar.fileobj.tell() + tarfile.BLOCKSIZE)
        self._member(f"{key}.tokens", tokens.tobytes())
        self._member(f"{key}.json", json.dumps({"doc_starts": doc_starts}, separators=(",", ":")).encode())

    def close(self) -> dict:
        """Finish the shard; returns its manifest entry."""
        self.tar.close()
        index = index_path(self.path)
        np.asarray(self.offsets, dtype="<u8").tofile(index)
        os.replace(self.partial, self.path)
        return {"name": self.path.name, "key_prefix": self.key_prefix, "samples": len(self.offsets),
                "bytes": self.path.stat().st_size,
                "sha256": file_sha256(self.path), "index_sha256": file_sha256(index)}


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def open_location(location: str, allow_pipe: bool):
    """A local file or any URL webdataset can open (`pipe:` only when allowed)."""
    if location.startswith("pipe:") and not allow_pipe:
        raise ShardError(f"{location}: pipe: URLs run shell commands; set data.allow_pipe=true to allow them")
    if is_url(location):
        from webdataset.gopen import gopen

        return gopen(location, "rb")
    return open(location, "rb")


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".idx")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing_fields(data: dict) -> list[str]:
    missing = [key for key in REQUIRED_FIELDS if key not in data]
    tokenizer = data["tokenizer"] if isinstance(data.get("tokenizer"), dict) else {}
    if "tokenizer" not in missing:
        missing += [f"tokenizer.{key}" for key in REQUIRED_TOKENIZER_FIELDS if key not in tokenizer]
    return missing


@dataclass
class Manifest:
    """A shards folder (or a URL prefix) and its manifest."""

    root: str  # folder or URL prefix the shard names are relative to
    data: dict

    @classmethod
    def load(cls, location: str | Path, allow_pipe: bool = False) -> "Manifest":
        """`location`: a shards directory or its manifest.json, as a path or a URL."""
        location = str(location)
        path = location if location.endswith(MANIFEST) else location.rstrip("/") + "/" + MANIFEST
        try:
            with open_location(path, allow_pipe) as f:
                data = json.loads(f.read())
        except ShardError:
            raise
        except (OSError, ValueError) as error:
            if isinstance(error, json.JSONDecodeError):
                raise ShardError(f"{path} is not valid JSON ({error}); rebuild the shards") from None
            raise ShardError(f"no {MANIFEST} at {path} ({error}): build shards with `pretrain data build` "
                             "or point data.path at a shards folder") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") not in READABLE_VERSIONS:
            raise ShardError(f"{path} is not a {FORMAT} manifest of version {' or '.join(map(str, READABLE_VERSIONS))}; "
                             "rebuild the shards")
        if missing := _missing_fields(data):
            raise ShardError(f"{path} has no {', '.join(missing)}: it was not written by `pretrain data build` or was "
                             "edited since; rebuild the shards")
        return cls(path[: -len(MANIFEST) - 1], data)

    @property
    def shards(self) -> list[dict]:
        return self.data["shards"]

    @property
    def seq_len(self) -> int:
        return self.data["seq_len"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data["dtype"]).newbyteorder("<")

    @property
    def num_samples(self) -> int:
        return sum(shard["samples"] for shard in self.shards)

    def shard_path(self, shard: dict) -> str:
        return f"{self.root}/{shard['name']}"

    def key_prefix(self, shard_index: int) -> str:
        return self.shards[shard_index].get("key_prefix", f"{shard_index:06d}")  # version 1: the shard's number

    def tokenizer_dir(self) -> Path | None:
        """The tokenizer copy beside local shards (version 2), or None (URLs, version 1)."""
        folder = Path(self.root) / TOKENIZER_DIR
        return folder if not is_url(self.root) and self.data["tokenizer"].get("path") == TOKENIZER_DIR else None
