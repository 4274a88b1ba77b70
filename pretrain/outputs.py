"""Folders that commands write (`data build`, `data merge`, `tokenizer train`, `convert ...`).

A command writes only into a folder that is new or empty, or that the same command made before.
It records there, in MARKER, which command it is and every file before creating it. So it can
refuse any other folder by name, clean up after an unfinished run of its own (a Slurm task killed
halfway builds its part again) and delete what it made and nothing else: a file someone put beside
its own stays. A staged output (OUT.partial, renamed to OUT once complete) is a folder the command
writes whole. While a command writes a folder it holds a lease on it (pretrain.lease): a second
live command on the same folder is refused instead of taking the first's files for leftovers."""

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from pretrain.errors import UserError
from pretrain.lease import LEASE, FolderLease

MARKER = ".pretrain-output"
FORMAT, VERSION = "pretrain-output", 1
PARTIAL = ".partial"
LEASE_TIMEOUT_S = 30.0  # a writer silent this long is taken for dead


class OutputError(UserError, ValueError):
    """A folder a command would write holds files the command did not make; the message names it."""


def _listing(paths: list[Path], most: int = 3) -> str:
    names = ", ".join(path.name for path in paths[:most])
    return names + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _foreign(folder: Path, allow: set[Path]) -> list[Path]:
    """The entries of `folder` other than those in `allow` and folders that hold only such entries."""
    found = []
    for entry in sorted(folder.iterdir()):
        resolved = entry.resolve()
        if resolved in allow:
            continue
        if entry.is_dir() and not entry.is_symlink() and any(path.is_relative_to(resolved) for path in allow):
            found += _foreign(entry, allow)
        else:
            found.append(entry)
    return found


class Output:
    """A folder one command writes, with the ledger (MARKER) of the files it made there."""

    def __init__(self, root: Path, command: str, option: str, whole: bool, header: dict, made: set[str]):
        self.root, self.command, self.option, self.whole = root, command, option, whole
        self.header, self.made = header, made

    @classmethod
    def open(cls, root: str | Path, command: str, option: str = "--out", allow: Iterable[Path] = (),
             whole: bool = False) -> "Output":
        """The folder `root` for `command` (named by `option` in messages): a new or empty one
        (entries in `allow` aside), or one this command made before. Refuses any other.
        `whole`: the command writes the folder whole (a staging folder), without a ledger."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise OutputError(f"{root} is a file, not a folder: choose another {option}")
        found = cls.find(root, command, option, whole)
        if found is not None:
            return found
        if (root / MARKER).is_file():  # made by another command: find() took its own
            other = _read(root / MARKER)[0]["command"]
            raise OutputError(f"{root} holds the output of `pretrain {other}`, not of `pretrain {command}`: "
                              f"choose another {option}")
        foreign = _foreign(root, {Path(path).resolve() for path in allow}) if root.is_dir() else []
        if foreign:
            raise OutputError(f"{root} is not empty ({_listing(foreign)}) and was not made by `pretrain {command}`: "
                              f"choose a new or empty {option}, or move those files away")
        header = {"format": FORMAT, "version": VERSION, "command": command, "created": not root.exists()}
        root.mkdir(parents=True, exist_ok=True)
        output = cls(root, command, option, whole, header, set())
        output._rewrite()
        return output

    @classmethod
    def find(cls, root: str | Path, command: str, option: str = "--out", whole: bool = False) -> "Output | None":
        """The output `command` made in `root`, or None where it made none."""
        root = Path(root)
        if not (root / MARKER).is_file():
            return None
        header, made = _read(root / MARKER)
        return cls(root, command, option, whole, header, made) if header["command"] == command else None

    def claim(self, *names: str | PurePath) -> list[Path]:
        """Record files (paths inside the folder) as this command's before it creates them; returns
        their paths. A file that exists and that the command did not make is refused."""
        new = [name for name in map(PurePath, names) if name.as_posix() not in self.made]
        for name in new:
            if not _inside(name):
                raise OutputError(f"{name} is not a file name inside {self.root}")
            if os.path.lexists(self.root / name):
                raise OutputError(f"{self.root / name} exists and was not made by `pretrain {self.command}`: "
                                  f"move it away or choose another {self.option}")
        if new:
            self._append([name.as_posix() for name in new])
        return [self.root / name for name in names]

    def clean(self) -> None:
        """Delete every file this command made here (what an unfinished run left), and the folders
        that leaves empty; anything else stays."""
        if self.whole:  # the caller's word, never the marker's: a marker may come from anyone
            for entry in self.root.iterdir():
                if entry.name in (MARKER, LEASE):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        inside = self.root.resolve()
        for name in self.made:
            if (self.root / name).parent.resolve().is_relative_to(inside):  # not through a link to elsewhere
                (self.root / name).unlink(missing_ok=True)
        folders = {parent for name in self.made for parent in PurePath(name).parents if parent != PurePath(".")}
        for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
            if (self.root / folder).is_dir() and not any((self.root / folder).iterdir()):
                (self.root / folder).rmdir()
        self.made = set()
        self._rewrite()

    def remove(self) -> list[Path]:
        """clean(); then, when nothing else is left, the ledger and the folder too if the command
        created it. Returns the entries left (not made by the command)."""
        self.clean()
        left = [entry for entry in sorted(self.root.iterdir()) if entry.name != MARKER]
        if not left:
            (self.root / MARKER).unlink()
            if self.header["created"]:
                self.root.rmdir()
        return left

    def _rewrite(self) -> None:
        self._write("w", [self.header])

    def _append(self, names: list[str]) -> None:
        self._write("a", names)
        self.made.update(names)

    def _write(self, mode: str, records: list) -> None:
        # synced: after a crash the ledger must still name every file the command had created
        with open(self.root / MARKER, mode, encoding="utf-8") as ledger:
            ledger.write("".join(json.dumps(record) + "\n" for record in records))
            ledger.flush()
            os.fsync(ledger.fileno())


def _inside(name: PurePath) -> bool:
    return bool(name.parts) and not name.is_absolute() and ".." not in name.parts


def _read(marker: Path) -> tuple[dict, set[str]]:
    """The ledger's header and files; refused unless every file lies inside its folder."""
    lines = marker.read_text(encoding="utf-8", errors="replace").splitlines() or ["null"]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # the last line of a run that died while writing it; its file was not created
            break
    header, names = (records or [None])[0], records[1:]
    valid = (isinstance(header, dict) and header.get("format") == FORMAT and header.get("version") == VERSION
             and isinstance(header.get("command"), str)
             and all(isinstance(name, str) and _inside(PurePath(name)) for name in names))
    if not valid:
        raise OutputError(f"{marker} is damaged or not pretrain's: it does not say which files `pretrain` made in "
                          f"{marker.parent}; empty that folder yourself or choose another output folder")
    return header, set(names)


