"""The child-process end of `RALogic.launcher`: `python -m RALogic.worker STATUS MODULE ARGS...` runs MODULE as
`python -m MODULE ARGS...` would, in this process, and records in the JSON file STATUS this process's pid when it
starts ({"pid"}) and the job's exit status when it ends ({"pid", "returncode"}).

Why: inside Slicer, `sys.executable` is PythonSlicer, a launcher that starts the real Python as its own child and
forwards no signal. The launcher's exit status is not the engine's (a launcher killed by SIGTERM reports -15 while
the engine stops cleanly with 130, or runs on), and its pid is not the engine's. The status file is the engine's own
word on both, whatever sits in between. Imports nothing but the standard library before MODULE runs.
"""
import json
import os
import runpy
import sys
from pathlib import Path


def write_status(path: Path, **status) -> None:
    """Replaces the status file in one step (a reader never sees half of it)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(status), encoding="utf-8")
    os.replace(temporary, path)


def run_module(module: str, arguments: list) -> int:
    """Runs `module` as __main__ with `arguments` as its command line; returns its exit status as `python -m` would
    (0 when it returns, the code of SystemExit, 1 after an uncaught exception, whose traceback goes to stderr)."""
    sys.argv = [module, *arguments]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: B902  KeyboardInterrupt included: report it, as the interpreter would
        import traceback

        traceback.print_exc()
        return 1
    return 0


def main(argv: list) -> int:
    if len(argv) < 2:
        print("usage: python -m RALogic.worker STATUS MODULE [ARGS...]", file=sys.stderr)
        return 2
    status, module, arguments = Path(argv[0]), argv[1], argv[2:]
    write_status(status, pid=os.getpid())
    returncode = 1
    try:
        returncode = run_module(module, arguments)
    finally:
        write_status(status, pid=os.getpid(), returncode=returncode)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
