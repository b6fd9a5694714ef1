"""RA engine: Reversed Auto-Encoders for unsupervised anomaly detection (Bercea et al.). No Slicer, Qt or VTK here.

`import ra_engine` stays light (no torch) so that Slicer can import modules before PyTorch is installed; the
public functions below import their modules on first use.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from .modeldir import load_model

        return load_model
    raise AttributeError(f"module 'ra_engine' has no attribute {name!r}")
