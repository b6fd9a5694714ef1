"""Anomaly map -> detections: the calibration table that turns a normal flag rate into a threshold, percentiles of
normal (torch-free)."""
