"""Build the benchmark report of an MLflow experiment from its evaluated training runs: the grid
(gene encoder x image encoder per loss and strategy; R@5 in the published within-batch protocol
and on the whole test split; probe scores; batch metrics), the known-answer checks, figures
(embedding maps by donor and tissue, Recall@k curves, training curves, grid heatmaps), report.md,
a self-contained report.html and grid.csv; logged as the artifacts of a report run.
"""

from __future__ import annotations

from hescape.commands._params import add_params_arguments

NAME = "report"
HELP = "benchmark grid, figures, Markdown and HTML report of an experiment's evaluated runs"


def add_arguments(parser):
    parser.add_argument("--experiment", required=True, help="MLflow experiment name, e.g. hescape/simulated")
    parser.add_argument("--out", required=True, help="output folder (replaced)")
    parser.add_argument("--projection", choices=["umap", "pca"], default=None,
                        help="embedding maps by UMAP (default) or PCA (fast)")
    add_params_arguments(parser, example="report.max_map_runs=2")
    parser.add_argument("--no-log", action="store_true", help="write the folder only; create no report run")


def run(args) -> int:
    import os

    from hescape.config import apply_overrides, load_params, section
    from hescape.report.build import ReportConfig, build_report

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    overrides = list(args.overrides) + ([f"report.projection={args.projection}"] if args.projection else [])
    cfg = section(apply_overrides(load_params(args.params), overrides), "report", ReportConfig)
    result = build_report(args.experiment, args.out, cfg, log_to_mlflow=not args.no_log)
    for note in result.notes:
        print(f"note: {note}")
    print(f"report of {result.n_runs} runs: {result.out_dir / 'report.html'} (and report.md, grid.csv, figures/)")
    if result.report_run_id:
        print(f"report run: {result.report_run_id}")
    return 0
