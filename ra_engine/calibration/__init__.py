"""Normal scans -> the model card's thresholds and score distributions."""
