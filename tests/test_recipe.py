"""The shapes-tiny recipe end to end at toy scale: every stage runs, reads the datasets it names, and
--install-free output is a loadable pipeline."""

import json

import pytest

from tokenloom.pipeline import Pipeline
from tokenloom.world import recipe


@pytest.mark.slow
def test_recipe_runs_every_stage_at_toy_scale(tmp_path):
    work = tmp_path / "work"
    final = recipe.build(work, recipe.REPO / "configs", recipe.ASSET, install=False, scale=0.002, max_steps=2,
                         jobs=2, train_device="cpu", batch_size=8)
    assert final == work / recipe.STAGES[-1][1] / "final"
    # Each stage trained on the shards of exactly the seeds STAGES gives it.
    for name, out, seeds in recipe.STAGES:
        resolved = (work / f"{out}.yaml").read_text()
        for seed in seeds:
            assert str(recipe._train_shards(work, seed).resolve()) in resolved
        metrics = [json.loads(line) for line in (work / out / "metrics.jsonl").read_text().splitlines()]
        assert max(m.get("step", 0) for m in metrics) == 2
    # Each seed's set holds that seed's task mix (later sets weight stories and edits more, stage 12's
    # questions, stage 13's stories and edits again).
    for seed in {s for _, _, seeds in recipe.STAGES for s in seeds}:
        meta = recipe._train_dir(work, seed) / "train.meta.jsonl"
        tasks = [json.loads(line)["task"] for line in meta.read_text().splitlines()]
        assert {t: tasks.count(t) for t in set(tasks)} == recipe.train_counts(seed, 0.002)
    assert recipe.train_counts(7)["edit"] > recipe.train_counts(0)["edit"]
    assert recipe.train_counts(recipe.PERCEPTION_SEEDS[0])["qa"] > recipe.train_counts(7)["qa"]
    rebalanced, perception = recipe.train_counts(recipe.REBALANCE_SEEDS[0]), recipe.train_counts(recipe.PERCEPTION_SEEDS[0])
    assert rebalanced["edit"] > perception["edit"] and rebalanced["story"] > perception["story"]
    pipe = Pipeline.from_pretrained(final)
    assert pipe.vocab.codebook_size == 1024


def test_parallel_preparation_gives_the_sequential_shards(tmp_path):
    seeds = [3, 7]
    sequential = recipe.prepare_train_shards(tmp_path / "one", seeds, recipe.ASSET, scale=0.0005)
    parallel = recipe.prepare_train_shards(tmp_path / "two", seeds, recipe.ASSET, scale=0.0005, jobs=2)
    assert [s["tokens"] for s in parallel] == [s["tokens"] for s in sequential]
    assert all(s["complete"] and s["documents"] > 0 for s in parallel)
    for seed in seeds:
        one = sorted(recipe._train_shards(tmp_path / "one", seed).glob("*.parquet"))
        two = sorted(recipe._train_shards(tmp_path / "two", seed).glob("*.parquet"))
        assert one and [p.name for p in one] == [p.name for p in two]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    # The two seeds' sets differ: each worker drew its own seed.
    assert sequential[0]["tokens"] != sequential[1]["tokens"]
