"""Files written whole or not at all, and their checksums.

`atomic_write` is the one way the engine writes a file that a user or a later run reads (images, model cards and
weights, checkpoints, reports, figures): the path holds either the complete new file or what was there before.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Callable

from ra_engine.core.errors import RAError, error_text


class WriteError(RAError, OSError):
    """A file could not be written (disk full, no permission, a writer's failure); what its path held before is
    intact and no temporary file is left."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "", *,
                 hint: str = "check free disk space and write permission") -> Path:
    """Calls `write(temporary)` for a temporary file beside `path` (ending in `suffix`, for writers that choose the
    format by extension), flushes it to disk and renames it onto `path`; the temporary file never outlives the call.
    An OSError on the way (a writer may raise one for its own failures) becomes a `WriteError` that names the path,
    the reason and `hint` (what the user can do)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except WriteError:  # a nested atomic write (a model's card inside its weights' write) said it already
        raise
    except OSError as exc:
        raise WriteError(f"could not write {path}: {error_text(exc)} ({hint})") from exc
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # a read-only folder, where nothing could be created either: the error above is the one
            pass
    return path


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes the temporary files that `atomic_write` calls killed mid-write (SIGKILL, a power cut) left in
    `folder`; the files they were to replace are intact. Returns what was removed."""
    folder = Path(folder)
    stale = [p for p in folder.glob(".*.tmp*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def sha256_of(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, as hexadecimal digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def common_root(paths) -> Path:
    """The deepest folder holding all `paths` (files or folders): the root that file names in a model card are
    given relative to, so that a card holds no absolute path of the machine that made it."""
    paths = [Path(p).absolute() for p in paths]
    if not paths:
        raise ValueError("no paths")
    parents = [p if p.is_dir() and len(paths) > 1 else p.parent for p in paths]
    return Path(os.path.commonpath([str(p) for p in parents]))


def file_fingerprint(path: str | os.PathLike, root: str | os.PathLike) -> dict:
    """What identifies a data file without saying where the machine keeps it: its name relative to `root` (POSIX
    separators), its size in bytes and its sha256; for a folder (a DICOM series) the size of its files and the sha256
    of the sorted list of their relative names and sha256s."""
    path = Path(path).absolute()
    name = path.relative_to(Path(root).absolute()).as_posix() if path != Path(root).absolute() else path.name
    if path.is_file():
        return {"file": name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_of(p)}\n" for p in files)
    return {"file": name, "bytes": sum(p.stat().st_size for p in files),
            "sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest()}
