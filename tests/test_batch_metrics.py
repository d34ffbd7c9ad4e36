"""Batch-effect metrics (issue 4 item 4): mixing vs separation, label recovery, graph connectivity, ASW scaling.

scib-metrics compiles (jax) once per array shape, so the embeddings here share one shape (240 cells:
4 labels x 60, 3 batches) wherever they can; the tests that call it are marked slow (~30 s together,
mostly the first compilation).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import silhouette_score

from hescape.evaluate.batch_metrics import (
    batch_metrics,
    batch_report,
    graph_connectivity,
    knn,
    subsample_rows,
)

N_LABELS, PER_LABEL, N_BATCHES, DIM = 4, 60, 3, 8
LABELS = np.repeat([f"type{i}" for i in range(N_LABELS)], PER_LABEL)
BATCHES = np.tile([f"s{i}" for i in range(N_BATCHES)], N_LABELS * PER_LABEL // N_BATCHES)
CENTRES = 12.0 * np.eye(N_LABELS, DIM)


def embedding(seed: int, batch_shift: float = 0.0) -> np.ndarray:
    """Label clusters; each batch moved by ``batch_shift`` along its own axis."""
    rng = np.random.default_rng(seed)
    x = CENTRES[np.searchsorted(np.unique(LABELS), LABELS)] + rng.normal(size=(len(LABELS), DIM))
    b = np.searchsorted(np.unique(BATCHES), BATCHES)
    x[np.arange(len(x)), N_LABELS + b] += batch_shift
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def mixed() -> dict:
    return batch_metrics(embedding(0), BATCHES, LABELS)


@pytest.fixture(scope="module")
def separated() -> dict:
    return batch_metrics(embedding(1, batch_shift=30.0), BATCHES, LABELS)


@pytest.mark.slow  # jax compiles scib-metrics' functions per shape
def test_mixed_batches_score_high_and_separated_batches_low(mixed, separated):
    assert mixed["n_batches"] == 3 and mixed["n_labels"] == 4
    assert mixed["ilisi"] > 0.8  # neighbourhoods hold all three batches nearly evenly
    assert separated["ilisi"] < 0.05  # every neighbourhood holds one batch: (1 - 1) / (3 - 1) = 0
    assert mixed["batch_silhouette"] > 0.9
    assert separated["batch_silhouette"] < mixed["batch_silhouette"] - 0.3


@pytest.mark.slow  # jax compiles scib-metrics' functions per shape
def test_label_clusters_are_recovered(mixed):
    assert mixed["nmi"] > 0.99 and mixed["ari"] > 0.99
    assert mixed["label_silhouette"] > 0.75
    assert mixed["graph_connectivity"] == 1.0


@pytest.mark.slow  # jax compiles scib-metrics' functions per shape
def test_random_embedding_conserves_no_labels():
    rng = np.random.default_rng(2)
    out = batch_metrics(rng.normal(size=(len(LABELS), DIM)).astype(np.float32), BATCHES, LABELS)
    assert out["nmi"] < 0.1 and abs(out["ari"]) < 0.05
    assert out["label_silhouette"] == pytest.approx(0.5, abs=0.05)  # ASW ~ 0 rescaled to 1/2
    assert out["ilisi"] > 0.8  # and random batches are mixed


def test_graph_connectivity_hand_cases():
    # Label "a": 6 points on a line, each linked to its next neighbour; label "b": two far pairs.
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0], [101.0], [200.0], [201.0]])
    labels = np.array(["a"] * 6 + ["b"] * 4)
    nn = knn(x, 2)  # self + nearest neighbour
    # "a" is one component in the undirected graph (share 1); "b" is two pairs (largest share 2 / 4).
    assert graph_connectivity(nn.indices, labels) == pytest.approx((1.0 + 0.5) / 2)
    # Edges between labels do not connect a label: only the label's own cells count.
    assert graph_connectivity(nn.indices, np.array(["a", "b"] * 5)) < 1.0


def test_graph_connectivity_is_one_for_a_single_blob_unlike_scib_metrics_directed_version():
    import scib_metrics

    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    nn = knn(x, 15)
    labels = np.zeros(400, dtype=int)
    assert graph_connectivity(nn.indices, labels) == 1.0
    # scib-metrics takes strongly connected components of the directed graph: cells nobody else
    # counts among its neighbours split off, so one blob scores below 1 there.
    assert scib_metrics.graph_connectivity(nn, labels) < 1.0


def test_split_label_lowers_graph_connectivity_by_its_share():
    x = embedding(0).copy()
    # Move half of type3's cells far away: type3's largest component holds 30 of 60 cells.
    idx = np.flatnonzero(LABELS == "type3")[::2]
    x[idx] += 100.0
    nn = knn(x, 15)
    assert graph_connectivity(nn.indices, LABELS) == pytest.approx((1 + 1 + 1 + 0.5) / 4)


def test_knn_lists_each_cell_first_even_with_duplicates():
    x = np.zeros((5, 2), dtype=np.float32)  # all duplicates: every distance ties at 0
    nn = knn(x, 3)
    np.testing.assert_array_equal(nn.indices[:, 0], np.arange(5))
    assert (nn.indices[:, 1:] != np.arange(5)[:, None]).all()
    assert nn.distances.shape == (5, 3)


@pytest.mark.slow  # jax compiles scib-metrics' functions per shape
def test_label_silhouette_is_sklearns_rescaled_on_a_hand_case():
    # 1-D points 0, 1 (label a) and 10, 11 (label b). Point 0: a = 1, b = mean(10, 11) = 10.5, s = 1 - 1/10.5;
    # point 1: a = 1, b = mean(9, 10) = 9.5, s = 1 - 1/9.5; points 10 and 11 mirror them.
    x = np.array([[0.0], [1.0], [10.0], [11.0]], dtype=np.float32)
    labels = np.array(["a", "a", "b", "b"])
    hand = np.mean([1 - 1 / 10.5, 1 - 1 / 9.5, 1 - 1 / 9.5, 1 - 1 / 10.5])
    assert silhouette_score(x, labels) == pytest.approx(hand)
    out = batch_metrics(x, np.array(["s0", "s1", "s0", "s1"]), labels)
    assert out["label_silhouette"] == pytest.approx((hand + 1) / 2, abs=1e-6)
    assert out["nmi"] == pytest.approx(1.0) and out["ari"] == pytest.approx(1.0)
    # Each label holds one cell per batch: a batch silhouette needs fewer batches than cells, so scIB
    # skips every label and the score is undefined.
    assert np.isnan(out["batch_silhouette"])


@pytest.mark.slow  # jax compiles scib-metrics' functions per shape
def test_undefined_scores_are_nan():
    x = embedding(0)
    one_batch = batch_metrics(x, np.zeros(len(x)), LABELS)
    assert np.isnan(one_batch["ilisi"]) and np.isnan(one_batch["batch_silhouette"])
    assert one_batch["nmi"] > 0.99
    no_label = batch_metrics(x, BATCHES, None)
    assert np.isnan(no_label["nmi"]) and np.isnan(no_label["label_silhouette"])
    assert no_label["ilisi"] > 0.8 and no_label["n_labels"] == 1
    with pytest.raises(ValueError, match="NaN"):
        batch_metrics(np.full((4, 2), np.nan), [0, 1, 0, 1], [0, 0, 1, 1])


@pytest.mark.slow  # jax compiles scib-metrics' functions per shape
def test_batch_report_keys_and_values():
    obs = pd.DataFrame({"sample_id": BATCHES, "donor": np.where(BATCHES == "s0", "d0", "d1"), "tissue": LABELS})
    report = batch_report({"image_aligned": embedding(0), "gene_aligned": embedding(1, batch_shift=30.0)}, obs)
    expected = {"n_cells"}
    for bk in ("sample_id", "donor"):
        expected |= {f"batch={bk}.ilisi", f"batch={bk}.label=tissue.batch_silhouette"}
    expected |= {f"label=tissue.{m}" for m in ("graph_connectivity", "nmi", "ari", "label_silhouette")}
    for name in ("image_aligned", "gene_aligned"):
        assert {k.split(".", 1)[1] for k in report if k.startswith(name + ".")} == expected
    assert report["image_aligned.n_cells"] == len(obs)
    assert report["image_aligned.batch=sample_id.ilisi"] > 0.8
    assert report["gene_aligned.batch=sample_id.ilisi"] < 0.05
    direct = batch_metrics(embedding(0), BATCHES, LABELS)
    assert report["image_aligned.batch=sample_id.ilisi"] == pytest.approx(direct["ilisi"])
    assert report["image_aligned.label=tissue.nmi"] == pytest.approx(direct["nmi"])
    with pytest.raises(ValueError, match="has 3 rows"):
        batch_report({"bad": np.zeros((3, 2))}, obs)


def test_subsample_rows_is_seeded_and_sorted():
    assert subsample_rows(10, None).tolist() == list(range(10))
    assert subsample_rows(10, 20).tolist() == list(range(10))
    rows = subsample_rows(1000, 100, seed=3)
    assert len(rows) == 100 and len(set(rows.tolist())) == 100 and (np.diff(rows) > 0).all()
    assert rows.tolist() == subsample_rows(1000, 100, seed=3).tolist()
