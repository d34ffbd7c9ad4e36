"""Print a curated panel's summary and validate every file, record and field.

Exits non-zero with the file, record and field of the first error; warnings (such as a donor
shared by train and test) are printed but do not fail.
"""

from __future__ import annotations

import json

NAME = "inspect"
HELP = "summarise and validate a curated panel directory"


def add_arguments(parser):
    parser.add_argument("panel", help="curated panel directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-images", action="store_true", help="skip decoding every image")


def run(args) -> int:
    from hescape.data.panel import summarize, validate_panel

    panel, report = validate_panel(args.panel, check_images=not args.no_images)
    summary = summarize(panel)
    summary["warnings"] = report.warnings
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"panel {summary['name']}  ({summary['content_hash']})")
    print(f"  spots {summary['n_spots']}, genes {summary['n_genes']}, patch {summary['patch_size_px']} px"
          f" = {summary['patch_size_um']} um, median counts/spot {summary['median_counts_per_spot']:.0f}")
    for key in ("spots_per_split", "spots_per_sample", "spots_per_donor", "spots_per_tissue"):
        print(f"  {key.replace('_', ' ')}:")
        for name, n in summary[key].items():
            print(f"    {name:<40} {n}")
    if summary["split_aliases"]:
        print(f"  split aliases: {summary['split_aliases']}")
    if summary["label_columns"]:
        print(f"  label columns: {', '.join(summary['label_columns'])}")
    for w in report.warnings:
        print(f"  warning: {w}")
    print("  valid: yes")
    return 0
