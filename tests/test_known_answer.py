"""Known-answer checks on the default simulated panel (issue 4 item 5).

(a) The simulator's ground-truth composition, used as the embedding of both modalities, must put
    global retrieval far above chance; random embeddings must not.
(b) A short CPU training with the default training settings (efficientnet_lite0 frozen + MLP gene
    encoder, CLIP, linear heads) must reach global R@5 >= 3x chance on the held-out test donors.

The panel is the simulator's default configuration (6,000 spots of 64 px, 8 samples of 4 donors,
seed 0; one donor held out for test), the one ``params.yaml`` builds. Seeded throughout.
"""

from __future__ import annotations

import pytest

from hescape.evaluate.known_answer import LEARNED_MIN_RATIO, ORACLE_MIN_RATIO


@pytest.mark.slow
def test_oracle_and_short_training_beat_chance_on_the_default_panel(tmp_path_factory, monkeypatch):
    from hescape.data import keys
    from hescape.data.shards import Shards
    from hescape.data.simulate import SimulationConfig, simulate_to_dir
    from hescape.evaluate.known_answer import checks, known_answer_retrieval, ratio_to_chance, retrieval_both
    from hescape.train.checkpoint import embed_split, load_trained
    from hescape.train.run import download_checkpoint, train_run

    root = tmp_path_factory.mktemp("known-answer")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.setenv("HESCAPE_ARTIFACT_ROOT", str(root / "mlartifacts"))
    panel = root / "panel"
    simulate_to_dir(SimulationConfig(), panel)  # the default panel, seed 0

    # Default training settings (TrainConfig), only the output locations moved into the temp dir;
    # in-process (local=True): the same loop Ray runs, without a cluster's start-up cost.
    params = {"preprocess": {"out_dir": str(root / "shards")},
              "train": {"cache_dir": str(root / "cache"), "storage_path": str(root / "runs")}}
    run_id = train_run(panel, params, local=True, progress=False)
    trained = load_trained(download_checkpoint(run_id, "best", root / "best"))
    emb = embed_split(trained, "test", return_trunk=False)
    learned = retrieval_both(emb.image, emb.gene, normalize=trained.cfg.normalize)

    test = Shards(trained.info["shards"]).split("test")
    assert set(test.obs[keys.DONOR]) and len(set(test.obs[keys.DONOR])) == 1  # one unseen donor
    known = known_answer_retrieval(test.obsm[keys.COMPOSITION], noise=1.0, seed=0)

    n = len(test.obs)
    assert known["oracle"]["global"]["I2G"]["chance_R@5"] == pytest.approx(5 / n)
    oracle = ratio_to_chance(known["oracle"]["global"])
    chance_like = ratio_to_chance(known["random"]["global"])
    got = ratio_to_chance(learned["global"])
    print(f"test spots {n}: global R@5 / chance: oracle {oracle:.1f}x, noisy oracle "
          f"{ratio_to_chance(known['oracle_noisy']['global']):.1f}x, random {chance_like:.1f}x, learned {got:.1f}x "
          f"(I2G {learned['global']['I2G']['R@5']:.4f}, G2I {learned['global']['G2I']['R@5']:.4f}, "
          f"chance {5 / n:.4f}); batch protocol learned I2G {learned['batch']['I2G']['R@5']:.3f}")
    assert oracle >= ORACLE_MIN_RATIO
    assert chance_like < 2.0
    assert got >= LEARNED_MIN_RATIO, f"learned global R@5 is {got:.2f}x chance, below {LEARNED_MIN_RATIO}x"
    assert all(c["passed"] for c in checks(known, learned))
