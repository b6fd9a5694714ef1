"""Writing a file so that its path holds either the complete new file or what was there before, never half."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> Path:
    """Calls `write(temporary)` for a temporary file beside `path` (ending in `suffix`, for writers that choose the
    format by extension), flushes it to disk and renames it onto `path`; the temporary file never outlives the call."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
