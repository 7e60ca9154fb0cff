"""Deployment `full` of flow `ptum`, served by this long-running process.

    python -m flows.serve                      # no schedule: runs start on request
    python -m flows.serve --cron "0 3 * * *"   # or PTUM_FLOW_CRON="0 3 * * *": nightly at 03:00

Start it from the project root with PREFECT_API_URL pointing at a Prefect server, e.g. a local
one bound to 127.0.0.1 with its state in .prefect/ (the full commands are in docs/prefect.md):

    export PREFECT_HOME=$PWD/.prefect
    prefect server start --host 127.0.0.1 --port 4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run ptum/full --watch -p quick=true

The process registers the deployment with a server-side concurrency limit of 1: a run started
while another is running waits in state AwaitingConcurrencySlot and starts when the slot frees
(each run is its own DVC experiment, but one at a time keeps the machine's cores for one
pipeline). This process executes each run in a subprocess. Ctrl-C or SIGTERM stops it: a run in
progress is cancelled (its DVC experiment and stage processes are stopped with it; the
workspace is untouched, as always) and the schedule is paused.
"""

from __future__ import annotations

import argparse
import os

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.pipeline import ptum_flow

CRON_ENV = "PTUM_FLOW_CRON"
# One run at a time across every process serving `full`; the others queue on the server.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)


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
        # The server holds the queue (no runner-side `limit`, under which waiting runs would sit
        # Scheduled and turn Late): extra runs show as AwaitingConcurrencySlot.
        global_limit=ONE_AT_A_TIME,
        tags=["ptum"],
        description="The whole ptum pipeline (dvc.yaml) as one isolated DVC experiment.",
    )


if __name__ == "__main__":
    main()
