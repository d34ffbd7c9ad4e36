"""Epoch time of a frozen-trunk run with the feature cache vs the trunk recomputed at every step.

Both runs train the same heads on the same simulated panel with the same seed (no augmentation,
so both see identical inputs); only where the trunk features come from differs. Prints the ratio
(goal: at least 10x on CPU with resnet18 at 96 px). The one-off cost of filling the cache is
printed too, since it is paid once per (panel, encoder, transform) and reused by every later run.

    .venv/bin/python benchmarks/bench_feature_cache.py [--spots 1500] [--epochs 2] [--encoder resnet18]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def main() -> None:
    import torch

    from hescape.data.simulate import SimulationConfig, simulate_to_dir
    from hescape.train.loop import run_local
    from hescape.train.run import prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=1500)
    parser.add_argument("--px", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HESCAPE_TORCH_THREADS"] = str(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        simulate_to_dir(SimulationConfig(n_spots=args.spots, patch_px=args.px), tmp / "panel")
        epoch_times = {}
        for cached in (False, True):
            params = {
                "preprocess": {"image_size": args.px, "out_dir": str(tmp / "shards")},
                "train": {"image_encoder": args.encoder, "pretrained": False, "strategy": "frozen",
                          "feature_cache": cached, "augment": False, "epochs": args.epochs, "batch_size": 64,
                          "num_workers": 1, "cache_dir": str(tmp / "cache"), "patience": 100},
            }
            t0 = time.perf_counter()
            _, prepared = prepare(tmp / "panel", params, progress=False)
            prep = time.perf_counter() - t0
            result, _ = run_local(prepared.worker_config, tmp / f"ckpt-{cached}")
            times = [h["epoch_time_s"] for h in result["history"]]
            epoch_times[cached] = min(times)
            label = "cached features" if cached else "trunk recomputed"
            print(f"{label:>17}: epoch {min(times):7.2f} s (epochs {', '.join(f'{t:.2f}' for t in times)}); "
                  f"preparation {prep:.1f} s")
        ratio = epoch_times[False] / epoch_times[True]
        print(f"{args.encoder} at {args.px} px, {args.spots} spots: cached epochs are {ratio:.1f}x faster "
              f"({'meets' if ratio >= 10 else 'misses'} the 10x goal)")


if __name__ == "__main__":
    main()
