"""Time the known-answer simulator against its goal: 10,000 spots at 96 px in under 60 s on 2 cores.

Runs the two halves of ``simulate_to_dir`` (``simulate_panel``: drawing and PNG-encoding; then
``write_panel``: parquet and hashes) for (a) the default configuration (6,000 spots, 64 px) and
(b) 10,000 spots at 96 px. Prints spots/s, wall and CPU seconds, and the ratio of the wall time to
the 60 s goal (below 1 meets it). The baseline measured in the same run is the write step alone,
the floor any simulator pays. On a shared machine the wall time includes waiting for the cores:
the load average is printed, and CPU seconds / 2 is what an idle 2-core machine would take.

    .venv/bin/python benchmarks/bench_simulator.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

GOAL_S = 60.0  # for 10,000 spots at 96 px


def _time_case(cfg, root: Path) -> dict[str, float]:
    from hescape.data.panel import write_panel
    from hescape.data.simulate import simulate_panel

    wall0, cpu0 = time.perf_counter(), time.process_time()
    panel = simulate_panel(cfg)
    wall1 = time.perf_counter()
    out = root / f"{cfg.n_spots}-{cfg.patch_px}"
    write_panel(panel, out, overwrite=True, provenance={"source": "simulator"})
    wall2, cpu2 = time.perf_counter(), time.process_time()
    shutil.rmtree(out)
    return {"simulate": wall1 - wall0, "write": wall2 - wall1, "total": wall2 - wall0, "cpu": cpu2 - cpu0}


def main() -> None:
    from hescape.data.simulate import SimulationConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest counts")
    args = parser.parse_args()
    cases = {
        "defaults (6,000 spots, 64 px)": SimulationConfig(),
        "goal (10,000 spots, 96 px)": replace(SimulationConfig(), n_spots=10_000, patch_px=96),
    }
    print(f"cores visible: {os.cpu_count()}, load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        for label, cfg in cases.items():
            t = min((_time_case(cfg, Path(tmp)) for _ in range(max(1, args.repeat))), key=lambda r: r["total"])
            print(f"{label}: wall {t['total']:.1f} s = simulate {t['simulate']:.1f} s + write {t['write']:.1f} s; "
                  f"{cfg.n_spots / t['total']:.0f} spots/s; CPU {t['cpu']:.1f} s; "
                  f"total / write baseline {t['total'] / t['write']:.1f}x; "
                  f"wall / 60 s goal {t['total'] / GOAL_S:.2f}; CPU/2 / 60 s goal {t['cpu'] / 2 / GOAL_S:.2f}")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
