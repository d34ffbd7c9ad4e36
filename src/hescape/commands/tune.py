"""Tune the contrastive temperature, the projection heads, the embedding size and the learning rate.

An Optuna study (search space, trials, epochs per trial, sampler, pruner: the `tune` block of
params.yaml) whose trials are short runs of `hescape train`'s training on Ray Train workers, pruned
per epoch on the validation mean of I2G and G2I global R@5. The study lives in an RDB storage
(`--storage`, else $OPTUNA_STORAGE_URL, else tune.storage: a SQLite file by default): run the command
again after an interruption to finish it, or start several on one storage to share the trials.
MLflow gets one parent run per study and one child run per trial; the best parameters are written
to tune.best_params_out as train.* overrides for the final training, and printed.
"""

from __future__ import annotations

from hescape.commands._params import add_params_arguments

NAME = "tune"
HELP = "Optuna study over temperature, heads, embedding size and lr; writes the best train.* overrides"


def add_arguments(parser):
    parser.add_argument("--panel", required=True, help="curated panel directory")
    parser.add_argument("--study", required=True, help="study name (shared by every process and restart)")
    parser.add_argument("--trials", type=int, default=None,
                        help="complete + pruned trials the study should hold in the end (default: tune.trials)")
    parser.add_argument("--storage", default=None,
                        help="Optuna RDB URL (default: $OPTUNA_STORAGE_URL, else tune.storage)")
    add_params_arguments(parser, example="tune.epochs=3")
    parser.add_argument("--best-params-out", default=None,
                        help="where to write the best parameters (default: tune.best_params_out)")
    parser.add_argument("--local", action="store_true",
                        help="train each trial in this process instead of on Ray workers (debugging)")
    parser.add_argument("--progress", action="store_true", help="progress bars while filling caches")


def run(args) -> int:
    from hescape.config import apply_overrides, load_params
    from hescape.tune.study import run_study

    params = apply_overrides(load_params(args.params), args.overrides)
    try:
        result = run_study(args.panel, params, study_name=args.study, trials=args.trials, storage=args.storage,
                           local=args.local, progress=args.progress, best_params_out=args.best_params_out)
    except KeyboardInterrupt:
        import sys

        print(f"hescape tune: interrupted; run the same command again to continue study {args.study!r}",
              file=sys.stderr)
        return 130
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(result.counts.items()))
    print(f"study {result.study_name}: {counts}; {result.ran_here} trial(s) run here in {result.elapsed_s:.1f} s")
    print(f"best value {result.best_value:.4f} (trial {result.best_trial})")
    for item in result.overrides:
        print(f"  {item}")
    print(f"best parameters: {result.best_params_path}")
    print(f"mlflow parent run: {result.parent_run_id}")
    return 0
