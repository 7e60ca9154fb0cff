"""Deployment `full` of flow `ptum`, served by this long-running process.

    python -m flows.serve                      # no schedule: runs start on request
    python -m flows.serve --cron "0 3 * * *"   # or PTUM_FLOW_CRON="0 3 * * *": nightly at 03:00

Start it from the project root with PREFECT_API_URL pointing at a Prefect server, e.g. a local
one bound to 127.0.0.1 with its state in .prefect/ (the full commands are in flows/USAGE.md):

    export PREFECT_HOME=$PWD/.prefect
    prefect server start --host 127.0.0.1 --port 4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run ptum/full --watch -p quick=true

The process registers the deployment, polls the server for its runs and executes each one in a
subprocess, one at a time (limit=1: DVC allows one run per repository). Stop it with Ctrl-C,
which pauses the schedule. Scheduled runs use the flow's defaults, i.e. params.yaml as it stands.
"""

from __future__ import annotations

import argparse
import os

from flows.pipeline import ptum_flow

CRON_ENV = "PTUM_FLOW_CRON"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--cron",
        default=os.environ.get(CRON_ENV) or None,
        help=f"cron schedule for deployment `full` (default: ${CRON_ENV}; unset = no schedule)",
    )
    args = parser.parse_args(argv)
    ptum_flow.serve(
        name="full",
        cron=args.cron,
        limit=1,
        tags=["ptum"],
        description="The whole ptum pipeline (dvc.yaml), one task per stage.",
    )


if __name__ == "__main__":
    main()
