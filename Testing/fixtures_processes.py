"""Helpers for the tests of engine jobs in child processes: a stand-in for Slicer's PythonSlicer launcher, and
checks that a process or process group is gone."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

STANDIN = '''#!{python}
"""Stands in for PythonSlicer, Slicer's Python launcher: starts the real Python with the same arguments as its own
child (same process group), forwards no signal, dies of SIGTERM at once (Python's default), and otherwise exits
with the child's status."""
import subprocess
import sys

child = subprocess.Popen([{python!r}, *sys.argv[1:]])
sys.exit(child.wait())
'''


def write_standin_launcher(folder: Path) -> Path:
    """An executable stand-in launcher in `folder`, to pass as `python=` where PythonSlicer would be."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "PythonSlicer"
    path.write_text(STANDIN.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _state(pid: int):
    """(state letter, process group) of a process from /proc, or None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[2])


def group_exists(pgid: int) -> bool:
    """Whether a live process (not a zombie: an orphan that exited waits for init to reap it) is in the group."""
    if not Path("/proc/self/stat").is_file():  # no /proc: ask the kernel, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    states = (_state(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return any(state is not None and state[1] == pgid and state[0] != "Z" for state in states)


def process_exists(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie counts as gone)."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    state = _state(pid)
    return state is not None and state[0] != "Z"
