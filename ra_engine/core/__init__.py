"""Torch-free foundations shared by every stage: images and geometry, errors, files written atomically, progress events,
bundled resources and defaults."""
