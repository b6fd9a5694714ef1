"""Slicer-side logic of RA, without Qt: MRML volume nodes <-> the engine (`geometry`), output nodes (`outputs`),
slice-view display (`display`), the module's parameter node (`parameters`) and `RALogic` itself (`logic`).

`RALogic`, `RAResult`, `RAParameters` and `SceneClosed` are loaded on first use, so importing the package imports
neither MRML nor torch (Slicer imports modules at start-up, before PyTorch may be installed).
"""

_EXPORTS = {"RALogic": "logic", "RAResult": "logic", "SceneClosed": "logic", "RAParameters": "parameters"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
