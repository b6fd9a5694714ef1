"""The models the Slicer panel offers: the user's model registry (`ra_engine.models_dir()`) plus the models bundled with
the extension (read-only), listed, imported, removed and found by name (no Qt at module level).

"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ra_engine
from ra_engine import ModelError, ProgressFn

MODALITIES = {"brain-mri": "brain MRI (3D T1)", "xray": "X-ray radiograph (2D)"}


class ModelManager:
    """Models by name for the panel and the Python console.

    Registered models live in the registry folder (`modelsFolder()`: $RA_MODELS_DIR, else the user data folder);
    models bundled with ra (`ra_engine.BUNDLED_MODELS_DIR`, e.g. brain-t1-demo) are listed with bundled=True and
    never removed; a registered model shadows a bundled one of the same name (the registry's rules)."""

    # -- listing -----------------------------------------------------------------------------------------------
    def listModels(self) -> list[dict]:
        """The registered models, then the bundled ones (`ra_engine.list_models`), each with a readable
        "modality" added; a model whose card cannot be read has {"name", "path", "bundled", "problem"} instead.
        Weights are not hashed here (loading a model does that)."""
        entries = ra_engine.list_models()
        for entry in entries:
            if "problem" not in entry:
                entry["modality"] = MODALITIES.get(entry.get("preset"), "unknown")
        return entries

    def modelNames(self) -> list[str]:
        """The names `resolve` accepts, registered first."""
        return [entry["name"] for entry in self.listModels()]

    # -- finding -----------------------------------------------------------------------------------------------
    def resolve(self, nameOrPath: str | Path) -> Path:
        """The model directory meant by `nameOrPath`: an existing directory, else a registered model of that name,
        else a bundled one. Raises ModelError naming the models there are."""
        return ra_engine.resolve_model(nameOrPath)

    def isBundled(self, nameOrPath: str | Path) -> bool:
        """Whether `nameOrPath` resolves to a bundled (read-only) model."""
        try:
            path = self.resolve(nameOrPath).resolve()
        except ModelError:
            return False
        return any(entry["bundled"] and Path(entry["path"]).resolve() == path for entry in ra_engine.list_models())

    # -- changing ----------------------------------------------------------------------------------------------
    def importModel(self, source: str | Path, name: str | None = None, sha256: str | None = None,
                    overwrite: bool = False, progress: ProgressFn | None = None) -> Path:
        """Registers a model directory, a .zip of one, or the http(s)/file URL of such a .zip, and returns its
        folder in the registry (see `ra_engine.import_model`: the weights must match the card's sha256,
        an archive must match `sha256` when given, nothing is registered unless every check passes).
        progress(doneBytes, totalBytes or None) follows a download; returning False cancels it."""
        return ra_engine.import_model(source, name=name, sha256=sha256, overwrite=overwrite, progress=progress)

    def removeModel(self, name: str) -> Path:
        """Deletes the registered model `name`; returns the folder it had. Bundled models cannot be removed."""
        return ra_engine.remove_model(name)

    # -- the folder --------------------------------------------------------------------------------------------
    def modelsFolder(self) -> Path:
        """The registry folder (not created here)."""
        return ra_engine.models_dir()

    def openModelsFolder(self) -> Path:
        """Shows the registry folder (created if missing) in the system's file browser: through Qt's
        QDesktopServices inside Slicer, else the platform's opener (Explorer, `open`, `xdg-open`)."""
        folder = self.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            import qt
        except ImportError:
            qt = None
        if qt is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))
        elif sys.platform.startswith("win"):
            os.startfile(str(folder))  # type: ignore[attr-defined]  # Windows only
        else:
            opener = "open" if sys.platform == "darwin" else "xdg-open"
            subprocess.Popen([opener, str(folder)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        return folder

