"""``hescape evaluate``: the evaluation driver of one training run.

For the best checkpoint (and the last one, labelled as such) of an MLflow training run:

1. embed every split (the test split for retrieval; train, val and test for the probes and the
   batch metrics), on Ray workers over contiguous row chunks when ``n_workers > 1``;
2. retrieval on the whole test split in both protocols (the published within-batch one and the
   global one), image-to-gene and gene-to-image, plus Recall@k curves;
3. the expression probe (image trunk features vs aligned image embeddings, train -> test), the
   slide-label probe (per-sample pooled embeddings, donor-grouped folds) before vs after
   alignment, and batch-effect metrics before vs after for both modalities;
4. the known-answer checks when the panel has ground truth (the simulator's composition);
5. ``metrics.json`` (nested, plus a flat view) and the test embeddings (``embeddings_test.npz``)
   written to the output folder; the flat metrics logged to the same MLflow run
   (``test_best_...``, ``test_last_...``, ``test_oracle_...``) and both files logged as artifacts
   under ``evaluation/``.

Every metric is computed once on the gathered embeddings of the whole split; nothing is averaged
over workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from hescape.data import keys
from hescape.errors import ConfigError, DataError
from hescape.evaluate.known_answer import checks, known_answer_retrieval
from hescape.evaluate.retrieval import KS, batch_retrieval, flatten, summarize_ranks, true_partner_ranks
from hescape.io import atomic_dir, write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
EMBEDDINGS_FILE = "embeddings_test.npz"
ARTIFACT_DIR = "evaluation"
TAG_EVALUATED = "hescape.evaluated"  # which checkpoints were evaluated, e.g. "best,last"
CHECKPOINTS = ("best", "last")
# The key every evaluated run carries; the report selects runs on it.
HEADLINE = "test_best_global_i2g_R_at_5"


@dataclass
class EvaluateConfig:
    """The ``evaluate`` block of params.yaml.

    Attributes
    ----------
    checkpoints
        Which checkpoints of the run to evaluate: ``best`` and/or ``last``.
    batch_size
        Mini-batch size of the published within-batch retrieval protocol (64 in the paper).
    chunk_size
        Queries per block of the global retrieval (memory ``chunk_size x N``).
    max_k
        Recall@k curves run over ``k = 1..max_k``.
    embed_batch_size
        Rows per forward pass while embedding.
    n_workers
        Ray tasks that embed a split in parallel (contiguous row chunks); ``1`` embeds in-process,
        ``0`` takes one per GPU (``use_gpu``) or CPU of the Ray cluster.
    use_gpu
        One GPU per embedding task.
    cpus_per_worker
        CPU share of an embedding task on CPU (fractional, so small machines still schedule).
    hvg
        Number of most variable genes (training split) the expression probe predicts.
    target_sum
        Library size the probe's targets are normalised to before log1p; ``None``: the median
        total count of the training spots.
    bootstrap
        Bootstrap resamples of the slide-label AUROC confidence interval.
    label_columns
        Sample-level labels for the slide-label probe; ``None``: the panel's ``label_columns``.
    batch_keys, label_keys
        ``obs`` columns treated as batches (mixing) and as biology (conservation) by the batch
        metrics; columns the panel lacks or with one value only are skipped.
    batch_splits
        Splits pooled for the batch metrics and the slide-label probe (a test split often holds a
        single donor, too few for either).
    max_batch_cells
        Spots subsampled (seeded, stratified by sample) for the batch metrics; they cost O(N log N)
        to O(N^2).
    oracle_noise
        Noise of the noisy composition oracle, in units of each cell type's standard deviation.
    seed
        Seed of every subsample and of the oracle noise.
    save_embeddings
        Write the test embeddings (``embeddings_test.npz``) for the report's UMAPs.
    out_dir
        Root of the local output folders (``<out_dir>/<run_id>``) when ``--out`` is not given.
    """

    checkpoints: list[str] = field(default_factory=lambda: list(CHECKPOINTS))
    batch_size: int = 64
    chunk_size: int = 2048
    max_k: int = 50
    embed_batch_size: int = 256
    n_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    hvg: int = 50
    target_sum: float | None = None
    bootstrap: int = 1000
    label_columns: list[str] | None = None
    batch_keys: list[str] = field(default_factory=lambda: [keys.SAMPLE, keys.DONOR])
    label_keys: list[str] = field(default_factory=lambda: [keys.TISSUE, keys.CELL_TYPE])
    batch_splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    max_batch_cells: int = 2000
    oracle_noise: float = 1.0
    seed: int = 0
    save_embeddings: bool = True
    out_dir: str = "runs/evaluate"

    def __post_init__(self):
        bad = [c for c in self.checkpoints if c not in CHECKPOINTS]
        if bad or not self.checkpoints:
            raise ConfigError(f"evaluate.checkpoints: {self.checkpoints!r}; choose from {list(CHECKPOINTS)}")


#  Retrieval with curves


def global_with_curves(image: np.ndarray, gene: np.ndarray, *, normalize: bool, chunk_size: int,
                       max_k: int) -> tuple[dict, dict]:
    """Global retrieval both ways from one ranking pass, and Recall@k for ``k = 1..max_k``."""
    n = len(image)
    result, curves = {}, {}
    for direction, (q, c) in {"I2G": (image, gene), "G2I": (gene, image)}.items():
        ranks = true_partner_ranks(q, c, normalize=normalize, chunk_size=chunk_size)
        result[direction] = summarize_ranks(ranks, n, KS)
        curves[direction] = [float(np.mean(ranks <= k)) for k in range(1, max_k + 1)]
    return result, curves


def batch_curves(image: np.ndarray, gene: np.ndarray, *, normalize: bool, batch_size: int,
                 max_k: int) -> dict:
    """Recall@k curves of the within-batch protocol (per-batch recall, averaged over batches)."""
    per_batch = {"I2G": [], "G2I": []}
    ks = np.arange(1, max_k + 1)
    for start in range(0, len(image), batch_size):
        img, gene_b = image[start:start + batch_size], gene[start:start + batch_size]
        if len(img) < 2:
            continue
        for direction, (q, c) in {"I2G": (img, gene_b), "G2I": (gene_b, img)}.items():
            ranks = true_partner_ranks(q, c, normalize=normalize)
            per_batch[direction].append((ranks[None, :] <= ks[:, None]).mean(axis=1))
    return {d: np.mean(v, axis=0).tolist() if v else [] for d, v in per_batch.items()}


#  Adapters onto the probe and batch-metric functions (hescape.evaluate.*)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)
    return h.hexdigest()


def _memo(cache: dict | None, key: tuple, compute):
    """Reuse a score computed on byte-identical inputs: a frozen trunk's features are the same for
    the best and the last checkpoint, so their probes and batch metrics are computed once."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def expression_probes(train_feats: dict[str, np.ndarray], test_feats: dict[str, np.ndarray], train_counts,
                      test_counts, genes: list[str], train_groups, test_groups, cfg: EvaluateConfig, *,
                      cache: dict | None = None) -> dict:
    """Expression probe (train -> test) of every named feature set, on the same genes and targets."""
    from hescape.evaluate.expression_probe import expression_probe, median_total, select_hvg

    train_counts, test_counts = np.asarray(train_counts), np.asarray(test_counts)
    hvg_idx = select_hvg(train_counts, genes, n_top=min(cfg.hvg, len(genes)))
    target_sum = cfg.target_sum or median_total(train_counts)
    out = {}
    for name, train_x in train_feats.items():
        # Donor groups on both sides make the probe refuse a donor seen in training.
        compute = partial(expression_probe, train_x, train_counts, test_feats[name], test_counts, hvg_idx=hvg_idx,
                          target_sum=target_sum, genes=genes, groups_train=train_groups, groups_test=test_groups,
                          seed=cfg.seed)
        out[name] = _memo(cache, ("expr", name, _digest(train_x, test_feats[name])), compute)
    out["genes"] = [genes[i] for i in np.asarray(hvg_idx).tolist()]
    out["target_sum"] = target_sum
    return out


