"""``make run``: the benchmark pipeline end to end on this machine.

The same KFP pipeline as on Kubeflow, run by ``kfp.local``'s subprocess runner: curate the
simulated panel with DVC (``dvc pull``, or ``dvc repro`` + ``dvc push`` to the local remote
``.dvcstore``), build its shards, pretrain every entry of the ``pipeline.grid`` of params.yaml on a
local Ray (optionally tuning each first), evaluate each run, write the report and register the
best model in MLflow (SQLite, ``mlflow.db``) with the alias ``champion``. It ends by printing where
the report is and how to open MLflow.

Usage: ``python -m hescape.main_job [--params params.yaml] [--set pipeline.key=value ...]``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from hescape.cli import QUIET_ENV
    from hescape.errors import HescapeError

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="python -m hescape.main_job", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="pipeline.KEY=VALUE",
                        help="override a value of the pipeline block (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from hescape.commands.pipeline import summary
        from hescape.orchestration.project import add_pipeline_paths

        add_pipeline_paths()
        from hescape_pipelines.local import run_local

        result = run_local(args.params, overrides=args.overrides, mode="local")
    except (HescapeError, RuntimeError) as exc:  # kfp.local raises RuntimeError when a task fails
        print(f"make run: error: {exc}\n(each step's log is printed above, under its task name)", file=sys.stderr)
        return 2
    print()
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
