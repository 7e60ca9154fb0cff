"""ptum: pre-training user models from unlabeled behavior logs (PTUM, Wu et al. 2020)."""

__version__ = "0.1.0"