def slide_probes(feats: dict[str, np.ndarray], obs: pd.DataFrame, label_columns: list[str],
                 cfg: EvaluateConfig, *, cache: dict | None = None) -> dict:
    """Slide-label probe per label column and feature set (embeddings pooled per sample inside)."""
    from hescape.evaluate.slide_probe import slide_label_probe

    out = {}
    groups = obs[keys.DONOR].to_numpy() if keys.DONOR in obs else None
    for column in label_columns:
        if column not in obs:
            out[column] = {"skipped": f"no column {column!r} in the shards' obs"}
            continue
        labels = obs[column].to_numpy()
        per_sample = pd.Series(labels).groupby(obs[keys.SAMPLE].to_numpy()).first()
        if per_sample.nunique() < 2:
            out[column] = {"skipped": f"{column!r} has a single value over the pooled samples"}
            continue
        out[column] = {}
        for name, x in feats.items():
            try:
                compute = partial(slide_label_probe, x, obs[keys.SAMPLE].to_numpy(), labels, groups=groups,
                                  n_bootstrap=cfg.bootstrap, seed=cfg.seed)
                out[column][name] = _memo(cache, ("slide", column, name, _digest(x)), compute)
            except (ValueError, DataError) as exc:  # e.g. non-finite embeddings of a diverged run
                out[column][name] = {"skipped": str(exc)}
    return out


