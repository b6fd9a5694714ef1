"""RA engine: Reversed Auto-Encoders for unsupervised anomaly detection (Bercea et al.). No Slicer, Qt or VTK here."""
__version__ = "0.1.0"
