"""The video recipe (recipes/video/): its config reads as the trainer's, its sets draw seeds no other recipe
used, and the base it trains from is the shipped model grown by the video tokens."""

import importlib.util
import sys
from pathlib import Path

from tokenloom.train import load_config

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("video_recipe", ROOT / "recipes" / "video" / "build.py")
recipe = importlib.util.module_from_spec(SPEC)
sys.modules["video_recipe"] = recipe
SPEC.loader.exec_module(recipe)


def test_config_mixes_the_video_and_replay_sets(tmp_path) -> None:
    config = load_config(recipe.write_config(tmp_path, smoke=False))
    assert [s["name"] for s in config.data.train] == ["video", "replay"]
    assert [s["weight"] for s in config.data.train] == [0.6, 0.4]
    assert config.data.seq_len >= 6 * 76 + 3 + 20  # a 6-frame 64x64 video and its prompt fit a row
    assert config.model.pipeline == str(tmp_path / "base")
    smoke = load_config(recipe.write_config(tmp_path, smoke=True))
    assert smoke.train.max_steps == 4


def test_sets_use_fresh_seeds_and_every_task() -> None:
    seeds = [seed for seed, _ in recipe.SETS.values()]
    assert min(seeds) >= 58 and len(set(seeds)) == len(seeds)  # seeds 0-57 went to earlier recipes
    video, replay = recipe.SETS["video"][1], recipe.SETS["replay"][1]
    assert set(video) == set(recipe.VIDEO_TASKS) and set(replay) == set(recipe.OLD_TASKS)


def test_base_is_the_given_model_grown_by_video(tmp_path, old_pipe) -> None:
    from tokenloom.pipeline import Pipeline

    old_pipe.save_pretrained(tmp_path / "old")
    base = recipe.build_base(tmp_path, tmp_path / "old")
    assert Pipeline.from_pretrained(base).vocab.has_video
    assert recipe.build_base(tmp_path, tmp_path / "old") == base  # done once
