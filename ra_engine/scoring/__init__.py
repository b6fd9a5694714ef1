"""Reconstruction -> anomaly map: CLAHE, LPIPS with offline weights, and the anomaly scorer."""
