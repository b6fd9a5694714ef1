"""Where computation runs: the device, and the process group under torchrun (torch)."""