@contextmanager
def fresh(root: str | Path, command: str, option: str = "--out", whole: bool = False) -> Iterator[Output]:
    """The folder for a command that writes it from the start, leased for the body (a live command
    writing it already is refused): what an unfinished run of the same command made there is
    deleted first; if the body fails, what it made is deleted again."""
    output = Output.open(root, command, option, whole=whole)
    lease = FolderLease(output.root, command, LEASE_TIMEOUT_S, what=f"output folder of `pretrain {command}`",
                        advice=f"Wait for it to end or stop it, or choose another {option}")
    lease.acquire()
    try:
        output.clean()
        yield output
    except BaseException:
        lease.check()
        lost = lease.lost  # then the files are the new holder's
        if not lost:
            output.clean()
        lease.release()
        if not lost:
            output.remove()
        raise
    lease.check()
    lease.release()
    if lease.lost:
        raise OutputError(f"{lease.lost} while this command wrote it: the files there may mix both commands' "
                          "output; run it again once the other has ended")


@contextmanager
def staged(out: str | Path, command: str, option: str = "--out",
           refusal: type[UserError] = OutputError) -> Iterator[Path]:
    """A folder written whole: the body writes into OUT.partial, which becomes `out` once the body
    has succeeded. `out` must be new or empty (else `refusal` is raised); an OUT.partial that an
    unfinished run of the same command left is replaced, any other refused; if the body fails,
    OUT.partial is deleted."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise refusal(f"{out} exists and is not empty: choose a new {option} folder")
    with fresh(out.with_name(out.name + PARTIAL), command, option, whole=True) as staging:
        yield staging.root
    (staging.root / MARKER).unlink()
    try:
        os.replace(staging.root, out)  # replaces an empty folder
    except OSError as error:
        raise OutputError(f"cannot rename {staging.root} to {out} ({error.strerror}); the complete output is in "
                          f"{staging.root}: move it yourself") from None