def batch_metrics(feats: dict[str, np.ndarray], obs: pd.DataFrame, cfg: EvaluateConfig, *,
                  cache: dict | None = None) -> dict:
    """Batch-effect metrics of every feature set on the same (sub)sample of spots."""
    from hescape.evaluate.batch_metrics import batch_report

    batch_keys = tuple(k for k in cfg.batch_keys if k in obs and obs[k].nunique() > 1)
    label_keys = tuple(k for k in cfg.label_keys if k in obs and obs[k].nunique() > 1)
    if not batch_keys:
        return {"skipped": f"none of {cfg.batch_keys} has two or more values"}
    # Unit-normalised, as retrieval and the contrastive loss see the embeddings (their norms carry
    # no meaning); the caller has already subsampled (stratified by sample), so max_cells=None.
    obs = obs.reset_index(drop=True)
    report = {}
    for name, x in feats.items():  # one call per feature set, so a frozen trunk's scores are reused
        compute = partial(batch_report, {name: x}, obs, batch_keys=batch_keys, label_keys=label_keys, max_cells=None,
                          seed=cfg.seed, normalize=True)
        report.update(_memo(cache, ("batch", name, _digest(x)), compute))
    return {"batch_keys": list(batch_keys), "label_keys": list(label_keys), "n_spots": len(obs), "normalized": True,
            "metrics": report}


def stratified_subsample(obs: pd.DataFrame, n_max: int, seed: int) -> np.ndarray:
    """Row indices (sorted) of at most ``n_max`` spots, the same share from every sample."""
    n = len(obs)
    if n <= n_max:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    share = n_max / n
    picks = []
    for rows in obs.groupby(keys.SAMPLE, sort=True).indices.values():
        k = max(1, round(len(rows) * share))
        picks.append(rng.choice(rows, size=min(k, len(rows)), replace=False))
    return np.sort(np.concatenate(picks))


#  The driver


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clean(obj):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to ``None``."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


