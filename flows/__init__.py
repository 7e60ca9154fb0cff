"""Prefect orchestration of the DVC pipeline: flow `ptum` (pipeline.py), deployment `full` (serve.py).

Thin on purpose: every stage is `dvc repro <stage>`, and the stage code in `ptum/` never imports
Prefect. See flows/USAGE.md for the commands.
"""
