"""Downstream tasks: demographic prediction and CTR, the fine-tuning grid and its report."""