_KEY_OK = re.compile(r"[^0-9A-Za-z_\-. /]")


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name from parts (``@`` -> ``_at_``, other odd characters -> ``_``)."""
    return _KEY_OK.sub("_", "_".join(p for p in parts if p).replace("@", "_at_"))


def flat_metrics(result: dict) -> dict[str, float]:
    """The flat view of ``metrics.json``: scalar metrics under MLflow-safe names.

    ``test_<ckpt>_<protocol>_<dir>_<metric>`` for retrieval, ``test_<ckpt>_expr_<features>_<stat>``,
    ``test_<ckpt>_slide_<label>_<features>_<stat>``, ``test_<ckpt>_batchfx_<features>_<metric>``, and
    ``test_<oracle|oracle_noisy|random>_<protocol>_<dir>_<metric>`` for the known-answer checks.
    """
    flat: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, (bool, np.bool_)):
            value = float(value)
        if isinstance(value, (int, float, np.integer, np.floating)) and value is not None:
            flat[metric_key(key)] = float(value)

    for which, res in result.get("checkpoints", {}).items():
        prefix = f"test_{which}"
        for protocol in ("batch", "global"):
            for key, value in flatten(res["retrieval"][protocol], f"{prefix}_{protocol}").items():
                put(key, value)
        put(f"{prefix}_epoch", res.get("epoch"))
        for name, probe in (res.get("expression_probe") or {}).items():
            if isinstance(probe, dict):
                for stat in ("mean", "std"):
                    put(f"{prefix}_expr_{name}_{stat}", probe.get(stat))
        for label, per_feat in (res.get("slide_probe") or {}).items():
            for name, probe in per_feat.items():
                if isinstance(probe, dict):
                    for stat in ("auroc", "ci_low", "ci_high"):
                        put(f"{prefix}_slide_{label}_{name}_{stat}", probe.get(stat))
        batch = (res.get("batch_metrics") or {}).get("metrics") or {}
        for key, value in batch.items():
            put(f"{prefix}_batchfx_{key}", value)
    for name, res in (result.get("known_answer") or {}).items():
        if isinstance(res, dict):
            for protocol in ("batch", "global"):
                for key, value in flatten(res[protocol], f"test_{name}_{protocol}").items():
                    put(key, value)
    return flat


@dataclass
class _Checkpoint:
    which: str
    path: Path
    info: dict
    digest: str


def _download(run_id: str, which: list[str], dst: Path) -> list[_Checkpoint]:
    from hescape.train.loop import INFO_FILE, MODEL_FILE
    from hescape.train.run import download_checkpoint

    out = []
    for name in which:
        try:
            path = download_checkpoint(run_id, name, dst / name)
        except Exception as exc:  # MLflow raises several types for a missing artifact
            if name == "best":
                raise DataError(f"run {run_id} has no checkpoints/best artifact ({exc})") from exc
            log.warning("run %s: no checkpoints/%s (%s); skipped", run_id, name, exc)
            continue
        info = json.loads((path / INFO_FILE).read_text())
        out.append(_Checkpoint(name, path, info, _sha256(path / MODEL_FILE)))
    return out


def _pooled_obs(shards, splits: list[str]) -> pd.DataFrame:
    parts = []
    for split in splits:
        obs = shards.split(split).obs.reset_index(drop=True).copy()
        obs[keys.SPLIT] = split
        parts.append(obs)
    return pd.concat(parts, ignore_index=True)


def evaluate_checkpoint(ckpt: _Checkpoint, shards, splits: list[str], cfg: EvaluateConfig, *,
                        label_columns: list[str], cache: dict | None = None) -> tuple[dict, dict]:
    """All metrics of one checkpoint; also returns the test embeddings (for the npz)."""
    from hescape.evaluate.embed import embed_with_ray, n_workers_for

    normalize = bool(ckpt.info["train"].get("normalize", True))
    n_workers = n_workers_for(cfg.n_workers, use_gpu=cfg.use_gpu) if cfg.n_workers != 1 else 1
    emb, timings = {}, {}
    for split in splits:
        t0 = time.perf_counter()
        emb[split] = embed_with_ray(ckpt.path, split, n_workers, use_gpu=cfg.use_gpu,
                                    batch_size=cfg.embed_batch_size, cpus_per_worker=cfg.cpus_per_worker,
                                    n_rows=int(shards.manifest["sizes"].get(split, 0)) or None)
        timings[f"embed_{split}_s"] = time.perf_counter() - t0
    test = emb["test"]
    res: dict = {"epoch": ckpt.info.get("epoch"), "train_metrics": ckpt.info.get("metrics"),
                 "model_sha256": ckpt.digest, "n_workers": n_workers, "normalize": normalize}

    t0 = time.perf_counter()
    res["retrieval"] = {"batch": batch_retrieval(test.image, test.gene, batch_size=cfg.batch_size,
                                                 normalize=normalize)}
    res["retrieval"]["global"], global_curves = global_with_curves(
        test.image, test.gene, normalize=normalize, chunk_size=cfg.chunk_size, max_k=cfg.max_k)
    res["curves"] = {"k": list(range(1, cfg.max_k + 1)), "global": global_curves,
                     "batch": batch_curves(test.image, test.gene, normalize=normalize, batch_size=cfg.batch_size,
                                           max_k=min(cfg.max_k, cfg.batch_size))}
    timings["retrieval_s"] = time.perf_counter() - t0

    # Expression probe: does an image embedding still predict expression after alignment?
    t0 = time.perf_counter()
    if "train" in emb and test.image_trunk is not None:
        train_obs, test_obs = shards.split("train").obs, shards.split("test").obs
        donors = keys.DONOR in train_obs and keys.DONOR in test_obs
        res["expression_probe"] = expression_probes(
            {"image_trunk": emb["train"].image_trunk, "image": emb["train"].image},
            {"image_trunk": test.image_trunk, "image": test.image},
            shards.split("train").counts, shards.split("test").counts, shards.genes,
            train_obs[keys.DONOR].to_numpy() if donors else None, test_obs[keys.DONOR].to_numpy() if donors else None,
            cfg, cache=cache)
    timings["expression_probe_s"] = time.perf_counter() - t0

    pool = [s for s in cfg.batch_splits if s in emb]
    obs = _pooled_obs(shards, pool)
    feats = {name: np.concatenate([getattr(emb[s], name) for s in pool]) for name in
             ("image_trunk", "image", "gene_trunk", "gene") if all(getattr(emb[s], name) is not None for s in pool)}
    t0 = time.perf_counter()
    res["slide_probe"] = slide_probes(feats, obs, label_columns, cfg, cache=cache) if label_columns else {}
    timings["slide_probe_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    idx = stratified_subsample(obs, cfg.max_batch_cells, cfg.seed)
    res["batch_metrics"] = batch_metrics({k: v[idx] for k, v in feats.items()}, obs.iloc[idx], cfg, cache=cache)
    res["batch_metrics"]["splits"] = pool
    timings["batch_metrics_s"] = time.perf_counter() - t0
    res["timings"] = timings
    return res, {"image": test.image, "gene": test.gene}


def evaluate_run(run_id: str, cfg: EvaluateConfig | None = None, *, out_dir: str | Path | None = None,
                 log_to_mlflow: bool = True) -> dict:
    """Evaluate a training run; returns the ``metrics.json`` content (see the module docstring)."""
    from mlflow.tracking import MlflowClient

    from hescape import tracking
    from hescape.data.shards import Shards

    cfg = cfg or EvaluateConfig()
    t_start = time.perf_counter()
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking.tracking_uri())
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"no MLflow run {run_id!r} in {tracking.tracking_uri()}") from exc
    out_dir = Path(out_dir or Path(cfg.out_dir) / run_id)
    with tempfile.TemporaryDirectory(prefix="hescape-eval-") as tmp:
        ckpts = _download(run_id, cfg.checkpoints, Path(tmp))
        shards = Shards(ckpts[0].info["shards"])
        aliases = shards.manifest.get("split_aliases") or {}
        # An aliased split (skin: val = test) is the same rows; embedding it twice would double-count.
        splits = sorted({aliases.get(s, s) for s in ("train", "val", "test")
                         if s in shards.manifest["sizes"] or s in aliases}, key=["train", "val", "test"].index)
        if "test" not in splits:
            raise DataError("the run's shards have no test split", file=shards.root)
        label_columns = cfg.label_columns if cfg.label_columns is not None else list(
            shards.manifest.get("label_columns") or [keys.MUTATION])

        result: dict = {
            "run_id": run_id,
            "run_name": run.info.run_name,
            "panel": shards.manifest.get("panel_name"),
            "tags": {k: v for k, v in run.data.tags.items() if k.startswith("hescape.")},
            "config": asdict(cfg),
            "shards": str(shards.root),
            "n_spots": {s: int(shards.manifest["sizes"].get(s, 0)) for s in splits},
            "label_columns": label_columns,
            "image_trunk_is_pretrained": ckpts[0].info["train"].get("strategy") == "frozen",
            "checkpoints": {},
        }
        test_embeddings: dict[str, dict] = {}
        done: dict[str, str] = {}
        cache: dict = {}
        for ckpt in ckpts:
            if ckpt.digest in done:  # the last epoch was the best: same weights, same numbers
                same = done[ckpt.digest]
                result["checkpoints"][ckpt.which] = {**result["checkpoints"][same], "same_as": same}
                test_embeddings[ckpt.which] = test_embeddings[same]
                continue
            log.info("evaluating checkpoint %s (epoch %s)", ckpt.which, ckpt.info.get("epoch"))
            result["checkpoints"][ckpt.which], test_embeddings[ckpt.which] = evaluate_checkpoint(
                ckpt, shards, splits, cfg, label_columns=label_columns, cache=cache)
            done[ckpt.digest] = ckpt.which

    test = shards.split("test")
    composition = test.obsm.get(keys.COMPOSITION)
    if composition is not None:
        result["known_answer"] = known_answer_retrieval(composition, noise=cfg.oracle_noise, seed=cfg.seed,
                                                        batch_size=cfg.batch_size, chunk_size=cfg.chunk_size)
    first = result["checkpoints"].get("best") or next(iter(result["checkpoints"].values()))
    result["checks"] = checks(result.get("known_answer"), first["retrieval"])
    result["elapsed_s"] = time.perf_counter() - t_start
    result = _clean(result)
    result["flat"] = flat_metrics(result)

    with atomic_dir(out_dir, overwrite=True) as tmp_out:
        write_json(tmp_out / METRICS_FILE, result)
        if cfg.save_embeddings:
            # Fixed-width unicode, not object arrays: the report loads these with allow_pickle=False.
            obs_cols = {f"obs_{c}": np.asarray(test.obs[c].astype(str).tolist(), dtype=str) for c in
                        (keys.SAMPLE, keys.DONOR, keys.TISSUE, keys.CELL_TYPE) if c in test.obs}
            arrays = {f"{which}_{mod}": np.asarray(e[mod], np.float32)
                      for which, e in test_embeddings.items() for mod in ("image", "gene")}
            np.savez_compressed(tmp_out / EMBEDDINGS_FILE, **arrays, **obs_cols)
    if log_to_mlflow:
        log_results(client, run_id, result, out_dir)
    return result


def log_results(client, run_id: str, result: dict, out_dir: Path) -> None:
    """Flat metrics onto the run (batched), the output files as artifacts, the evaluated tag."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in sorted(result["flat"].items())]
    for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.log_artifacts(run_id, str(out_dir), artifact_path=ARTIFACT_DIR)
    client.set_tag(run_id, TAG_EVALUATED, ",".join(result["checkpoints"]))


