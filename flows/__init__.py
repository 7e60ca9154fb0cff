"""Prefect orchestration of the DVC pipeline: flow `ptum` (pipeline.py, with its plain parts in
params.py, plan.py, experiment.py and artifacts.py), deployment `full` served by serve.py,
deployment `pool` on a work pool (deploy.py).

Thin on purpose: a flow run is one `dvc exp run --temp` (an isolated DVC experiment), and the
stage code in `ptum/` never imports Prefect. See docs/prefect.md for the commands.
"""
