"""Helpers of the robustness suite (see its conftest.py): the default and the full form's sizes, the environment of
engine subprocesses, small filesystems and read-only folders, and checks that nothing was left behind."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
FULL = os.environ.get("RA_ROBUSTNESS", "").lower() == "full"

def scaled(default: int, full: int) -> int:
    """A count of the default run, or of the full form (RA_ROBUSTNESS=full)."""
    return full if FULL else default


def child_env(**extra: str) -> dict:
    """The environment of an engine subprocess: one thread (training is bitwise reproducible on the CPU with the
    same thread count), no torchrun variables, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
    return env


# ---- full disks and read-only folders ----------------------------------------------------------------------------


def _can_mount() -> str | None:
    """None when this process can mount a tmpfs (root with the mount command), else why not."""
    if not sys.platform.startswith("linux"):
        return "tmpfs mounts are tested on Linux only"
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount command"
    return None


class Mounts:
    """Small filesystems mounted for one test, unmounted at its end (lazily: a test that failed with files open
    does not leave a mount behind)."""

    def __init__(self):
        self.mounted: list[Path] = []
        self.chmodded: list[Path] = []

    def tmpfs(self, folder: Path, size: str) -> Path:
        """A tmpfs of `size` (e.g. "2m", "64k") on `folder` (created); skips the test where mounting fails."""
        reason = _can_mount()
        if reason:
            pytest.skip(reason)
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        self.mounted.append(folder)
        return folder

    def read_only(self, folder: Path) -> Path:
        """`folder` (with what it holds) made read-only: a read-only bind mount as root (root ignores file modes),
        else the write bits removed."""
        if os.geteuid() != 0:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
            self.chmodded.append(folder)
            return folder
        reason = _can_mount()
        if reason:
            pytest.skip(reason)
        for options in (["--bind"], ["-o", "remount,bind,ro"]):
            done = subprocess.run(["mount", *options, str(folder), str(folder)], capture_output=True, text=True)
            if done.returncode:
                pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
            if options == ["--bind"]:
                self.mounted.append(folder)
        return folder

    def cleanup(self) -> None:
        for folder in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        for folder in self.chmodded:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Writes a ballast file in `folder` until its filesystem is full (less `leave` bytes); returns the file."""
    ballast = folder / f"ballast-{uuid.uuid4().hex[:6]}"
    block = b"\0" * 4096
    with open(ballast, "wb", buffering=0) as f:  # unbuffered: nothing is left to flush at the close
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno in (errno.ENOSPC, errno.EFBIG), exc
    if leave:
        with open(ballast, "rb+") as f:
            f.truncate(max(0, ballast.stat().st_size - leave))
    return ballast


def files_under(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` with its bytes (hidden and temporary files included)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def no_leftovers(folder: Path):
    """Asserts that what is below `folder` is byte for byte the same after the block as before it."""
    before = files_under(folder) if folder.exists() else {}
    yield
    after = files_under(folder) if folder.exists() else {}
    assert after == before, f"changed below {folder}: {sorted(set(after) ^ set(before)) or 'contents'}"