def summary_lines(result: dict) -> list[str]:
    """A short human summary of ``metrics.json`` (what ``hescape evaluate`` prints)."""
    lines = [(f"run {result['run_id']} ({result.get('run_name')}), panel {result.get('panel')}, "
              f"test spots {result['n_spots'].get('test')}")]
    for which, res in result["checkpoints"].items():
        note = f" (= {res['same_as']})" if res.get("same_as") else ""
        lines.append(f"  {which} checkpoint, epoch {res.get('epoch')}{note}:")
        for protocol in ("batch", "global"):
            r = res["retrieval"][protocol]
            lines.append(f"    {protocol:6s} R@5  I2G {r['I2G']['R@5']:.3f}  G2I {r['G2I']['R@5']:.3f}  "
                         f"(chance {r['I2G']['chance_R@5']:.4f})")
        expr = res.get("expression_probe") or {}
        if "image" in expr:
            lines.append(f"    expression probe (Pearson r, {len(expr.get('genes', []))} HVGs): "
                         f"trunk {_fmt(expr['image_trunk'].get('mean'))} -> aligned {_fmt(expr['image'].get('mean'))}")
        for label, per_feat in (res.get("slide_probe") or {}).items():
            if "image" in per_feat and "auroc" in per_feat["image"]:
                lines.append(f"    slide probe {label} AUROC: image trunk {_fmt(per_feat['image_trunk'].get('auroc'))}"
                             f" -> aligned {_fmt(per_feat['image'].get('auroc'))}")
    for name in ("oracle", "oracle_noisy", "random"):
        known = (result.get("known_answer") or {}).get(name)
        if known:
            g, b = known["global"], known["batch"]
            lines.append(f"  {name:12s} batch R@5 I2G {b['I2G']['R@5']:.3f}  global R@5 I2G {g['I2G']['R@5']:.3f}"
                         f"  G2I {g['G2I']['R@5']:.3f}")
    for check in result.get("checks", []):
        lines.append(f"  check {check['check']}: {check['statement']}: {check['ratio']:.1f}x "
                     f"{'PASS' if check['passed'] else 'FAIL'}")
    return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
