"""Retrieval metrics (issue 4 item 1): hand-computed cases, ties, chance, chunked == dense, batch protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hescape.evaluate.retrieval import (
    batch_retrieval,
    flatten,
    global_retrieval,
    summarize_ranks,
    true_partner_ranks,
)

# Three pairs worked out by hand (normalize=False, so similarities are plain dot products):
#   image @ gene.T = [[2, 0, 1],      gene @ image.T = [[2, 0, 2],
#                     [0, 1, 1],                        [0, 1, 1],
#                     [2, 1, 2]]                        [1, 1, 2]]
# I2G: row 0 partner 2 is the strict maximum -> rank 1; row 1 partner 1 ties with candidate 2 -> rank 2;
# row 2 partner 2 ties with candidate 0 -> rank 2. G2I: ranks 2, 2, 1 by the same reasoning.
IMAGE = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
GENE = np.array([[2, 0], [0, 1], [1, 1]], dtype=np.float32)


def dense_ranks(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The plain O(N^2) computation in float64 that the chunked one must reproduce."""
    sims = queries.astype(np.float64) @ candidates.astype(np.float64).T
    return (sims >= np.diag(sims)[:, None]).sum(1)


def test_hand_computed_ranks_count_ties_against_the_partner():
    assert true_partner_ranks(IMAGE, GENE, normalize=False).tolist() == [1, 2, 2]
    assert true_partner_ranks(GENE, IMAGE, normalize=False).tolist() == [2, 2, 1]


def test_hand_computed_summary():
    out = global_retrieval(IMAGE, GENE, normalize=False)
    i2g = out["I2G"]
    assert i2g["R@1"] == pytest.approx(1 / 3)
    assert i2g["R@5"] == 1.0 and i2g["R@10"] == 1.0
    assert i2g["mean_rank"] == pytest.approx(5 / 3)
    assert i2g["median_rank"] == 2.0
    assert i2g["chance_R@1"] == pytest.approx(1 / 3)
    assert i2g["chance_R@5"] == 1.0  # k >= N: capped at 1
    assert out["G2I"]["R@1"] == pytest.approx(1 / 3)


def test_normalisation_changes_the_hand_case_as_cosine_similarity_should():
    # With unit vectors, image 0 = (1, 0) is closest to gene 0 = (1, 0) (cos 1) and gene 2 (cos 0.71):
    # rank 1. Image 1 = (0, 1): gene 1 (cos 1) beats gene 2: rank 1. Image 2: gene 2 (cos 1): rank 1.
    assert true_partner_ranks(IMAGE, GENE, normalize=True).tolist() == [1, 1, 1]


def test_constant_embedding_is_not_perfect():
    n = 20
    const = np.ones((n, 8), dtype=np.float32)
    ranks = true_partner_ranks(const, const)
    assert (ranks == n).all()  # every candidate ties with the partner: worst rank
    out = global_retrieval(const, const)["I2G"]
    assert out["R@1"] == 0.0 and out["R@10"] == 0.0
    assert out["mean_rank"] == n


def test_perfect_embedding():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 32)).astype(np.float32)
    for direction in global_retrieval(emb, emb * 3.0).values():  # scale is removed by normalisation
        assert direction["R@1"] == 1.0
        assert direction["mean_rank"] == 1.0 and direction["median_rank"] == 1.0


def test_random_embedding_is_near_chance():
    rng = np.random.default_rng(1)
    n = 1000
    img = rng.normal(size=(n, 32)).astype(np.float32)
    gene = rng.normal(size=(n, 32)).astype(np.float32)
    for direction in global_retrieval(img, gene).values():
        assert direction["chance_R@10"] == pytest.approx(0.01)
        # Binomial(1000, 0.01): sd ~ 0.003.
        assert abs(direction["R@10"] - 0.01) < 0.012
        # Uniform rank on 1..1000: mean 500.5, sd of the mean ~ 9.
        assert abs(direction["mean_rank"] - (n + 1) / 2) < 45


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 150, 300, 1000])
def test_chunked_equals_dense_exactly_on_integer_embeddings(chunk_size):
    # Small integers make every dot product exact in float32 and create many ties, so equality is exact.
    rng = np.random.default_rng(2)
    img = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)
    gene = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)
    got = true_partner_ranks(img, gene, normalize=False, chunk_size=chunk_size)
    np.testing.assert_array_equal(got, dense_ranks(img, gene))


