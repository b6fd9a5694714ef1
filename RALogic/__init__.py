"""Slicer-side logic of RA, without Qt: MRML volume nodes <-> the engine (`geometry`), output nodes (`outputs`),
slice-view display (`display`), the module's parameter node (`parameters`), engine jobs in child processes
(`launcher`, with `worker` and `detectjob` on the child's side), the engine's packages (`dependencies`), the model
list (`models`), the bundled sample scan (`sample`) and `RALogic` itself (`logic`).

The names below are loaded on first use, so importing the package imports neither MRML nor torch (Slicer imports
modules at start-up, before PyTorch may be installed). The engine's errors are re-exported, so that the Slicer
panel needs nothing but RALogic.
"""

_EXPORTS = {"RALogic": "logic", "RAResult": "logic", "DetectionTask": "logic", "SceneClosed": "logic",
            "RAParameters": "parameters", "RAError": "logic", "DataError": "logic", "ModelError": "logic",
            "Cancelled": "logic"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
