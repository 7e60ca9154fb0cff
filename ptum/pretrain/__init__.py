"""PTUM self-supervised pre-training: MBP + NBP samples, losses and the training loop."""
