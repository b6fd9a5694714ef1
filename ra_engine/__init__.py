"""RA engine: Reversed Auto-Encoders for unsupervised anomaly detection in medical images (Bercea et al.). No Slicer,
Qt or VTK here. The public API is `ra_engine.api`, re-exported here; `import ra_engine` does not import PyTorch."""
from ra_engine.api import *  # noqa: F403 (the API's __all__)
from ra_engine.api import __all__ as _api
from ra_engine.core.resources import VERSION as __version__

__all__ = ["__version__", *_api]
