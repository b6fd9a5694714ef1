"""Bringing a model into the registry (`models.registry`): from a model folder, a .zip of one, or the URL (http,
https, file) of such a .zip. An archive can be checked against a sha256 given by its publisher, and every model's
weights are checked against the sha256 in its card (and loaded into its architecture) before it is registered.
Imports are atomic: a model is unpacked and checked in a hidden folder beside the others and only then renamed into
place, so the registry never shows a half-copied or unchecked model. Archives with absolute paths, `..` or links, or
that would unpack to more than MAX_UNPACKED_BYTES or at a ratio above MAX_RATIO (a "zip bomb"), are refused whole;
a download that ends before its announced length is refused.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import uuid
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from ra_engine.core.errors import Cancelled, ModelError
from ra_engine.core.files import sha256_of
from ra_engine.core.progress import ProgressFn
from ra_engine.models.card import read_card
from ra_engine.models.modeldir import load_model
from ra_engine.models.registry import NAME_PATTERN, check_name, models_dir

URL_SCHEMES = ("http://", "https://", "file://")
# A model directory is two files: the paper's network is 120 MB of weights. An archive that unpacks to more, or whose
# large entries shrank more than MAX_RATIO times (weights barely compress), is not a model.
MAX_UNPACKED_BYTES = 4 * 2**30
MAX_RATIO = 100
RATIO_CHECKED_ABOVE = 2**20




def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    digest = sha256.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ModelError(f"{sha256!r} is not a sha256 digest (64 hexadecimal digits)")
    return digest


def _verify_sha256(path: Path, expected: str | None, origin: str) -> None:
    if expected is not None and (actual := sha256_of(path)) != expected:
        raise ModelError(f"{origin} does not match the sha256 given (it is {actual}, expected {expected}): the file "
                         f"is corrupt, incomplete or not the one published; nothing was imported")


def download(url: str, dest: Path, progress: ProgressFn | None = None, timeout_s: float = 60.0) -> Path:
    """Downloads `url` (http, https or file) to the file `dest`. `progress(done_bytes, total_bytes or None)` is called
    after each block; returning False cancels (raises `Cancelled`, and `dest` is removed)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length")
            total, done = (int(length) if length and length.isdigit() else None), 0
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                done += len(block)
                if progress is not None and progress(done, total) is False:
                    raise Cancelled(f"download of {url} cancelled")
            if total is not None and done != total:
                raise ModelError(f"cannot download {url}: the connection ended after {done} of its {total} bytes; "
                                 f"nothing was imported, try again")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        dest.unlink(missing_ok=True)
        raise ModelError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _unsafe_member(member: zipfile.ZipInfo) -> bool:
    """True for a zip entry that would land outside the folder it is unpacked into (an absolute path, a drive, a
    `..`: "zip slip"), or that is a symbolic link."""
    name = member.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
    return not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or is_link


def _unpack(archive: Path, dest: Path) -> None:
    """Unpacks the zip `archive` into the folder `dest`, refusing it whole if any entry is absolute, climbs out
    with `..`, or is a symbolic link."""
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            bad = [m.filename for m in members if _unsafe_member(m)]
            if bad:
                raise ModelError(f"{archive.name} holds entries that would be written outside the model folder or "
                                 f"are links ({', '.join(bad[:5])}): the archive was refused")
            total = sum(m.file_size for m in members)
            bombs = [m.filename for m in members
                     if m.file_size > RATIO_CHECKED_ABOVE and m.file_size > MAX_RATIO * max(m.compress_size, 1)]
            if total > MAX_UNPACKED_BYTES or bombs:
                raise ModelError(f"{archive.name} would unpack to {total} bytes"
                                 f"{f' ({bombs[0]} at more than {MAX_RATIO} times its packed size)' if bombs else ''}"
                                 f", more than a model directory holds (at most {MAX_UNPACKED_BYTES} bytes): the "
                                 f"archive was refused")
            zf.extractall(dest)  # each entry's output is bounded by its listed size (zipfile checks it and the CRC)
    except zipfile.BadZipFile as exc:
        kind = "a tar archive, which is not imported (unpack it and import the folder, or give a .zip)" if (
            tarfile.is_tarfile(archive)) else "not a zip archive of a model directory"
        raise ModelError(f"{archive.name} is {kind} ({exc})") from exc


