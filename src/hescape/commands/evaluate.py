"""Evaluate a training run: retrieval in both protocols (published within-batch and whole test
split), expression and slide-label probes and batch-effect metrics before vs after alignment, and
the known-answer checks on simulated panels; for the best checkpoint and the last one.

Writes metrics.json and embeddings_test.npz to --out (default runs/evaluate/<run id>), logs every
metric to the run (test_best_..., test_last_..., test_oracle_...) and both files as artifacts.
"""

from __future__ import annotations

from hescape.commands._params import add_params_arguments

NAME = "evaluate"
HELP = "evaluate a training run (best and last checkpoint); writes metrics.json and logs to MLflow"


def add_arguments(parser):
    parser.add_argument("--run", dest="run_id", required=True, help="MLflow run id of a training run")
    parser.add_argument("--out", default=None, help="output folder (default: <evaluate.out_dir>/<run id>)")
    parser.add_argument("--checkpoint", choices=["best", "last", "both"], default=None,
                        help="which checkpoint(s) to evaluate (default: evaluate.checkpoints, i.e. both)")
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray tasks embedding each split in parallel (1: in-process; 0: one per GPU/CPU)")
    add_params_arguments(parser, example="evaluate.bootstrap=200")
    parser.add_argument("--no-log", action="store_true", help="write the files only; log nothing to MLflow")


def run(args) -> int:
    import os
    from pathlib import Path

    from hescape.config import apply_overrides, load_params, section
    from hescape.evaluate.run import METRICS_FILE, EvaluateConfig, evaluate_run, summary_lines

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append("evaluate.checkpoints=" + ("[best, last]" if args.checkpoint == "both"
                                                    else f"[{args.checkpoint}]"))
    if args.workers is not None:
        overrides.append(f"evaluate.n_workers={args.workers}")
    params = apply_overrides(load_params(args.params), overrides)
    cfg = section(params, "evaluate", EvaluateConfig)
    out = Path(args.out) if args.out else Path(cfg.out_dir) / args.run_id
    result = evaluate_run(args.run_id, cfg, out_dir=out, log_to_mlflow=not args.no_log)
    print("\n".join(summary_lines(result)))
    print(f"metrics: {out / METRICS_FILE}")
    return 0
