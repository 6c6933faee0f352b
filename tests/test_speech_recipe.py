"""The speech recipe (recipes/speech/): its configs read as their trainers', its sets draw seeds no other recipe
used, and it mixes the speech tasks with replay of every old one."""

import importlib.util
import sys
from pathlib import Path

from tokenloom.train import load_config
from tokenloom.train.codec import load_codec_config

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("speech_recipe", ROOT / "recipes" / "speech" / "build.py")
recipe = importlib.util.module_from_spec(SPEC)
sys.modules["speech_recipe"] = recipe
SPEC.loader.exec_module(recipe)


def test_configs_read_as_their_trainers(tmp_path) -> None:
    config = load_config(recipe.write_config(tmp_path, smoke=False))
    assert [s["name"] for s in config.data.train] == ["speech", "replay"]
    assert config.model.pipeline == str(tmp_path / "base")
    assert load_config(recipe.write_config(tmp_path, smoke=True)).train.max_steps == 4
    for name in ("train", "eval"):
        (tmp_path / "corpus" / name).mkdir(parents=True)
        (tmp_path / "corpus" / name / "manifest.jsonl").write_text("")
    codec = load_codec_config(recipe.write_codec_config(tmp_path, smoke=True))
    assert codec.train.steps == 4 and codec.model.codebooks == 4


def test_sets_use_fresh_seeds_and_every_task() -> None:
    seeds = [seed for seed, _ in recipe.SETS.values()] + [seed for seed, _, _ in recipe.CORPUS.values()]
    assert min(seeds) >= 61 and len(set(seeds)) == len(seeds)  # seeds 0-60 went to earlier recipes
    speech, replay = recipe.SETS["speech"][1], recipe.SETS["replay"][1]
    assert set(speech) == set(recipe.SPEECH_TASKS) and set(replay) == set(recipe.OLD_TASKS)
    assert recipe.CORPUS["eval"][2] and not recipe.CORPUS["train"][2]  # held-out voices only in the eval corpus


def test_the_voice_probe_names_voices_only_from_a_level_that_carries_them() -> None:
    """recipes/speech/codec_report.voice_probe: level 0 picks a code band per voice (the probe names every
    voice), level 1 is the same random codes for every voice (about chance)."""
    spec = importlib.util.spec_from_file_location("codec_report", ROOT / "recipes" / "speech" / "codec_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    import numpy as np

    rng = np.random.default_rng(0)
    voices = [f"v{i % 4}" for i in range(40)]
    codes = [np.stack([rng.integers(8 * (i % 4), 8 * (i % 4) + 8, 30), rng.integers(0, 32, 30)]) for i in range(40)]
    probe = report.voice_probe(codes, voices, 32)
    assert probe["voices"] == 4 and probe["utterances"] == 40 and probe["chance"] == 0.25
    assert probe["accuracy"][0] == 1.0 and probe["accuracy"][1] < 0.5
