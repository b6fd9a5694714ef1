"""Model directories (weights and the model card), and the registry that finds them by name."""