@pytest.mark.parametrize("chunk_size", [1, 33, 128, 257, 500])
def test_chunked_equals_dense_on_normalised_float_embeddings(chunk_size):
    rng = np.random.default_rng(3)
    img = rng.normal(size=(257, 16)).astype(np.float32)
    gene = (img + rng.normal(scale=1.0, size=img.shape)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = dense_ranks(unit(img), unit(gene))
    np.testing.assert_array_equal(true_partner_ranks(img, gene, chunk_size=chunk_size), expected)
    dense = global_retrieval(img, gene, chunk_size=len(img))
    assert global_retrieval(img, gene, chunk_size=chunk_size) == dense


def test_torch_input_matches_numpy():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(50, 8)).astype(np.float32)
    gene = rng.normal(size=(50, 8)).astype(np.float32)
    np.testing.assert_array_equal(true_partner_ranks(torch.from_numpy(img), torch.from_numpy(gene)),
                                  true_partner_ranks(img, gene))


def test_nan_pair_ranks_last_and_leaves_others_alone():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(10, 8)).astype(np.float32)
    bad = emb.copy()
    bad[3] = np.nan
    for q, c in ((bad, emb), (emb, bad)):
        ranks = true_partner_ranks(q, c)
        assert ranks[3] == 10
        assert (np.delete(ranks, 3) == 1).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="pair one to one"):
        true_partner_ranks(np.zeros((3, 2)), np.zeros((4, 2)))


def test_batch_protocol_hand_example_with_partial_last_batch():
    # 5 pairs in batches of 3: [0, 1, 2] is perfect, the partial batch [3, 4] is constant (both ranks 2).
    img = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [1, 1, 1]], dtype=np.float32)
    out = batch_retrieval(img, img.copy(), batch_size=3)
    for direction in ("I2G", "G2I"):
        r = out[direction]
        assert r["n_batches"] == 2
        assert r["R@1"] == pytest.approx(0.5)  # (1 + 0) / 2: batches weigh equally (pooled would be 3/5)
        assert r["mean_rank"] == pytest.approx(1.5)  # (1 + 2) / 2
        assert r["median_rank"] == pytest.approx(1.5)
        assert r["chance_R@1"] == pytest.approx((1 / 3 + 1 / 2) / 2)
        assert r["chance_R@5"] == 1.0
    dropped = batch_retrieval(img, img.copy(), batch_size=3, drop_last=True)
    assert dropped["I2G"]["n_batches"] == 1 and dropped["I2G"]["R@1"] == 1.0


def test_batch_protocol_skips_a_single_pair_batch():
    img = np.eye(4, dtype=np.float32)
    out = batch_retrieval(img, img, batch_size=3)  # batches [0, 1, 2] and [3]; one pair cannot be ranked
    assert out["I2G"]["n_batches"] == 1


def test_batch_protocol_only_ranks_within_the_batch():
    # Pairs 0 and 2 are identical, so globally they tie; batches of 2 separate them and each batch is perfect.
    img = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=np.float32)
    assert batch_retrieval(img, img, batch_size=2)["I2G"]["R@1"] == 1.0
    assert global_retrieval(img, img)["I2G"]["R@1"] == 0.0


def test_batch_chance_level_is_the_published_one():
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(128, 8)).astype(np.float32)
    r = batch_retrieval(emb, emb)["I2G"]
    assert r["n_batches"] == 2
    assert r["chance_R@5"] == pytest.approx(5 / 64)
    assert r["chance_R@1"] == pytest.approx(1 / 64)


def test_summarize_ranks_and_flatten():
    s = summarize_ranks(np.array([1, 3, 12]), n_candidates=20)
    assert s["R@1"] == pytest.approx(1 / 3) and s["R@5"] == pytest.approx(2 / 3) and s["R@10"] == pytest.approx(2 / 3)
    assert s["mean_rank"] == pytest.approx(16 / 3) and s["median_rank"] == 3.0
    flat = flatten({"I2G": {"R@5": 0.5}, "G2I": {"mean_rank": 2.0}}, "test_global")
    assert flat == {"test_global_i2g_R_at_5": 0.5, "test_global_g2i_mean_rank": 2.0}
