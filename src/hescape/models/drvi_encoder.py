"""DRVI gene encoder: pretrain one DRVI model per panel on its TRAINING split, then use the frozen
posterior mean of its encoder.

:func:`pretrain_drvi` trains the real DRVI model (pip package ``drvi-py``, scvi-tools based) on the
training spots only (the reference scripts leaked test samples into DRVI training: defect 8), with
the sample id as categorical covariate, and caches it by panel content hash and parameter hash::

    <cache_dir>/drvi-<panel hash>-<params hash>/
      model/model.pt     the DRVI model (``model.save``; reload with ``drvi.model.DRVI.load``)
      encoder.pt         state dict of the dependency-free :class:`DrviEncoder` (weights_only load)
      encoder.json       its layer spec, the DRVI parameters, the training samples, timings, versions

A second call with the same panel and parameters loads nothing and trains nothing: it returns the
cached directory.

Covariates: DRVI is built with ``encode_covariates=False`` (its default), so the sample covariate
enters only the DECODER; the encoder reads ``log1p(counts)`` alone. The posterior mean of a spot of an
unseen (validation/test) sample therefore needs no covariate value at all. :func:`_export_encoder`
checks this on the trained module and refuses to export an encoder that would need covariates.

:class:`DrviEncoder` is a plain torch module rebuilt from the exported layer spec and state dict, so
training workers need neither scvi-tools nor the DRVI model object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hescape.data import keys
from hescape.errors import ConfigError, DataError
from hescape.io import atomic_dir, write_json
from hescape.models.gene_encoders import GeneEncoder

log = logging.getLogger(__name__)

ENCODER_PT = "encoder.pt"
ENCODER_JSON = "encoder.json"
MODEL_DIR = "model"
COUNTS_LAYER = "counts"
EXPORT_VERSION = 1
COUNT_LIKELIHOODS = ("pnb", "nb", "poisson")


@dataclass
class DrviParams:
    """Parameters of DRVI pretraining (the ``drvi`` block of params.yaml).

    Attributes
    ----------
    n_latent
        Latent dimensions = the encoder's feature size (PROTOCOL: 128).
    encoder_dims, decoder_dims
        Hidden layers (PROTOCOL: [128, 128] each).
    gene_likelihood
        A count likelihood of DRVI: ``pnb`` (its default, log-space negative binomial), ``nb``, ``poisson``.
    max_epochs
        Upper bound on epochs (PROTOCOL: up to 400; ~6 s per epoch for 6,000 spots x 280 genes on two
        CPU cores, so 50 with early stopping is the default here).
    batch_size
        Mini-batch size (PROTOCOL: 128).
    early_stopping, early_stopping_patience
        Stop when the ELBO of a random 10 % of the TRAINING spots stops improving.
    lr
        Adam learning rate of DRVI's training plan.
    seed
        scvi-tools seed (weights init, data splitting, shuffling).
    """

    n_latent: int = 128
    encoder_dims: tuple[int, ...] = (128, 128)
    decoder_dims: tuple[int, ...] = (128, 128)
    gene_likelihood: str = "pnb"
    max_epochs: int = 50
    batch_size: int = 128
    early_stopping: bool = True
    early_stopping_patience: int = 10
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        self.encoder_dims = tuple(int(d) for d in self.encoder_dims)
        self.decoder_dims = tuple(int(d) for d in self.decoder_dims)
        if self.gene_likelihood not in COUNT_LIKELIHOODS:
            raise ConfigError(f"drvi.gene_likelihood must be a count likelihood {COUNT_LIKELIHOODS}, "
                              f"got {self.gene_likelihood!r}")
        if self.max_epochs < 1 or self.batch_size < 1 or self.n_latent < 1:
            raise ConfigError("drvi.max_epochs, batch_size and n_latent must be positive")

    def digest(self) -> str:
        """Hash of everything that determines the trained model (library versions included)."""
        payload = {**asdict(self), "versions": _versions()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:12]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("drvi-py", "scvi-tools"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def cache_path(panel, cache_dir: str | Path, params: DrviParams) -> Path:
    """Cache directory of the DRVI model of ``panel`` trained with ``params``."""
    return Path(cache_dir) / f"drvi-{panel.meta.content_hash}-{params.digest()}"


def training_anndata(panel):
    """AnnData of the panel's TRAINING spots only: raw counts in ``layers["counts"]`` (and ``X``),
    the sample id as a categorical ``obs`` column."""
    import pandas as pd

    mask = panel.split_mask("train")
    if not mask.any():
        raise DataError(f"panel {panel.meta.name!r} has no training spots", field="splits")
    adata = panel.subset(mask).to_anndata()
    adata.obs[keys.SAMPLE] = pd.Categorical(adata.obs[keys.SAMPLE].astype(str))
    adata.layers[COUNTS_LAYER] = adata.X.copy()
    return adata


def pretrain_drvi(panel, cache_dir: str | Path, *, params: DrviParams | None = None, progress: bool = False,
                  accelerator: str = "auto", **overrides: Any) -> Path:
    """Pretrain (or reuse) the DRVI model of ``panel`` on its training split.

    Parameters
    ----------
    panel
        A :class:`hescape.data.panel.Panel` (images not needed).
    cache_dir
        Root of the cache; the model lives in :func:`cache_path`.
    params
        :class:`DrviParams`; keyword ``overrides`` (``n_latent=``, ``max_epochs=``, ``seed=``, ...)
        replace single fields.
    progress
        Show Lightning's progress bar.
    accelerator
        Lightning accelerator (``"auto"`` uses a GPU when there is one, ``"cpu"`` forces the CPU).

    Returns
    -------
    The cache directory (``encoder.pt`` + ``encoder.json`` + ``model/``).
    """
    params = DrviParams(**{**asdict(params or DrviParams()), **overrides})
    target = cache_path(panel, cache_dir, params)
    if (target / ENCODER_JSON).exists():
        log.info("DRVI cache hit: %s (no training)", target)
        return target
    log.info("DRVI cache miss: training DRVI for panel %s on its training split -> %s", panel.meta.name, target)

    import drvi
    import scvi

    adata = training_anndata(panel)
    scvi.settings.seed = params.seed
    drvi.model.DRVI.setup_anndata(adata, layer=COUNTS_LAYER, categorical_covariate_keys=[keys.SAMPLE],
                                  is_count_data=True)
    model = drvi.model.DRVI(adata, n_latent=params.n_latent, encoder_dims=list(params.encoder_dims),
                            decoder_dims=list(params.decoder_dims), gene_likelihood=params.gene_likelihood,
                            encode_covariates=False)
    train_kwargs: dict[str, Any] = {}
    if params.early_stopping:
        train_kwargs["early_stopping_patience"] = params.early_stopping_patience
    start = time.perf_counter()
    model.train(max_epochs=params.max_epochs, batch_size=params.batch_size, accelerator=accelerator,
                early_stopping=params.early_stopping, enable_progress_bar=progress,
                plan_kwargs={"lr": params.lr}, **train_kwargs)
    seconds = time.perf_counter() - start
    epochs = len(model.history["elbo_train"]) if "elbo_train" in model.history else params.max_epochs
    log.info("DRVI trained %d epochs on %d spots x %d genes in %.1f s", epochs, adata.n_obs, adata.n_vars, seconds)

    spec, state = _export_encoder(model.module)
    info = {
        "version": EXPORT_VERSION,
        "panel_name": panel.meta.name,
        "panel_hash": panel.meta.content_hash,
        "genes": list(panel.meta.genes),
        "params": asdict(params),
        "params_hash": params.digest(),
        "train_samples": sorted(adata.obs[keys.SAMPLE].cat.categories.tolist()),
        "n_train_spots": int(adata.n_obs),
        "epochs": int(epochs),
        "train_seconds": round(seconds, 3),
        "versions": _versions(),
        "spec": spec,
    }
    with atomic_dir(target, overwrite=True) as tmp:
        model.save(str(tmp / MODEL_DIR), save_anndata=False)
        torch.save(state, tmp / ENCODER_PT)
        write_json(tmp / ENCODER_JSON, info)
    return target


#  Dependency-free encoder


def _export_encoder(module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Layer spec + state dict of a plain :class:`DrviEncoder` equal to ``module.z_encoder``'s mean path.

    Walks DRVI's ``FCLayers`` (per hidden layer: Linear, optional BatchNorm, optional LayerNorm,
    activation, Dropout) and refuses anything the plain module would compute differently: covariates
    fed to the encoder, a non-identity mean activation, a non-log1p input transform.
    """
    enc = module.z_encoder
    if getattr(module, "encode_covariates", False) or enc.encoder is None or enc.encoder.n_cat_list \
            or enc.mean_encoder.n_cat_list:
        raise ConfigError("this DRVI encoder reads covariates; the plain encoder supports encode_covariates=False")
    if not isinstance(enc.mean_activation, nn.Identity):
        raise ConfigError(f"unsupported DRVI mean activation {enc.mean_activation}")
    if getattr(module.gene_likelihood_module, "library_normalization", None) != "none":
        raise ConfigError("DRVI input transform is not log1p(counts) (library_normalization != 'none')")
    layers, state = [], {}
    for i, block in enumerate(enc.encoder.fc_layers):
        ops = []
        for sub in block:
            name = type(sub).__name__
            if isinstance(sub, nn.Linear):
                ops.append({"op": "linear", "in": sub.in_features, "out": sub.out_features})
                src = sub
            elif isinstance(sub, nn.BatchNorm1d):
                ops.append({"op": "batchnorm", "n": sub.num_features, "eps": sub.eps, "affine": sub.affine})
                src = sub
            elif isinstance(sub, nn.LayerNorm):
                ops.append({"op": "layernorm", "n": list(sub.normalized_shape), "eps": sub.eps,
                            "affine": sub.elementwise_affine, "bias": sub.bias is not None})
                src = sub
            elif isinstance(sub, nn.ELU):
                ops.append({"op": "elu", "alpha": sub.alpha})
                src = None
            elif isinstance(sub, nn.ReLU):
                ops.append({"op": "relu"})
                src = None
            elif isinstance(sub, nn.Dropout):
                continue  # identity in eval mode
            else:
                raise ConfigError(f"unsupported layer {name} in DRVI encoder layer {i}")
            if src is not None:
                for key, value in src.state_dict().items():
                    state[f"hidden.{i}.{len(ops) - 1}.{key}"] = value.detach().cpu().clone()
        layers.append(ops)
    mean = [m for m in enc.mean_encoder.fc_layers[0] if isinstance(m, nn.Linear)]
    if len(mean) != 1:
        raise ConfigError("unexpected DRVI mean encoder structure")
    for key, value in mean[0].state_dict().items():
        state[f"mean.{key}"] = value.detach().cpu().clone()
    spec = {"n_input": layers[0][0]["in"], "n_latent": mean[0].out_features, "layers": layers}
    return spec, state


