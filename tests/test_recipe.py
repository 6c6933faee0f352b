"""The shapes-tiny recipe (recipes/shapes-tiny/): its stage table resolves to the configs the shipped
model was trained with, it never installs unasked or into an installed package, and end to end at toy
scale every stage runs and reads the datasets it names."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import tokenloom
from tokenloom.pipeline import Pipeline
from tokenloom.train import TrainConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shapes-tiny"
sys.path.insert(0, str(RECIPE))  # on sys.path (not loaded from a spec) so that spawned workers import it too
import build as recipe  # noqa: E402

# What configs/shapes-tiny*.yaml and tokenloom/world/recipe.py said before the recipe moved here.
OLD = json.loads((ROOT / "tests" / "fixtures" / "shapes-tiny-stages.json").read_text())


def test_recipe_is_outside_the_package():
    assert recipe.__file__ == str(RECIPE / "build.py")
    assert importlib.util.find_spec("tokenloom.world.recipe") is None
    package = Path(tokenloom.__file__).resolve().parent
    assert not (package / "world" / "recipe.py").exists()
    assert "recipe" not in (package / "world" / "__init__.py").read_text()


def test_stage_table_resolves_to_the_old_stage_configs(tmp_path):
    assert [s.name for s in recipe.STAGES] == [old["name"] for old in OLD["stages"]]
    previous = None
    for s, old in zip(recipe.STAGES, OLD["stages"]):
        expected = old["config"]
        # The row's own columns, read straight off the table.
        assert list(s.seeds) == old["seeds"], s.name
        assert s.steps == expected["train"]["max_steps"] and s.lr == expected["optim"]["lr"], s.name
        assert s.start == ("random" if previous is None else previous), s.name
        assert expected["model"]["pipeline"] == ("base" if previous is None else f"{previous}/final")
        previous = s.name
        # base.yaml + row: exactly the old file's keys and values (paths relative to the work directory) ...
        resolved = recipe.stage_config(s)
        assert resolved == expected, s.name
        # ... so the trainer reads the same TrainConfig, and the written file resolves under the work directory.
        source = str(tmp_path / f"{s.name}.yaml")
        assert TrainConfig.from_dict(resolved, source).to_dict() == TrainConfig.from_dict(expected, source).to_dict()
        loaded = load_config(recipe.write_stage_config(s, tmp_path))
        assert loaded.to_dict() == TrainConfig.from_dict(expected, source).to_dict()
        assert loaded.data.train == [str(recipe._train_shards(tmp_path, seed)) for seed in s.seeds]
    assert recipe.stage(11).other["train.device"] == "cuda"
    # Every set holds the old recipe's task counts; the eval set too.
    assert {str(seed): recipe.train_counts(seed) for seed in recipe.SEED_MIX} == OLD["train_counts"]
    assert recipe.EVAL_COUNTS == OLD["eval_counts"] and recipe.EVAL_SEED == OLD["eval_seed"]
    assert (recipe.TEXT_VOCAB, recipe.MAX_GRID) == (OLD["text_vocab"], OLD["max_grid"])


def test_overrides_and_table_checks():
    s = recipe.stage("train-11")
    config = recipe.stage_config(s, pipeline="/elsewhere", seeds=[16], max_steps=2, device="cpu", batch_size=4)
    assert config["model"]["pipeline"] == "/elsewhere" and config["data"]["train"] == ["shards/train-seed16"]
    assert (config["train"]["max_steps"], config["train"]["device"], config["data"]["batch_size"]) == (2, "cpu", 4)
    assert recipe.stage_config(s)["train"]["max_steps"] == 2809  # the table itself is unchanged
    with pytest.raises(KeyError):
        recipe.train_counts(43)  # no stage reads it
    table = {**recipe.TABLE, "stages": [dict(row) for row in recipe.TABLE["stages"]]}
    table["stages"][2]["seeds"] = [0, 3]  # seed 0 is an early set, stage 3's mix too: fine
    recipe._load_stages(table, "t")
    table["stages"][5]["seeds"] = [0]  # but stage 6 reads late sets
    with pytest.raises(recipe.RecipeError, match="seed 0"):
        recipe._load_stages(table, "t")
    table = {**recipe.TABLE, "stages": [dict(row) for row in recipe.TABLE["stages"]]}
    table["stages"][3]["start"] = "train-9"
    with pytest.raises(recipe.RecipeError, match="earlier stage"):
        recipe._load_stages(table, "t")


def test_install_needs_an_explicit_directory_outside_installed_packages(tmp_path):
    with pytest.raises(SystemExit):
        recipe.main([])  # --work is required; there is no default anywhere
    with pytest.raises(SystemExit, match="installed environment"):
        recipe.check_install_target(tmp_path / "lib" / "site-packages" / "tokenloom" / "assets" / "shapes-tiny")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="no pipeline"):
        recipe.install(recipe.SHIPPED, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    target = recipe.install(recipe.SHIPPED, tmp_path / "model")
    (target / "stale.bin").write_bytes(b"old")
    recipe.install(recipe.SHIPPED, target)  # replaces the pipeline there
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in recipe.SHIPPED.iterdir())


@pytest.mark.slow
def test_recipe_runs_every_stage_at_toy_scale(tmp_path):
    work = tmp_path / "work"
    final = recipe.build(work, recipe.SHIPPED, install_to=tmp_path / "installed", scale=0.002, max_steps=2,
                         jobs=2, train_device="cpu", batch_size=8)
    assert final == work / recipe.STAGES[-1].name / "final"
    # Each stage trained on the shards of exactly the seeds the table gives it, from the stage before.
    for s in recipe.STAGES:
        config = load_config(work / f"{s.name}.yaml")
        assert config.data.train == [str(recipe._train_shards(work, seed)) for seed in s.seeds]
        assert config.model.pipeline == str(work / s.pipeline)
        metrics = [json.loads(line) for line in (work / s.name / "metrics.jsonl").read_text().splitlines()]
        assert max(m.get("step", 0) for m in metrics) == 2
    # Each seed's set holds that seed's task mix (later sets weight stories and edits more, stage 12's
    # questions, stage 13's stories and edits again).
    for seed in recipe.SEED_MIX:
        meta = recipe._train_dir(work, seed) / "train.meta.jsonl"
        tasks = [json.loads(line)["task"] for line in meta.read_text().splitlines()]
        assert {t: tasks.count(t) for t in set(tasks)} == recipe.train_counts(seed, 0.002)
    assert recipe.train_counts(7)["edit"] > recipe.train_counts(0)["edit"]
    perception, rebalanced = recipe.train_counts(31), recipe.train_counts(39)
    assert perception["qa"] > recipe.train_counts(7)["qa"]
    assert rebalanced["edit"] > perception["edit"] and rebalanced["story"] > perception["story"]
    pipe = Pipeline.from_pretrained(final)
    assert pipe.vocab.codebook_size == 1024
    installed = tmp_path / "installed"
    assert sorted(p.name for p in installed.iterdir()) == sorted(p.name for p in final.iterdir())


def test_parallel_preparation_gives_the_sequential_shards(tmp_path):
    seeds = [3, 7]
    sequential = recipe.prepare_train_shards(tmp_path / "one", seeds, recipe.SHIPPED, scale=0.0005)
    parallel = recipe.prepare_train_shards(tmp_path / "two", seeds, recipe.SHIPPED, scale=0.0005, jobs=2)
    assert [s["tokens"] for s in parallel] == [s["tokens"] for s in sequential]
    assert all(s["complete"] and s["documents"] > 0 for s in parallel)
    for seed in seeds:
        one = sorted(recipe._train_shards(tmp_path / "one", seed).glob("*.parquet"))
        two = sorted(recipe._train_shards(tmp_path / "two", seed).glob("*.parquet"))
        assert one and [p.name for p in one] == [p.name for p in two]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    # The two seeds' sets differ: each worker drew its own seed.
    assert sequential[0]["tokens"] != sequential[1]["tokens"]


def test_gpu_stage_script_follows_the_table(capsys):
    import gpu_stage  # recipes/shapes-tiny/gpu_stage.py (its folder is on sys.path above)

    assert gpu_stage.recipe is recipe
    with pytest.raises(SystemExit):
        gpu_stage.main(["--stage", "1", "--export", "unused"])  # stage 1 continues no stage
    assert "continues an earlier stage" in capsys.readouterr().err
