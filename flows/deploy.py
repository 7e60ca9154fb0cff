"""Deployment `pool` of flow `ptum` on a Prefect work pool, for workers on other machines.

`python -m flows.serve` runs flows in the process that serves them. With a work pool, any number
of workers (on this or other machines) pick up runs instead:

    prefect work-pool create ptum --type process           # once, against your Prefect server
    python -m flows.deploy --pool ptum                     # registers deployment ptum/pool
    prefect worker start --pool ptum                       # on each worker machine
    prefect deployment run ptum/pool --watch -p quick=true

A worker runs the flow from `--source`, a checkout of this repository at the same path on every
worker machine (default: this checkout), with the project's venv: start the worker with that
venv's `prefect` so the flow finds `dvc` and `ptum`. Each run is a DVC experiment of that
checkout (refs/exps), its outputs in that machine's DVC cache: `dvc exp push` / `dvc push`
share them. Like `full`, the deployment has a server-side concurrency limit of 1 (runs queue
in AwaitingConcurrencySlot); raise it with --limit when workers have their own checkouts.
"""

from __future__ import annotations

import argparse

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import ROOT, ptum_flow

ENTRYPOINT = "flows/pipeline.py:ptum_flow"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--pool", required=True, help="work pool name (type process)")
    parser.add_argument(
        "--source",
        default=str(ROOT),
        help="the checkout workers run the flow from (default: this one)",
    )
    parser.add_argument("--name", default="pool", help="deployment name (default: pool)")
    parser.add_argument("--limit", type=int, default=1, help="concurrent runs (default: 1)")
    parser.add_argument("--cron", default=None, help="cron schedule (default: none)")
    args = parser.parse_args(argv)
    ptum_flow.from_source(source=args.source, entrypoint=ENTRYPOINT).deploy(
        name=args.name,
        work_pool_name=args.pool,
        cron=args.cron,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=args.limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        tags=["ptum"],
        description="The whole ptum pipeline (dvc.yaml) as one isolated DVC experiment.",
    )


if __name__ == "__main__":
    main()