def _model_root(folder: Path, origin: str) -> Path:
    """The model directory inside an unpacked archive: the folder itself or its one sub-folder holding model.json."""
    cards = [p.parent for p in folder.rglob("model.json")]
    if len(cards) != 1 or cards[0] not in (folder, *folder.iterdir()):
        found = ", ".join(str(c.relative_to(folder)) for c in cards) or "none"
        raise ModelError(f"{origin} must hold one model directory (model.json and model.safetensors) at its top or "
                         f"in one folder; model.json found in: {found}")
    return cards[0]


def import_model(source: str | Path, name: str | None = None, sha256: str | None = None, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> Path:
    """Registers a model and returns its folder. source: a model directory, a .zip of one (the files at its top or
    in one folder), or the http/https/file URL of such a .zip. name: the registry name (default: the card's name).
    sha256: the expected sha256 of the archive (zip or download); a download without one is checked only against its
    own card (a warning says so). The weights must match the sha256 in the card and fit its architecture. An
    existing model of the same name is replaced only with overwrite=True. progress: see `download`."""
    text = str(source)
    is_url = text.lower().startswith(URL_SCHEMES)
    path = None if is_url else Path(source).expanduser()
    expected = _normalise_sha256(sha256)
    if path is not None and not path.exists():
        raise ModelError(f"{source} does not exist: give a model directory, a .zip of one, or an http(s)/file URL")
    if path is not None and path.is_dir() and expected is not None:
        raise ModelError("--sha256 checks an archive (a .zip or a download); a model directory's weights are checked "
                         "against the sha256 in its card")
    if is_url and expected is None:
        warnings.warn(f"no sha256 given for {text}: the download is checked only against its own card, which does "
                      f"not prove where it came from", stacklevel=2)
    if name is not None:
        check_name(name)
        _refuse_existing(name, overwrite)
    registry = models_dir()
    try:
        registry.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".import-", dir=registry))
    except OSError as exc:
        raise ModelError(f"cannot write into the model registry {registry}: {exc} (check its permissions, or set "
                         f"RA_MODELS_DIR to a writable folder); nothing was imported") from exc
    try:
        if path is not None and path.is_dir():
            read_card(path)  # a model directory, not e.g. a whole run folder, before anything is copied
            root = staging / "model"
            shutil.copytree(path, root, symlinks=False)
            origin = str(path)
        else:
            archive = staging / "download.zip" if is_url else path
            if is_url:
                download(text, archive, progress)
            origin = text
            _verify_sha256(archive, expected, origin)
            _unpack(archive, staging / "unpacked")
            root = _model_root(staging / "unpacked", origin)
        load_model(root)  # refuses weights that do not match the card's sha256 or architecture
        card_name = read_card(root).name
        if name is None:
            if not (isinstance(card_name, str) and NAME_PATTERN.fullmatch(card_name)):
                raise ModelError(f"the model's card names it {card_name!r}, which is not a usable registry name: "
                                 f"give one with --name")
            name = card_name
            _refuse_existing(name, overwrite)
        return _install(root, registry / name, overwrite)
    except OSError as exc:  # a full disk or a read-only registry while copying, unpacking or renaming
        raise ModelError(f"cannot import {source} into {registry}: {exc} (check free disk space and write "
                         f"permission); nothing was imported") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_existing(name: str, overwrite: bool) -> None:
    target = models_dir() / name
    if target.exists() and not overwrite:
        raise ModelError(f"a model named {name} is already registered ({target}): pass --overwrite to replace it, "
                         f"or choose another --name")


def _install(root: Path, target: Path, overwrite: bool) -> Path:
    """Renames the checked model folder `root` (inside the registry folder) to `target`, replacing an existing one
    only when `overwrite`."""
    _refuse_existing(target.name, overwrite)  # again: another import may have finished meanwhile
    old = None
    if target.exists():
        old = target.with_name(f".replaced-{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    try:
        os.replace(root, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
