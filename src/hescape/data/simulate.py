"""Known-answer simulator: a realistic Xenium-like curated panel whose ground truth is stored with it.

Every spot is a 55 µm bin of a notional Xenium slide. A smooth random field per cell type over the
slide, pushed through a softmax, gives each spot its true cell-type composition; that composition
drives both modalities:

- counts: a mixture of cell-type programmes (strong marker genes; real markers when a real panel's
  gene list is given) sampled as negative binomial around a spot library size that varies with the
  number of cells, the sample and the donor;
- image: an H&E-like patch rendered in optical density (Beer-Lambert): nuclei whose density, size,
  shape and hue depend on the cell type, red blood cells in vessels, and a stroma texture (fibres,
  fat membranes, granular cytoplasm) whose colour and strength depend on the composition.

Donors add batch effects to both modalities (gene-wise capture bias and depth; stain colour shift
and blur); a sample-level binary ``mutation`` shifts a set of genes and the nuclei (larger, darker,
more irregular), mostly in the epithelial programme. Splits are by donor, so test donors are unseen.
Everything is drawn from ``numpy.random`` streams derived from ``seed``: the same configuration
gives byte-identical files.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from hescape.data import keys
from hescape.data.panel import Panel, PanelMeta, encode_png, write_panel
from hescape.data.registry import read_gene_file
from hescape.errors import ConfigError

SOURCE = "simulator"
STATE = "state"  # obsm key (and parquet column) of the true spot states, one column per entry of _STATES
BIN_UM = 55.0  # Xenium pseudo-spot side: spot spacing on the notional slide

# Optical density vectors of the stains (Macenko's reference H&E), and a red one for erythrocytes.
_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])
_RBC_OD = np.array([0.08, 0.85, 0.65])

_TISSUES = ("breast", "lung", "colon", "skin", "prostate", "kidney", "liver", "pancreas")


@dataclass
class SimulationConfig:
    """Parameters of the ``simulate`` block of ``params.yaml``.

    Attributes
    ----------
    seed
        Seed of every random draw; the same configuration gives byte-identical output.
    n_spots, n_samples, n_donors, n_tissues, n_cell_types
        Sizes of the dataset. Samples are dealt to donors round-robin (every donor has one or more).
    n_genes
        Number of synthetic genes; ignored when ``genes_file`` is given (its length is used).
    genes_file
        A real panel's gene list (``read_gene_file`` format); marker genes are then real markers
        where the panel has them.
    n_markers
        Marker genes per cell type; 0 picks ``min(20, n_genes // (2 * n_cell_types))``.
    marker_strength
        Mean log fold change of a marker gene in its own cell type.
    patch_px, patch_um
        Patch side in pixels and micrometres (``pixel_size_um = patch_um / patch_px``).
    test_donors, val_donors
        Donors whose samples are held out; the remaining donors are the training split.
    mean_depth
        Median total counts per spot (Xenium 55 µm bins on a ~300-gene panel: a few hundred).
    nb_theta
        Negative-binomial inverse dispersion (larger: closer to Poisson).
    library_sd
        Log-normal spread of spot library sizes beyond the cell-number effect.
    batch_strength
        Scale of every donor effect (0 switches them off).
    mutation_strength
        Scale of the mutation's effect on genes and nuclei (0 switches it off).
    smoothness
        Spatial scale of the composition fields as a fraction of the slide side.
    purity
        Amplitude of the composition fields: larger gives spots dominated by one cell type.
    spot_noise
        Spot-to-spot jitter of the composition logits on top of the smooth fields.
    state_strength
        Scale of the spot-level cell states (proliferation: a gene module and darker nuclei; matrix:
        a gene module and denser eosin), which vary mostly from spot to spot.
    """

    seed: int = 0
    name: str = "simulated"
    n_spots: int = 6000
    n_samples: int = 8
    n_donors: int = 4
    n_tissues: int = 2
    n_cell_types: int = 6
    n_genes: int = 280
    genes_file: str | None = None
    n_markers: int = 0
    marker_strength: float = 3.0
    patch_px: int = 64
    patch_um: float = 55.0
    test_donors: int = 1
    val_donors: int = 1
    mean_depth: float = 400.0
    nb_theta: float = 8.0
    library_sd: float = 0.3
    batch_strength: float = 1.0
    mutation_strength: float = 1.0
    smoothness: float = 0.25
    purity: float = 2.5
    spot_noise: float = 0.6
    state_strength: float = 1.0

    @property
    def pixel_size_um(self) -> float:
        return self.patch_um / self.patch_px


def check_config(cfg: SimulationConfig) -> None:
    """Raise :class:`ConfigError` naming the first impossible setting."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"simulate: {message}")

    need(cfg.n_spots >= 1, f"n_spots must be at least 1, got {cfg.n_spots}")
    need(cfg.test_donors >= 1 and cfg.val_donors >= 1,
         f"test_donors and val_donors must be at least 1, got {cfg.test_donors} and {cfg.val_donors}")
    need(cfg.n_donors >= cfg.test_donors + cfg.val_donors + 1,
         f"n_donors ({cfg.n_donors}) must be at least test_donors + val_donors + 1 "
         f"({cfg.test_donors + cfg.val_donors + 1}) so that every split has a donor of its own")
    need(cfg.n_samples >= cfg.n_donors, f"n_samples ({cfg.n_samples}) must be at least n_donors ({cfg.n_donors})")
    need(cfg.n_spots >= cfg.n_samples, f"n_spots ({cfg.n_spots}) must be at least n_samples ({cfg.n_samples})")
    need(cfg.n_tissues >= 1, f"n_tissues must be at least 1, got {cfg.n_tissues}")
    need(cfg.n_cell_types >= 2, f"n_cell_types must be at least 2, got {cfg.n_cell_types}")
    if cfg.genes_file is None:
        need(cfg.n_genes >= 2 * cfg.n_cell_types + 2,
             f"n_genes ({cfg.n_genes}) must be at least 2 * n_cell_types + 2 ({2 * cfg.n_cell_types + 2})")
    need(cfg.n_markers >= 0, f"n_markers must be 0 (automatic) or positive, got {cfg.n_markers}")
    need(16 <= cfg.patch_px <= 1024, f"patch_px must be between 16 and 1024, got {cfg.patch_px}")
    for name in ("patch_um", "mean_depth", "nb_theta", "smoothness"):
        need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("library_sd", "batch_strength", "mutation_strength", "marker_strength", "purity", "spot_noise",
                 "state_strength"):
        need(getattr(cfg, name) >= 0, f"{name} must not be negative, got {getattr(cfg, name)}")
    need(bool(cfg.name), "name must not be empty")


#  Cell types


@dataclass(frozen=True)
class CellType:
    """Appearance and markers of one cell-type programme (sizes in µm, densities per 55 µm bin)."""

    name: str
    density: float  # nuclei per 55 µm x 55 µm bin where the type is pure
    diameter: float  # mean nuclear diameter
    elongation: float  # long / short axis
    irregularity: float  # harmonic wobble of the outline
    hema: float  # nuclear haematoxylin density
    tint: float  # share of eosin in the nuclear colour (blue -> purple)
    eosin: float  # stroma / cytoplasm eosin density
    basophil: float  # stroma / cytoplasm haematoxylin density
    texture: str  # smooth | granular | fibrous | membranes
    rbc: float  # red blood cells per bin where the type is pure
    vesicular: float  # open chromatin with a dark rim (0..1)
    markers: tuple[str, ...]


_ARCHETYPES = (
    CellType("epithelial", 22, 9.0, 1.3, 0.12, 1.0, 0.15, 0.35, 0.10, "granular", 0, 0.7,
             ("EPCAM", "KRT8", "KRT18", "KRT19", "CDH1", "KRT7", "CLDN4", "ELF3", "ESR1", "ERBB2", "GATA3",
              "FOXA1", "MUC1", "AGR2", "TACSTD2", "SPDEF", "CEACAM6", "KRT5", "TFF3", "CLDN7")),
    CellType("immune", 45, 6.0, 1.05, 0.05, 1.8, 0.0, 0.10, 0.05, "smooth", 0, 0.0,
             ("PTPRC", "CD3E", "CD3D", "CD2", "CD8A", "CD4", "MS4A1", "CD79A", "CD19", "IL7R", "CCR7", "GZMB",
              "GZMA", "NKG7", "CD247", "TRAC", "CXCR4", "LTB", "CD27", "SELL")),
    CellType("fibroblast", 9, 8.0, 3.2, 0.05, 1.3, 0.05, 0.80, 0.02, "fibrous", 0, 0.0,
             ("COL1A1", "COL1A2", "COL3A1", "DCN", "LUM", "PDGFRA", "PDGFRB", "FAP", "POSTN", "SFRP4", "FBLN1",
              "MMP2", "THY1", "CXCL12", "SFRP2", "COL6A3", "PDPN", "VIM", "FN1", "CTHRC1")),
    CellType("endothelial", 12, 7.0, 2.3, 0.05, 1.2, 0.05, 0.45, 0.03, "smooth", 30, 0.0,
             ("PECAM1", "VWF", "CDH5", "KDR", "CLDN5", "EMCN", "FLT1", "TIE1", "ESAM", "ENG", "EGFL7", "PLVAP",
              "AQP1", "RAMP2", "SOX17", "MMRN1", "CD34", "ACKR1", "SELE", "NOTCH4")),
    CellType("adipocyte", 3, 7.0, 1.7, 0.05, 1.1, 0.05, 0.07, 0.01, "membranes", 0, 0.0,
             ("ADIPOQ", "PLIN1", "LEP", "FABP4", "LPL", "CIDEA", "CIDEC", "PPARG", "CD36", "GPD1", "LIPE",
              "PLIN4", "RBP4", "TUSC5", "SCD", "ACACB", "PCK1", "CFD", "G0S2", "AQP7")),
    CellType("myeloid", 16, 10.0, 1.3, 0.25, 1.0, 0.25, 0.55, 0.04, "granular", 0, 0.2,
             ("CD68", "CD163", "LYZ", "CD14", "ITGAX", "CSF1R", "MRC1", "C1QA", "C1QB", "C1QC", "FCGR3A",
              "AIF1", "TYROBP", "FCER1G", "MS4A7", "CD86", "MARCO", "APOE", "SPP1", "CD1C")),
)
_MUTATION_GENES = ("MYC", "CCND1", "ERBB2", "EGFR", "TP53", "MET", "KRAS", "BRAF", "PIK3CA", "CDKN2A", "SOX2",
                   "MDM2", "CDK4", "FGFR1", "AKT1", "PTEN", "NOTCH1", "CTNNB1", "SMAD4", "MUC2")
# Spot-level cell states, each a gene module with a visible counterpart in the patch.
_STATES = (
    ("proliferation", ("MKI67", "TOP2A", "CCNB1", "BIRC5", "CDK1", "AURKA", "FOXM1", "E2F1", "PCNA", "MCM2",
                       "UBE2C", "CENPF")),  # darker, denser chromatin
    ("matrix", ("SPARC", "COL11A1", "MMP11", "TNC", "COL5A1", "LOX", "COMP", "VCAN", "COL4A1", "MMP14",
                "LAMB1", "ITGB1")),  # denser, pinker extracellular matrix
)


def _cell_types(n: int, rng: np.random.Generator) -> list[CellType]:
    """The first ``n`` archetypes, then random synthetic types with their own look."""
    types = list(_ARCHETYPES[:n])
    textures = ("smooth", "granular", "fibrous", "membranes")
    for k in range(len(types), n):
        types.append(CellType(
            name=f"cell_type_{k}", density=float(rng.uniform(5, 40)), diameter=float(rng.uniform(5.5, 11)),
            elongation=float(rng.uniform(1.0, 3.0)), irregularity=float(rng.uniform(0.02, 0.25)),
            hema=float(rng.uniform(0.8, 1.8)), tint=float(rng.uniform(0, 0.3)), eosin=float(rng.uniform(0.1, 0.8)),
            basophil=float(rng.uniform(0, 0.1)), texture=textures[int(rng.integers(len(textures)))],
            rbc=float(rng.choice([0.0, 0.0, 20.0])), vesicular=float(rng.uniform(0, 0.7)), markers=(),
        ))
    return types


def _mutation_effect(k: int) -> float:
    """How strongly the mutation acts on cell type ``k``: mostly in the epithelial programme."""
    return 1.0 if k == 0 else 0.3


#  Layout: donors, samples, splits, tissues, spots


@dataclass
class _Layout:
    sample_ids: list[str]
    donor_of: list[int]  # per sample
    tissue_of: list[int]
    mutation_of: list[int]
    split_of_donor: dict[int, str]
    n_spots_of: list[int]


def _layout(cfg: SimulationConfig, rng: np.random.Generator) -> _Layout:
    n_s, n_d = cfg.n_samples, cfg.n_donors
    perm = rng.permutation(n_d)
    split_of_donor = {}
    for rank, d in enumerate(perm):
        split_of_donor[int(d)] = ("test" if rank < cfg.test_donors
                                  else "val" if rank < cfg.test_donors + cfg.val_donors else "train")
    # Samples are dealt round-robin (every donor gets one), train donors first and test donors next,
    # so that spare samples give train, then test, a second sample and with it both mutation labels.
    deal = sorted(range(n_d), key=lambda d: (("train", "test", "val").index(split_of_donor[d]), d))
    donor_of = [deal[s % n_d] for s in range(n_s)]
    tissue_of = [(s // n_d + s % n_d) % cfg.n_tissues for s in range(n_s)]  # donors span tissues
    # Mutation alternates over each split's samples listed donor by donor: every split with two or
    # more samples holds both labels, and a donor with two or more samples has both, so the label is
    # not a donor effect in disguise.
    mutation_of = [0] * n_s
    for split in ("train", "val", "test"):
        split_donors = [int(d) for d in rng.permutation(n_d) if split_of_donor[int(d)] == split]
        members = [s for d in split_donors for s in range(n_s) if donor_of[s] == d]
        start = int(rng.integers(2))
        for j, s in enumerate(members):
            mutation_of[s] = (start + j) % 2
    # Spots per sample vary by +-25%; each sample gets at least one.
    weights = rng.uniform(0.75, 1.25, n_s)
    extra = cfg.n_spots - n_s
    share = extra * weights / weights.sum()
    n_of = np.floor(share).astype(int)
    order = np.argsort(-(share - n_of), kind="stable")
    n_of[order[: extra - n_of.sum()]] += 1
    width = max(3, len(str(n_s - 1)))
    return _Layout(
        sample_ids=[f"SIM{s:0{width}d}" for s in range(n_s)],
        donor_of=donor_of, tissue_of=tissue_of, mutation_of=mutation_of,
        split_of_donor=split_of_donor, n_spots_of=(n_of + 1).tolist(),
    )


def _bumps(points: np.ndarray, n_fields: int, side: float, scale: float, amp: float,
           rng: np.random.Generator, n_bumps: int = 4) -> np.ndarray:
    """``(n_points, n_fields)`` smooth random fields: sums of Gaussian bumps over a square slide."""
    centres = rng.uniform(-0.1 * side, 1.1 * side, (n_fields, n_bumps, 2))
    widths = scale * side * rng.uniform(0.6, 1.4, (n_fields, n_bumps))
    amps = amp * rng.standard_normal((n_fields, n_bumps))
    d2 = ((points[:, None, None, :] - centres[None]) ** 2).sum(-1)
    return (amps[None] * np.exp(-d2 / (2 * widths[None] ** 2))).sum(-1)


def _slide(n: int, rng: np.random.Generator) -> np.ndarray:
    """Grid positions ``(n, 2)`` (row, col) of an irregular, compact tissue section, in row-major order."""
    side = math.ceil(math.sqrt(n * 2.0)) + 2
    rows, cols = np.divmod(np.arange(side * side), side)
    grid = np.stack([rows, cols], 1).astype(float)
    centre = (side - 1) / 2
    score = _bumps(grid, 1, side, 0.3, 1.0, rng)[:, 0] - 8.0 * (((grid - centre) / side) ** 2).sum(1)
    keep = np.sort(np.argsort(-score, kind="stable")[:n])
    return grid[keep]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


#  Expression programmes


@dataclass
class _Programmes:
    logp: np.ndarray  # (K, G) log expression per cell type
    markers: list[np.ndarray]  # gene indices per cell type
    mutation: np.ndarray  # gene indices
    mutation_effect: np.ndarray  # signed log fold change per mutation gene at strength 1
    states: list[np.ndarray]  # gene indices per spot state
    state_effect: np.ndarray  # (n_states, G) log fold change per unit of each state


def _programmes(cfg: SimulationConfig, genes: list[str], types: list[CellType], rng: np.random.Generator):
    """Expression programmes: marker genes per cell type, mutation genes, spot-state modules."""
    n_g, n_k = len(genes), len(types)
    n_markers = cfg.n_markers or min(20, n_g // (2 * n_k))
    n_markers = max(1, min(n_markers, (n_g - 2) // n_k))
    index = {g: i for i, g in enumerate(genes)}
    free = np.ones(n_g, bool)

    def pick(preferred, n: int) -> np.ndarray:
        """``n`` unused genes: real ones from ``preferred`` first, then random unused ones."""
        chosen = [index[g] for g in preferred if g in index and free[index[g]]][:n]
        free[chosen] = False
        if len(chosen) < n:
            fill = rng.choice(np.flatnonzero(free), n - len(chosen), replace=False)
            chosen += sorted(int(i) for i in fill)
            free[fill] = False
        return np.array(chosen, int)

    markers = [pick(t.markers, n_markers) for t in types]
    mut = pick(_MUTATION_GENES, max(2, min(n_g // 20, int(free.sum()) - 1)))
    n_state = min(12, int(free.sum()) // (2 * len(_STATES)))
    states = [pick(names, n_state) for _, names in _STATES]

    base = rng.normal(0.0, 1.0, n_g)  # gene-wise baseline log abundance
    logp = base[None] + rng.normal(0.0, 0.3, (n_k, n_g))  # mild type-to-type variation everywhere
    for k, m in enumerate(markers):
        logp[k, m] = base[m] + rng.normal(cfg.marker_strength, 0.4, m.size)
        others = [j for j in range(n_k) if j != k]
        logp[np.ix_(others, m)] -= 0.5  # markers are low elsewhere
    mut_sign = np.where(rng.random(mut.size) < 0.75, 1.0, -1.0) * rng.uniform(0.7, 1.3, mut.size)
    state_effect = np.zeros((len(states), n_g))
    for j, genes_j in enumerate(states):
        state_effect[j, genes_j] = rng.uniform(0.6, 1.0, genes_j.size)
    return _Programmes(logp, markers, mut, mut_sign, states, state_effect)


def _profiles(prog: _Programmes, strength: float, mutated: int) -> np.ndarray:
    """``(K, G)`` expression profiles of a sample (rows sum to 1)."""
    logp = prog.logp.copy()
    if mutated and strength > 0:
        effect = np.array([_mutation_effect(k) for k in range(logp.shape[0])])
        logp[:, prog.mutation] += strength * effect[:, None] * prog.mutation_effect[None]
    p = np.exp(logp - logp.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


#  Image rendering


def _normalise(x: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, x.ndim))
    return (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-6)


def _textures(kind: str, n: int, px: int, px_per_um: float, rng: np.random.Generator) -> np.ndarray:
    """``(n, px, px)`` float32 stroma textures of mean about 1."""
    noise = rng.standard_normal((n, px, px))

    def smooth(x, um):
        return _normalise(ndimage.gaussian_filter(x, (0, um * px_per_um, um * px_per_um), mode="wrap"))

    yy, xx = np.mgrid[0:px, 0:px] / px_per_um  # µm
    if kind == "smooth":
        tex = 1 + 0.2 * smooth(noise, 3.0)
    elif kind == "granular":
        tex = 1 + 0.35 * smooth(noise, 0.5) + 0.15 * smooth(noise[::-1], 4.0)
    elif kind == "fibrous":
        theta = rng.uniform(0, np.pi, (n, 1, 1))
        period = rng.uniform(2.5, 4.5, (n, 1, 1))
        phase = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + 4.0 * smooth(noise, 5.0)
        tex = 0.55 + 0.9 * (0.5 + 0.5 * np.cos(phase)) ** 2 + 0.15 * smooth(noise[::-1], 0.5)
    elif kind == "membranes":
        side_um = px / px_per_um
        n_cells = max(3, round((side_um / 25.0) ** 2) + 2)
        pts = rng.uniform(-0.2 * side_um, 1.2 * side_um, (n, n_cells, 2))
        d = np.sqrt((yy[None, None] - pts[..., 0, None, None]) ** 2 + (xx[None, None] - pts[..., 1, None, None]) ** 2)
        d.sort(axis=1)
        tex = 0.2 + 6.0 * np.exp(-(d[:, 1] - d[:, 0]) / 0.8)
    else:  # pragma: no cover - the kinds are fixed above
        raise ValueError(kind)
    tex = np.clip(tex, 0, None)
    tex /= tex.mean((1, 2), keepdims=True)
    # Flips and transposes multiply the bank eightfold at no cost.
    bank = [tex, tex[:, ::-1], tex[:, :, ::-1], tex[:, ::-1, ::-1]]
    bank += [b.transpose(0, 2, 1) for b in bank]
    return np.ascontiguousarray(np.concatenate(bank), dtype=np.float32)


def _nucleus_stamps(t: CellType, scale: float, px_per_um: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, S, S)`` float32 nuclear haematoxylin density, mean about 1 inside the nucleus."""
    irregularity = t.irregularity * scale
    radius = 0.5 * t.diameter * scale * px_per_um
    a = radius * math.sqrt(t.elongation) * np.exp(rng.normal(0, 0.12, n))
    b = radius / math.sqrt(t.elongation) * np.exp(rng.normal(0, 0.12, n))
    half = math.ceil(radius * math.sqrt(t.elongation) * math.exp(0.36) * (1 + 2 * irregularity)) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    theta = rng.uniform(0, np.pi, (n, 1, 1))
    xr = xx * np.cos(theta) + yy * np.sin(theta)
    yr = -xx * np.sin(theta) + yy * np.cos(theta)
    a, b = a[:, None, None], b[:, None, None]
    phi = np.arctan2(yr / b, xr / a)
    wobble = 1 + irregularity * (rng.normal(0, 1, (n, 1, 1)) * np.sin(2 * phi + rng.uniform(0, 6.3, (n, 1, 1)))
                                 + rng.normal(0, 1, (n, 1, 1)) * np.sin(3 * phi + rng.uniform(0, 6.3, (n, 1, 1))))
    r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2) / np.clip(wobble, 0.5, None)
    depth = (1 - r) * np.minimum(a, b)  # pixels inside the outline
    mask = np.clip(depth + 0.5, 0, 1)
    chroma = 0.75 + 0.25 * _normalise(ndimage.gaussian_filter(rng.standard_normal(mask.shape), (0, 0.7, 0.7)))
    rim = np.exp(-0.5 * (depth / 1.0) ** 2)
    density = mask * ((1 - 0.6 * t.vesicular) * chroma + 1.2 * t.vesicular * rim)
    inside = mask.sum((1, 2), keepdims=True)
    density /= np.maximum(density.sum((1, 2), keepdims=True) / np.maximum(inside, 1), 1e-6)
    return np.clip(density, 0, None).astype(np.float32)


def _rbc_stamps(px_per_um: float, n: int, rng: np.random.Generator) -> np.ndarray:
    radius = 3.6 * px_per_um
    r_all = radius * np.exp(rng.normal(0, 0.08, (n, 1, 1)))
    half = math.ceil(radius * 1.3) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(float)
    r = np.sqrt(xx ** 2 + yy ** 2)[None] / r_all
    mask = np.clip((1 - r) * r_all + 0.5, 0, 1)
    return (mask * (1 - 0.45 * np.exp(-(r ** 2) / 0.25))).astype(np.float32)


@dataclass
class _Stamps:
    """A bank of ``V`` object stamps kept sparse: the offsets and values of their non-zero pixels
    (padded with zeros to a common length), which is 2-4x fewer pixels than the bounding squares."""

    dy: np.ndarray  # (V, L) int64, relative to the stamp's top-left corner
    dx: np.ndarray
    values: np.ndarray  # (V, L) float32
    side: int

    @classmethod
    def from_dense(cls, dense: np.ndarray) -> _Stamps:
        v, side = dense.shape[0], dense.shape[-1]
        flat = dense.reshape(v, -1)
        keep = flat > 1e-3
        length = int(keep.sum(1).max())
        order = np.argsort(~keep, axis=1, kind="stable")[:, :length]  # non-zero pixels first
        values = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(flat, order, 1), 0)
        dy, dx = np.divmod(order, side)
        return cls(dy=dy.astype(np.int64), dx=dx.astype(np.int64), values=values.astype(np.float32), side=side)


@dataclass
class _Look:
    """Appearance of one sample: its donor's stain and blur, and its mutation's nuclei."""

    nuclei: list[_Stamps]  # per cell type
    nucleus_od: np.ndarray  # (K, 3)
    rbc: _Stamps
    rbc_od: np.ndarray  # (3,)
    stroma_od: np.ndarray  # (K, 3)
    glass_od: np.ndarray  # (3,)
    blur_px: float


class _Renderer:
    """Draws H&E-like patches for spots of one sample at a time, vectorised over a chunk of spots."""

    def __init__(self, cfg: SimulationConfig, types: list[CellType], rng: np.random.Generator):
        self.px = cfg.patch_px
        self.px_per_um = cfg.patch_px / cfg.patch_um
        self.types = types
        n_tex = 6 if self.px <= 128 else 3
        self.textures = [_textures(t.texture, n_tex, self.px, self.px_per_um, rng) for t in types]
        self.tex_strength = np.array([t.eosin + t.basophil for t in types])
        self.noise = (rng.standard_normal((32, self.px, self.px, 3)) * 3.0).astype(np.float32)
        # Stamp banks per mutation state; colours and blur per donor.
        ms = cfg.mutation_strength
        # Mutated stamps are drawn last, so that wild-type patches do not depend on mutation_strength.
        self.rbc = _Stamps.from_dense(_rbc_stamps(self.px_per_um, 16, rng))
        self.stamps = {
            m: [_Stamps.from_dense(_nucleus_stamps(
                replace(t, irregularity=t.irregularity + 0.08 * ms * m * _mutation_effect(k)),
                1 + 0.25 * ms * m * _mutation_effect(k), self.px_per_um, 32, rng))
                for k, t in enumerate(types)]
            for m in (0, 1)
        }
        self.hema_gain = {m: np.array([1 + 0.2 * ms * m * _mutation_effect(k) for k in range(len(types))])
                          for m in (0, 1)}
        # Wide enough for any object centred up to 0.3 of its side outside the patch.
        self.pad = math.ceil(0.8 * max(max(s.side for s in bank) for bank in self.stamps.values())) + 1

    def look(self, mutated: int, stain: dict) -> _Look:
        h_od, e_od = stain["h_od"], stain["e_od"]
        tint = np.array([t.tint for t in self.types])[:, None]
        nuc_dir = (1 - tint) * h_od + tint * e_od
        nuc_dir /= np.linalg.norm(nuc_dir, axis=1, keepdims=True)
        hema = np.array([t.hema for t in self.types]) * self.hema_gain[mutated]
        return _Look(
            nuclei=self.stamps[mutated],
            nucleus_od=stain["h_gain"] * hema[:, None] * nuc_dir,
            rbc=self.rbc,
            rbc_od=stain["e_gain"] * 0.9 * stain["rbc_od"],
            stroma_od=np.array([stain["e_gain"] * t.eosin * e_od + stain["h_gain"] * t.basophil * h_od
                                for t in self.types]),
            glass_od=stain["glass_od"],
            blur_px=stain["blur_um"] * self.px_per_um,
        )

    def render(self, comp: np.ndarray, n_nuclei: np.ndarray, n_rbc: np.ndarray, state: np.ndarray, look: _Look,
               rng: np.random.Generator) -> np.ndarray:
        """``(B, px, px, 3)`` uint8 patches of ``B`` spots; ``state`` is ``(B, 2)`` proliferation and matrix
        (already scaled), which darken the nuclei and the stroma."""
        b, px, pad = comp.shape[0], self.px, self.pad
        q = px + 2 * pad
        # Stroma: a composition-weighted mix of the types' textures, coloured by the mixed stroma OD.
        weights = comp * self.tex_strength[None]
        weights = weights / np.maximum(weights.sum(1, keepdims=True), 1e-6)
        mix = np.zeros((b, px, px), np.float32)
        for k, bank in enumerate(self.textures):
            pick = bank[rng.integers(0, len(bank), b)]
            pick *= weights[:, k, None, None].astype(np.float32)
            mix += pick
        colour = ((comp @ look.stroma_od) * np.exp(0.4 * state[:, 1:2])).astype(np.float32)  # (B, 3)
        od = mix[..., None] * colour[:, None, None, :]
        # Nuclei and red cells: stamps added into a padded canvas with one bincount per channel.
        idx_parts, val_parts = [], []
        nuclear_gain = np.exp(0.35 * state[:, 0])
        objects = [(bank, look.nucleus_od[k], n_nuclei[:, k], nuclear_gain) for k, bank in enumerate(look.nuclei)]
        objects.append((look.rbc, look.rbc_od, n_rbc, np.ones(b)))
        for bank, od_vec, counts, spot_gain in objects:
            total = int(counts.sum())
            if total == 0:
                continue
            s = bank.side
            owner = np.repeat(np.arange(b), counts)
            # Centres may fall a little outside the patch: nuclei cut at the border.
            centre = rng.uniform(-0.3 * s, px + 0.3 * s, (total, 2))
            top = np.floor(centre - s / 2).astype(np.int64) + pad
            base = owner * (q * q) + top[:, 0] * q + top[:, 1]
            variant = rng.integers(0, len(bank.values), total)
            idx_parts.append((base[:, None] + bank.dy[variant] * q + bank.dx[variant]).ravel())
            gain = (np.exp(rng.normal(0, 0.1, total)) * spot_gain[owner]).astype(np.float32)
            val_parts.append(((bank.values[variant] * gain[:, None]).ravel(), od_vec))
        if idx_parts:
            idx = np.concatenate(idx_parts)
            for c in range(3):
                w = np.concatenate([v * np.float32(o[c]) for v, o in val_parts])
                canvas = np.bincount(idx, weights=w, minlength=b * q * q).reshape(b, q, q)
                od[..., c] += canvas[:, pad:pad + px, pad:pad + px]
        od += look.glass_od.astype(np.float32)
        img = np.exp(-od, dtype=np.float32)
        img *= 255.0
        if look.blur_px > 0.05:
            img = ndimage.gaussian_filter1d(img, look.blur_px, axis=1, truncate=3.0, mode="nearest")
            img = ndimage.gaussian_filter1d(img, look.blur_px, axis=2, truncate=3.0, mode="nearest")
        img += self.noise[rng.integers(0, len(self.noise), b)]
        return np.clip(img, 0, 255).astype(np.uint8)


#  The simulator


def resolve(cfg: SimulationConfig) -> tuple[SimulationConfig, list[str], list[str] | None]:
    """Check ``cfg`` and read its gene list; returns the config with the effective ``n_genes``."""
    check_config(cfg)
    if cfg.genes_file is None:
        width = max(4, len(str(cfg.n_genes - 1)))
        return cfg, [f"SIMG{i:0{width}d}" for i in range(cfg.n_genes)], None
    genes, ensembl = read_gene_file(cfg.genes_file)
    cfg = replace(cfg, n_genes=len(genes))
    if len(genes) < 2 * cfg.n_cell_types + 2:
        raise ConfigError(f"simulate: {cfg.genes_file} has {len(genes)} genes; at least "
                          f"2 * n_cell_types + 2 ({2 * cfg.n_cell_types + 2}) are needed")
    return cfg, genes, ensembl if ensembl and all(ensembl) else None


def simulate_panel(cfg: SimulationConfig, progress: bool = False) -> Panel:
    """Simulate a curated panel with known answers; deterministic given ``cfg``.

    Returns
    -------
    Panel
        ``obs``: ``sample_id``, ``donor``, ``split``, ``tissue``, ``source``, ``x``, ``y`` (spot centre
        in pixels of the notional slide), ``mutation`` (0/1 per sample), ``cell_type`` (dominant type);
        ``counts`` int32; ``images`` PNG bytes; ``obsm["composition"]`` the true ``(n, K)`` fractions
        and ``obsm["state"]`` the ``(n, 2)`` spot states (proliferation, matrix).
        ``meta.provenance["truth"]`` names the cell types, their marker genes, the mutation and state
        genes, each donor's split and each sample's mutation.
    """
    from tqdm.auto import tqdm

    import hescape

    cfg, genes, ensembl = resolve(cfg)
    streams = np.random.SeedSequence(cfg.seed).spawn(4 + cfg.n_samples)
    rng_layout, rng_prog, rng_look, rng_donor = (np.random.default_rng(s) for s in streams[:4])
    sample_rngs = [np.random.default_rng(s) for s in streams[4:]]

    layout = _layout(cfg, rng_layout)
    types = _cell_types(cfg.n_cell_types, rng_prog)
    prog = _programmes(cfg, genes, types, rng_prog)
    profiles = {m: _profiles(prog, cfg.mutation_strength, m) for m in (0, 1)}
    n_k, n_g = len(types), len(genes)
    tissue_names = [_TISSUES[t] if t < len(_TISSUES) else f"tissue_{t}" for t in range(cfg.n_tissues)]
    tissue_prior = rng_layout.normal(0.0, 0.8, (cfg.n_tissues, n_k))
    renderer = _Renderer(cfg, types, rng_look)

    # Donor effects, scaled by batch_strength: capture bias per gene, depth, stain and blur.
    bs = cfg.batch_strength
    donors = []
    for _ in range(cfg.n_donors):
        h_od = np.clip(_H_OD + rng_donor.normal(0, 0.03 * bs, 3), 0.02, None)
        e_od = np.clip(_E_OD + rng_donor.normal(0, 0.03 * bs, 3), 0.02, None)
        donors.append({
            "capture": np.exp(rng_donor.normal(0, 0.3 * bs, n_g)),
            "depth": float(np.exp(rng_donor.normal(0, 0.25 * bs))),
            "h_od": h_od / np.linalg.norm(h_od),
            "e_od": e_od / np.linalg.norm(e_od),
            "rbc_od": _RBC_OD / np.linalg.norm(_RBC_OD),
            "h_gain": float(np.exp(rng_donor.normal(0, 0.08 * bs))),
            "e_gain": float(np.exp(rng_donor.normal(0, 0.08 * bs))),
            "glass_od": np.clip(0.03 + rng_donor.normal(0, 0.01 * bs, 3), 0.0, None),
            "blur_um": float(bs * rng_donor.uniform(0.0, 0.5)),
        })

    area = (cfg.patch_um / BIN_UM) ** 2
    density = np.array([t.density for t in types]) * area
    rbc_density = np.array([t.rbc for t in types]) * area
    mean_cells = 1.25 * float(density.mean())  # cells (plus ambient share) per spot of an even mixture
    obs_parts, counts_parts, comp_parts, state_parts, images = [], [], [], [], []
    bar = tqdm(total=cfg.n_spots, desc="simulate", unit="spot", disable=not progress)
    # PIL's PNG encoder releases the GIL: a chunk is encoded in threads while the next one is drawn.
    pool = ThreadPoolExecutor(2)
    encoding: list = []

    def collect() -> None:
        images.extend(f.result() for f in encoding)
        bar.update(len(encoding))
        encoding.clear()

    try:
        for s, sid in enumerate(layout.sample_ids):
            rng = sample_rngs[s]
            d, tissue, mutated = layout.donor_of[s], layout.tissue_of[s], layout.mutation_of[s]
            m = layout.n_spots_of[s]
            grid = _slide(m, rng)
            side = float(grid.max() + 1)
            logits = (tissue_prior[tissue][None] + rng.normal(0, 0.5, n_k)[None]
                      + _bumps(grid, n_k, side, cfg.smoothness, cfg.purity, rng)
                      + rng.normal(0, cfg.spot_noise, (m, n_k)))
            comp = _softmax(logits)
            # Cellularity varies from spot to spot; both the nuclei drawn and the depth follow it.
            cellularity = np.exp(rng.normal(0, 0.35, m))
            n_nuclei = rng.poisson(comp * density[None] * cellularity[:, None])
            n_rbc = rng.poisson(comp @ rbc_density)
            # Spot states: mostly spot to spot, a little smooth.
            state = cfg.state_strength * (_bumps(grid, len(_STATES), side, cfg.smoothness, 0.5, rng)
                                          + rng.normal(0, 0.8, (m, len(_STATES))))

            # Counts come from the cells drawn in the patch (plus a little ambient RNA of the area), so
            # both modalities share the same cells; depth grows with their number. NB = gamma-Poisson.
            cells = n_nuclei + 0.25 * comp * density[None]
            lib = (cfg.mean_depth * donors[d]["depth"] * np.exp(rng.normal(0, 0.1))
                   * (cells.sum(1) / mean_cells) ** 0.7 * np.exp(rng.normal(0, cfg.library_sd, m)))
            rate = (cells @ profiles[mutated]) * np.exp(state @ prog.state_effect) * donors[d]["capture"][None]
            rate /= rate.sum(1, keepdims=True)
            mu = lib[:, None] * rate
            counts = rng.poisson(rng.gamma(cfg.nb_theta, mu / cfg.nb_theta)).astype(np.int32)

            look = renderer.look(mutated, donors[d])
            spacing = BIN_UM / cfg.pixel_size_um
            for lo in range(0, m, 256):
                hi = min(m, lo + 256)
                patches = renderer.render(comp[lo:hi], n_nuclei[lo:hi], n_rbc[lo:hi], state[lo:hi], look, rng)
                collect()
                encoding.extend(pool.submit(encode_png, patch) for patch in patches)

            obs_parts.append(pd.DataFrame({
                keys.SAMPLE: sid,
                keys.DONOR: f"donor{d:02d}",
                keys.SPLIT: layout.split_of_donor[d],
                keys.TISSUE: tissue_names[tissue],
                keys.SOURCE: SOURCE,
                keys.X: (grid[:, 1] + 0.5) * spacing,
                keys.Y: (grid[:, 0] + 0.5) * spacing,
                keys.MUTATION: np.full(m, mutated, np.int64),
                keys.CELL_TYPE: np.array([t.name for t in types], dtype=object)[comp.argmax(1)],
            }))
            counts_parts.append(counts)
            comp_parts.append(comp.astype(np.float32))
            state_parts.append(state.astype(np.float32))
        collect()
    finally:
        pool.shutdown()
        bar.close()

    splits = {split: [sid for s, sid in enumerate(layout.sample_ids)
                      if layout.split_of_donor[layout.donor_of[s]] == split] for split in ("train", "val", "test")}
    truth = {
        "cell_types": [t.name for t in types],
        "markers": {t.name: [genes[i] for i in prog.markers[k]] for k, t in enumerate(types)},
        "mutation_genes": [genes[i] for i in prog.mutation],
        "state_genes": {name: [genes[i] for i in prog.states[j]] for j, (name, _) in enumerate(_STATES)},
        "donor_split": {f"donor{d:02d}": split for d, split in sorted(layout.split_of_donor.items())},
        "sample_mutation": dict(zip(layout.sample_ids, layout.mutation_of, strict=True)),
    }
    provenance = {"source": SOURCE, "config": asdict(cfg), "version": hescape.__version__, "truth": truth}
    if cfg.genes_file is not None:
        from hescape.io import sha256_file

        provenance["genes_sha256"] = sha256_file(cfg.genes_file)
    meta = PanelMeta(
        name=cfg.name, genes=list(genes), splits=splits, patch_size_px=cfg.patch_px, patch_size_um=cfg.patch_um,
        pixel_size_um=cfg.pixel_size_um, ensembl_ids=ensembl, label_columns=[keys.MUTATION], provenance=provenance,
    )
    obs = pd.concat(obs_parts, ignore_index=True)
    return Panel(meta=meta, obs=obs, counts=np.concatenate(counts_parts), images=images,
                 obsm={keys.COMPOSITION: np.concatenate(comp_parts), STATE: np.concatenate(state_parts)})


def simulate_to_dir(cfg: SimulationConfig, out_dir: str | Path, overwrite: bool = False,
                    progress: bool = False) -> PanelMeta:
    """Simulate and write a curated panel directory (atomically); returns its ``panel.json`` metadata."""
    import hescape

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # fail before minutes of work, not after
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    panel = simulate_panel(cfg, progress=progress)
    effective = panel.meta.provenance["config"]
    provenance = {"source": SOURCE, "config": effective, "version": hescape.__version__}
    return write_panel(panel, out_dir, overwrite=overwrite, provenance=provenance)
