"""Turn a download of the Hugging Face dataset ``Peng-AI/hescape-pyarrow`` into a curated panel.

Reads the parquet files of the panel's config (ClassLabel columns decoded from the schema's
features metadata), applies the panel's record filter, keeps the samples of the protocol's splits
(or of ``--splits-dir`` tables), assigns donors, checks every record and writes the panel
atomically. Samples and records left out are reported.

Example::

    hescape import-hf --src hescape-pyarrow --panel human-breast-panel \\
        --genes human-breast-panel.genes.tsv --out data/panels/human-breast-panel
"""

from __future__ import annotations

import json

NAME = "import-hf"
HELP = "import a Peng-AI/hescape-pyarrow download as a curated panel"


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="download directory (<src>/<config>/train-*.parquet)")
    parser.add_argument("--panel", required=True, help="panel (config) name, e.g. human-breast-panel")
    parser.add_argument("--genes", required=True,
                        help="gene list in gexp order: TSV with 'symbol' (and 'ensembl_id'), or one symbol a line")
    parser.add_argument("--out", required=True, help="curated panel directory to write")
    parser.add_argument("--splits-dir", help="HESCAPE split tables {train,val,test}.csv overriding the registry's "
                                             "splits and patients; their pixel sizes go to the provenance")
    parser.add_argument("--allow-missing-samples", action="store_true",
                        help="import even if some split samples have no records (they leave the splits)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--json", action="store_true", help="print the import report as JSON")


def _print_counts(title: str, counts: dict[str, int]) -> None:
    if counts:
        print(f"  {title}:")
        for name, n in counts.items():
            print(f"    {name:<40} {n}")


def run(args) -> int:
    from hescape.data.hf_import import import_hf

    report = import_hf(args.src, args.panel, args.genes, args.out, splits_dir=args.splits_dir,
                       allow_missing=args.allow_missing_samples, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    meta = report.meta
    print(f"imported {meta.name} into {report.out_dir}  ({meta.content_hash})")
    print(f"  files {len(report.files)}, records read {report.n_read}, kept {report.n_kept}, "
          f"genes {meta.n_genes}, patch {meta.patch_size_px} px")
    _print_counts("spots per split", report.spots_per_split)
    _print_counts("spots per sample", report.spots_per_sample)
    _print_counts("dropped by the record filter (sample: records)", report.dropped_by_filter)
    _print_counts("dropped, sample in no split (sample: records)", report.dropped_not_in_splits)
    if report.missing_samples:
        print(f"  split samples without records (removed): {', '.join(report.missing_samples)}")
    if meta.split_aliases:
        print(f"  split aliases: {meta.split_aliases}")
    return 0
