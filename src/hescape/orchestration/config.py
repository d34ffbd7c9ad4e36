"""The ``pipeline`` block of ``params.yaml``: what the benchmark pipeline runs.

The grid and the choice to tune are fixed when the pipeline is compiled (a static ``ParallelFor``
list and a compile-time branch); every other value is a default of a pipeline parameter that a run
may change (in the Kubeflow UI, ``hescape pipeline submit``, or ``hescape pipeline run-local``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hescape.errors import ConfigError


@dataclass
class GridEntry:
    """One pretraining run of the benchmark grid (``train.*`` values)."""

    image_encoder: str = "efficientnet_lite0"
    gene_encoder: str = "mlp"
    loss: str = "clip"
    strategy: str = "frozen"


def _default_grid() -> list[GridEntry]:
    return [GridEntry(loss="clip"), GridEntry(loss="siglip")]


@dataclass
class PipelineConfig:
    """The ``pipeline`` block.

    Attributes
    ----------
    panel
        Curated panel directory (DVC-tracked), e.g. ``data/panels/simulated``.
    experiment
        MLflow experiment of the runs and the report; ``""`` = ``hescape/<panel name>``.
    grid
        The (image encoder, gene encoder, loss, strategy) entries, one pretraining run each.
    tune
        Tune each grid entry (``hescape tune``) before its final run (decided at compile time).
    tune_trials
        Optuna trials per grid entry when ``tune`` is on.
    execution_mode
        ``local`` (in-process, local Ray) or ``cluster`` (KubeRay RayJobs).
    parallelism
        Grid entries run at once (``ParallelFor(parallelism=...)``; 1 on a laptop).
    train_overrides
        ``train.*=value`` overrides for every run (before the grid's and the tuned ones).
    evaluate_overrides, report_overrides
        ``--set`` overrides of every ``hescape evaluate`` / ``hescape report`` of the pipeline
        (e.g. ``evaluate.checkpoints=[best]`` for a quicker local run).
    cluster_overrides
        Extra overrides of cluster runs only. Cluster runs already keep the shards, the feature
        cache and Ray Train's storage on the RayJob's shared volume (``/app/data``; see
        ``steps.CLUSTER_SHARED_OVERRIDES``); an override here of the same key wins (it must name a
        path that every pod of the RayJob sees).
    select_metric, select_direction
        How the register step chooses the best run (``max``/``min``); runs without the metric fall
        back to the lowest ``best_val_loss``.
    report_dir
        Where the report step writes report.html/report.md (also KFP HTML/Markdown artifacts).
    pipeline_root
        kfp.local's artifact root of local runs.
    in_process
        Local mode only: train in the step's own process (no Ray), for quick checks.
    namespace, rayjob_template, ray_image, worker_replicas, gpus_per_worker, rayjob_timeout_s
        Cluster mode: where and how the RayJobs run (``""``/``-1`` keep the template's settings).
    """

    panel: str = "data/panels/simulated"
    experiment: str = ""
    grid: list[GridEntry] = field(default_factory=_default_grid)
    tune: bool = False
    tune_trials: int = 2
    execution_mode: str = "local"
    parallelism: int = 1
    train_overrides: list[str] = field(default_factory=list)
    evaluate_overrides: list[str] = field(default_factory=list)
    report_overrides: list[str] = field(default_factory=list)
    cluster_overrides: list[str] = field(default_factory=list)
    select_metric: str = "test_best_global_i2g_R_at_5"  # hescape.evaluate.run.HEADLINE
    select_direction: str = "max"
    report_dir: str = "runs/report"
    pipeline_root: str = "runs/kfp"
    in_process: bool = False
    namespace: str = "hescape"
    rayjob_template: str = "hescape-train-template"
    ray_image: str = ""
    worker_replicas: int = -1
    gpus_per_worker: int = -1
    rayjob_timeout_s: int = 6 * 3600

    def __post_init__(self):
        if self.execution_mode not in ("local", "cluster"):
            raise ConfigError(f"pipeline.execution_mode {self.execution_mode!r}: expected 'local' or 'cluster'")
        if self.select_direction not in ("max", "min"):
            raise ConfigError(f"pipeline.select_direction {self.select_direction!r}: expected 'max' or 'min'")
        if not self.grid:
            raise ConfigError("pipeline.grid is empty: list at least one {image_encoder, gene_encoder, loss, strategy}")
        if self.parallelism < 1:
            raise ConfigError("pipeline.parallelism must be >= 1")
        for item in self.train_overrides + self.evaluate_overrides + self.report_overrides + self.cluster_overrides:
            if "=" not in item:
                raise ConfigError(f"pipeline overrides: {item!r} is not of the form key=value")

    def grid_items(self) -> list[dict[str, str]]:
        """The grid as the ``ParallelFor`` items (string values)."""
        return [{k: str(v) for k, v in asdict(entry).items()} for entry in self.grid]


def pipeline_config(params: dict) -> PipelineConfig:
    """The typed ``pipeline`` block of ``params`` (defaults when absent)."""
    from hescape.config import section

    return section(params, "pipeline", PipelineConfig)
