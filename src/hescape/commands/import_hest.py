"""Turn a HEST-style directory (st/<id>.h5ad, wsis/<id>.<tif|png|jpg>, metadata/<id>.json) into a
curated panel.

One patch per spot is cut at a fixed physical size (default 112 µm) with each slide's µm/px and
resampled to a fixed pixel size (default 224 px), so every slide has the same field of view. Spots
whose patch leaves the image are dropped and counted. Splits are by donor (metadata ``patient``,
else the sample). Defaults come from the ``import_hest`` block of ``params.yaml`` when present
(``--set import_hest.key=value`` overrides it); the flags override both.

Example::

    hescape import-hest --src hest_subset --out data/panels/my-panel --test-samples TENX95 \\
        --val-samples TENX99
"""

from __future__ import annotations

import json

NAME = "import-hest"
HELP = "import a HEST-style directory (h5ad + WSI + metadata) as a curated panel"


def _samples(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="HEST-style directory with st/, wsis/ and metadata/")
    parser.add_argument("--out", required=True, help="curated panel directory to write")
    parser.add_argument("--name", help="panel name (default: the name of --src)")
    parser.add_argument("--genes", help="gene list fixing the genes and their order "
                                        "(default: the first sample's var_names)")
    parser.add_argument("--patch-um", type=float, help="patch side in micrometres (default 112)")
    parser.add_argument("--patch-px", type=int, help="stored patch side in pixels (default 224)")
    parser.add_argument("--test-samples", help="comma-separated sample ids for test")
    parser.add_argument("--val-samples", help="comma-separated sample ids for val")
    parser.add_argument("--seed", type=int, help="seed of the donor split when samples are not named (default 0)")
    parser.add_argument("--params", help="params.yaml to read the import_hest block from (default ./params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml value, e.g. --set import_hest.patch_um=56 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--json", action="store_true", help="print the import report as JSON")


def run(args) -> int:
    import dataclasses

    from hescape.config import apply_overrides, load_params, section
    from hescape.data.hest_import import HestImportConfig, import_hest

    config = section(apply_overrides(load_params(args.params), args.set), "import_hest", HestImportConfig)
    flags = {"patch_um": args.patch_um, "patch_px": args.patch_px, "seed": args.seed}
    config = dataclasses.replace(config, **{k: v for k, v in flags.items() if v is not None})
    report = import_hest(args.src, args.out, config=config, name=args.name, genes_file=args.genes,
                         test_samples=_samples(args.test_samples), val_samples=_samples(args.val_samples),
                         overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    meta = report.meta
    print(f"imported {meta.name} into {report.out_dir}  ({meta.content_hash})")
    print(f"  genes {meta.n_genes}, patch {meta.patch_size_um:g} um = {meta.patch_size_px} px "
          f"({meta.pixel_size_um:g} um/px)")
    print("  sample                                   donor                          split  kept  dropped")
    split_of = {sid: split for split, ids in report.splits.items() for sid in ids}
    for sid, n in report.spots_per_sample.items():
        print(f"  {sid:<40} {report.donors[sid][:30]:<30} {split_of[sid]:<6} {n:>5} "
              f"{report.dropped_outside_image[sid]:>8}")
    total = sum(report.dropped_outside_image.values())
    print(f"  spots dropped (patch outside the image): {total}")
    for sid, split in report.moved_with_donor.items():
        print(f"  {sid} follows its donor into {split}")
    return 0