class DrviEncoder(GeneEncoder):
    """Frozen posterior mean of a DRVI encoder, as a plain torch module: ``log1p(counts) -> qz_mean``.

    Built from the layer spec written by :func:`pretrain_drvi`; equals
    ``model.get_latent_representation()`` on the same spots, and needs no covariate, so spots of
    unseen samples are encoded exactly like training spots.
    """

    input_kind = "log1p"
    trainable = False

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        blocks = []
        for ops in spec["layers"]:
            mods: list[nn.Module] = []
            for op in ops:
                kind = op["op"]
                if kind == "linear":
                    mods.append(nn.Linear(op["in"], op["out"]))
                elif kind == "batchnorm":
                    mods.append(nn.BatchNorm1d(op["n"], eps=op["eps"], affine=op["affine"]))
                elif kind == "layernorm":
                    mods.append(nn.LayerNorm(op["n"], eps=op["eps"], elementwise_affine=op["affine"],
                                             bias=op.get("bias", True)))
                elif kind == "elu":
                    mods.append(nn.ELU(op["alpha"]))
                elif kind == "relu":
                    mods.append(nn.ReLU())
                else:
                    raise ConfigError(f"unknown DRVI encoder op {kind!r}")
            blocks.append(nn.Sequential(*mods))
        self.hidden = nn.Sequential(*blocks)
        last = spec["layers"][-1][0]["out"] if spec["layers"] else spec["n_input"]
        self.mean = nn.Linear(last, spec["n_latent"])
        self.n_genes = int(spec["n_input"])
        self.feature_dim = int(spec["n_latent"])
        self.info: dict = {}
        self.freeze()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_genes)`` log1p counts -> ``(B, n_latent)`` posterior means."""
        return self.mean(self.hidden(x))

    @classmethod
    def load(cls, path: str | Path) -> DrviEncoder:
        """Load the exported encoder of a :func:`pretrain_drvi` cache directory (strict, weights only)."""
        path = Path(path)
        try:
            info = json.loads((path / ENCODER_JSON).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not a DRVI cache entry ({ENCODER_JSON} unreadable: {exc})") from exc
        if info.get("version") != EXPORT_VERSION:
            raise ConfigError(f"{path}: DRVI export version {info.get('version')} != {EXPORT_VERSION}; retrain")
        enc = cls(info["spec"])
        state = torch.load(path / ENCODER_PT, map_location="cpu", weights_only=True)
        enc.load_state_dict(state, strict=True)
        enc.info = {k: v for k, v in info.items() if k != "spec"}
        return enc.freeze()
