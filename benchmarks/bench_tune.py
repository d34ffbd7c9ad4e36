"""Time per tuning trial with the frozen-feature cache vs the frozen trunk recomputed at every step.

Runs the same small study twice on one simulated panel (same enqueued trial values, no pruning),
each trial through ``hescape tune``'s objective (``train_run``): once with ``train.feature_cache``
on (the default: trials train the heads only) and once with it off. The cache is filled before
timing; its one-off cost is printed separately. ``--ray`` runs the trials on Ray Train workers (as
``hescape tune`` does by default), which adds a fixed start-up cost per trial.

    .venv/bin/python benchmarks/bench_tune.py [--spots 3000] [--px 64] [--trials 3] [--epochs 3] [--ray]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    import optuna

    from hescape.data.simulate import SimulationConfig, simulate_to_dir
    from hescape.train.run import prepare
    from hescape.tune.study import run_study

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=3000)
    parser.add_argument("--px", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ray", action="store_true", help="trials on Ray Train workers (default: in-process)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["HESCAPE_ARTIFACT_ROOT"] = str(tmp / "mlartifacts")
        simulate_to_dir(SimulationConfig(n_spots=args.spots, patch_px=args.px), tmp / "panel")
        base = {
            "preprocess": {"image_size": args.px, "out_dir": str(tmp / "shards")},
            "train": {"augment": False, "num_workers": 2, "cache_dir": str(tmp / "cache"),
                      "storage_path": str(tmp / "ray")},
            "tune": {"epochs": args.epochs, "pruner": {"type": "none"}, "sampler": {"type": "random", "seed": 0},
                     "best_params_out": str(tmp / "{study}.yaml")},
        }
        t0 = time.perf_counter()
        prepare(tmp / "panel", base, progress=False)
        print(f"one-off: shards + feature cache in {time.perf_counter() - t0:.1f} s")
        per_trial = {}
        for cached in (True, False):
            name = f"cache-{'on' if cached else 'off'}"
            params = {**base, "train": {**base["train"], "feature_cache": cached}}
            storage = f"sqlite:///{tmp / 'optuna.db'}"
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
            for lr in (1e-3, 3e-4, 1e-4, 3e-3, 2e-3)[: args.trials]:
                study.enqueue_trial({"lr": lr, "image_head": "linear", "gene_head": "linear", "embed_dim": 128,
                                     "head_hidden": 256, "head_dropout": 0.1, "temperature": 0.07})
            result = run_study(tmp / "panel", params, study_name=name, trials=args.trials, storage=storage,
                               local=not args.ray)
            per_trial[cached] = result.elapsed_s / args.trials
            print(f"{name:>9}: {args.trials} trials in {result.elapsed_s:6.1f} s ({per_trial[cached]:.1f} s per trial), "
                  f"best {result.best_value:.4f}")
        mode = "Ray Train workers" if args.ray else "in-process"
        print(f"{args.spots} spots at {args.px} px, {args.epochs} epochs, {mode}: trials with the feature cache are "
              f"{per_trial[False] / per_trial[True]:.1f}x faster")


if __name__ == "__main__":
    main()
