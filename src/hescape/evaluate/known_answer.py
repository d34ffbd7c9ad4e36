"""Known-answer checks: what retrieval must score when the answer is known.

The simulator stores each spot's true cell-type composition, which drives both its image and its
expression. Used as the embedding of both modalities it is an *oracle*: a correct metric must put it
far above chance. Independent noise on each side (``oracle_noisy``) gives a realistic ceiling, and
random embeddings must score chance. A learned model is then judged against chance in the same
protocol, so "the pipeline learns something" is a checked statement rather than a hope.
"""

from __future__ import annotations

import numpy as np

from hescape.evaluate.retrieval import batch_retrieval, global_retrieval

# Thresholds the checks (and the seeded known-answer test) use, as multiples of chance R@5.
ORACLE_MIN_RATIO = 10.0
LEARNED_MIN_RATIO = 3.0


def composition_oracle(composition: np.ndarray, *, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Image and gene "embeddings" from the true composition.

    Parameters
    ----------
    composition
        ``(N, K)`` cell-type fractions (the simulator's ``obsm["composition"]``).
    noise
        Standard deviation of independent Gaussian noise added to each modality, in units of the
        composition's per-type standard deviation (0: both modalities get the exact composition).
    seed
        Seed of the noise.
    """
    comp = np.asarray(composition, dtype=np.float32)
    if noise <= 0:
        return comp, comp.copy()
    rng = np.random.default_rng(seed)
    scale = noise * comp.std(axis=0, keepdims=True).clip(min=1e-6)
    return (comp + rng.normal(size=comp.shape).astype(np.float32) * scale,
            comp + rng.normal(size=comp.shape).astype(np.float32) * scale)


def random_embeddings(n: int, dim: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Independent Gaussian embeddings of both modalities: the chance baseline."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(n, dim)).astype(np.float32))


def retrieval_both(image: np.ndarray, gene: np.ndarray, *, batch_size: int = 64, chunk_size: int = 2048,
                   normalize: bool = True) -> dict:
    """Retrieval in both protocols: ``{"batch": {"I2G": ..., "G2I": ...}, "global": {...}}``."""
    return {
        "batch": batch_retrieval(image, gene, batch_size=batch_size, normalize=normalize),
        "global": global_retrieval(image, gene, normalize=normalize, chunk_size=chunk_size),
    }


def known_answer_retrieval(composition: np.ndarray, *, noise: float = 1.0, seed: int = 0, batch_size: int = 64,
                           chunk_size: int = 2048) -> dict:
    """Retrieval of the oracle, the noisy oracle and random embeddings on the same rows.

    Returns
    -------
    dict
        ``{"oracle": ..., "oracle_noisy": ..., "random": ...}``, each as :func:`retrieval_both`,
        plus ``"noise"`` (the noise level used).
    """
    comp = np.asarray(composition, dtype=np.float32)
    out = {"noise": float(noise)}
    for name, (img, gene) in {
        "oracle": composition_oracle(comp),
        "oracle_noisy": composition_oracle(comp, noise=noise, seed=seed),
        "random": random_embeddings(len(comp), comp.shape[1], seed=seed),
    }.items():
        out[name] = retrieval_both(img, gene, batch_size=batch_size, chunk_size=chunk_size)
    return out


def ratio_to_chance(result: dict, k: int = 5) -> float:
    """Mean over I2G and G2I of ``R@k / chance R@k`` of one protocol's result."""
    ratios = [result[d][f"R@{k}"] / result[d][f"chance_R@{k}"] for d in ("I2G", "G2I")]
    return float(np.mean(ratios))


def checks(known: dict | None, learned: dict | None, *, k: int = 5) -> list[dict]:
    """The pass/fail statements the report prints (global protocol, R@k as a multiple of chance).

    Parameters
    ----------
    known
        :func:`known_answer_retrieval` output, or ``None`` when the panel has no ground truth.
    learned
        :func:`retrieval_both` output of a trained model (best checkpoint), or ``None``.
    """
    out = []
    if known is not None:
        for name, need in (("oracle", ORACLE_MIN_RATIO), ("random", None)):
            ratio = ratio_to_chance(known[name]["global"], k)
            out.append({
                "check": f"{name} composition" if name == "oracle" else "random embeddings",
                "statement": (f"global R@{k} >= {need:g}x chance" if need else f"global R@{k} ~ chance (< 2x)"),
                "ratio": ratio,
                "passed": bool(ratio >= need) if need else bool(ratio < 2.0),
            })
    if learned is not None:
        ratio = ratio_to_chance(learned["global"], k)
        out.append({"check": "learned (best checkpoint)", "statement": f"global R@{k} >= {LEARNED_MIN_RATIO:g}x chance",
                    "ratio": ratio, "passed": bool(ratio >= LEARNED_MIN_RATIO)})
    return out
