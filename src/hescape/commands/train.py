"""Align an image encoder and a gene encoder contrastively on a curated panel.

Preprocesses the panel if needed, fills the frozen-feature cache, trains on Ray Train workers,
tracks everything in MLflow and prints the MLflow run id.
"""

from __future__ import annotations

from hescape.commands._params import add_params_arguments

NAME = "train"
HELP = "contrastive pretraining of one encoder pair; prints the MLflow run id"


def add_arguments(parser):
    parser.add_argument("--panel", required=True, help="curated panel directory")
    add_params_arguments(parser, example="train.loss=siglip")
    parser.add_argument("--local", action="store_true",
                        help="run the training loop in this process instead of on Ray workers (debugging)")
    parser.add_argument("--run-name", default=None, help="MLflow run name (default: encoders-loss-strategy-seed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from hescape.config import apply_overrides, load_params
    from hescape.train.run import train_run

    params = apply_overrides(load_params(args.params), args.overrides)
    run_id = train_run(args.panel, params, local=args.local, progress=not args.no_progress,
                       run_name=args.run_name)
    print(run_id)
    return 0
