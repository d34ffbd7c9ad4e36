"""Write a curated panel of a simulated, known-answer Xenium-like dataset.

Parameters come from the ``simulate`` block of params.yaml (when the file exists), then ``--set
simulate.key=value`` overrides, then the shortcut flags. The true per-spot cell-type composition,
dominant cell type and the sample-level ``mutation`` label are stored with the panel.
"""

from __future__ import annotations

import dataclasses
import time

NAME = "simulate"
HELP = "simulate a known-answer Xenium-like curated panel"

# flag -> SimulationConfig field
_SHORTCUTS = {
    "spots": "n_spots",
    "samples": "n_samples",
    "donors": "n_donors",
    "patch_px": "patch_px",
    "seed": "seed",
    "genes_file": "genes_file",
}


def add_arguments(parser):
    parser.add_argument("--out", required=True, help="curated panel directory to write")
    parser.add_argument("--params", default=None, help="params file (default: $HESCAPE_PARAMS or ./params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="simulate.KEY=VALUE",
                        help="override a parameter (repeatable)")
    parser.add_argument("--spots", type=int, help="number of spots (simulate.n_spots)")
    parser.add_argument("--samples", type=int, help="number of samples (simulate.n_samples)")
    parser.add_argument("--donors", type=int, help="number of donors (simulate.n_donors)")
    parser.add_argument("--patch-px", type=int, help="patch side in pixels (simulate.patch_px)")
    parser.add_argument("--seed", type=int, help="random seed (simulate.seed)")
    parser.add_argument("--genes-file", help="real panel gene list to use (simulate.genes_file)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")


def build_config(args):
    """The :class:`SimulationConfig` of params.yaml + ``--set`` overrides + flags."""
    from hescape.config import apply_overrides, load_params, section
    from hescape.data.simulate import SimulationConfig, check_config

    params = apply_overrides(load_params(args.params), args.set)
    cfg = section(params, "simulate", SimulationConfig)
    flags = {field: getattr(args, flag) for flag, field in _SHORTCUTS.items() if getattr(args, flag) is not None}
    cfg = dataclasses.replace(cfg, **flags)
    check_config(cfg)
    return cfg


def run(args) -> int:
    from pathlib import Path

    from hescape.data.simulate import simulate_to_dir

    cfg = build_config(args)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    start = time.perf_counter()
    meta = simulate_to_dir(cfg, out, overwrite=args.overwrite, progress=args.progress)
    elapsed = time.perf_counter() - start
    n_spots = sum(f["n_records"] for f in meta.files)
    n_samples = sum(len(ids) for ids in meta.splits.values())
    print(f"simulated {n_spots} spots, {n_samples} samples, {cfg.n_donors} donors, {meta.n_genes} genes, "
          f"{meta.patch_size_px} px patches -> {out} in {elapsed:.1f} s")
    return 0
