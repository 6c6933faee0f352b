"""The growth recipe (recipes/grow/): its config reads as the trainer's at the shipped model's last learning
rate, its sets draw seeds no other recipe used, and its base is the given model with both new modalities,
whose old logits are unchanged."""

import importlib.util
import sys
from pathlib import Path

import torch

from tokenloom.pipeline import Pipeline
from tokenloom.train import load_config

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("grow_recipe", ROOT / "recipes" / "grow" / "build.py")
recipe = importlib.util.module_from_spec(SPEC)
sys.modules["grow_recipe"] = recipe
SPEC.loader.exec_module(recipe)


def test_config_mixes_both_modalities_with_replay_at_the_last_stage_rate(tmp_path) -> None:
    import yaml

    config = load_config(recipe.write_config(tmp_path, smoke=False))
    assert [s["name"] for s in config.data.train] == ["video", "speech", "replay"]
    assert sum(s["weight"] for s in config.data.train) == 1.0 and config.data.train[2]["weight"] == 0.5
    stages = yaml.safe_load((ROOT / "recipes" / "shapes-tiny" / "stages.yaml").read_text())["stages"]
    assert config.optim.lr == stages[-1]["lr"]  # the rate the shipped model's training ended on
    assert config.model.pipeline == str(tmp_path / "base")
    assert load_config(recipe.write_config(tmp_path, smoke=True)).train.max_steps == 4


def test_sets_use_fresh_seeds_and_every_task() -> None:
    earlier = ([s for s, _ in recipe.video.SETS.values()] + [s for s, _ in recipe.speech.SETS.values()]
               + [s for s, _, _ in recipe.speech.CORPUS.values()])
    seeds = [seed for seed, _ in [*recipe.SETS.values(), *recipe.MORE_SETS.values()]]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(earlier) and min(seeds) > max(earlier)
    more = {name: set(counts) for name, (_, counts) in recipe.MORE_SETS.items()}
    assert more["speech-more"] == set(recipe.SPEECH_TASKS) and more["video-more"] == set(recipe.VIDEO_TASKS)
    assert more["eval-more"] == more["speech-more"] | more["video-more"]
    sets = {name: set(counts) for name, (_, counts) in recipe.SETS.items()}
    assert sets["video"] == set(recipe.VIDEO_TASKS) and sets["speech"] == set(recipe.SPEECH_TASKS)
    assert sets["replay"] == set(recipe.OLD_TASKS) and sets["eval"] == sets["video"] | sets["speech"] | sets["replay"]


def test_base_has_both_modalities_and_the_old_logits(tmp_path, speech_pipe, old_pipe) -> None:
    speech_pipe.speech_tokenizer.save_pretrained(tmp_path / "codec" / "best")
    old_pipe.save_pretrained(tmp_path / "old")
    base = Pipeline.from_pretrained(recipe.build_base(tmp_path, tmp_path / "old"))
    assert base.vocab.has_video and base.vocab.speech_codebooks == 4
    assert base.speech_tokenizer is not None
    ids = torch.arange(0, old_pipe.vocab.size, 7)[None]
    with torch.no_grad():
        old, new = old_pipe.model(ids), base.model(ids)
    assert torch.allclose(new[..., :old_pipe.vocab.size], old, atol=1e-5)  # the old ids' predictions kept
    assert recipe.build_base(tmp_path, tmp_path / "old") == tmp_path / "base"  # done once


def test_the_experts_variant_trains_only_experts_on_the_new_sets(tmp_path, speech_pipe, old_pipe) -> None:
    config = load_config(recipe.write_config(tmp_path, smoke=False, stage="experts"))
    assert [s["name"] for s in config.data.train] == ["video", "speech"]  # no replay: the old tasks cannot move
    assert config.train.trainable == "experts" and config.model.pipeline == str(tmp_path / "base-experts")
    speech_pipe.speech_tokenizer.save_pretrained(tmp_path / "codec" / "best")
    old_pipe.save_pretrained(tmp_path / "old")
    base = Pipeline.from_pretrained(recipe.build_base(tmp_path, tmp_path / "old", experts=True))
    assert base.model.config.experts == ["video", "speech"]
    plain = Pipeline.from_pretrained(recipe.build_base(tmp_path, tmp_path / "old"))
    assert base.vocab == plain.vocab  # the same ids: one set of shards serves both variants
    ids = torch.arange(0, base.vocab.size, 5)[None]
    with torch.no_grad():  # the experts start as copies: the same model as the plain base
        assert torch.equal(base.model(ids), plain.model(ids))
    # --experts-rest goes on from the experts run's model with expert_scope "rest", on the same sets.
    config = load_config(recipe.write_config(tmp_path, smoke=False, stage="experts-rest"))
    assert config.model.pipeline == str(tmp_path / "base-experts-rest") and config.train.trainable == "experts"
    assert [s["name"] for s in config.data.train] == ["video", "speech"]
    base.save_pretrained(tmp_path / "experts" / "final")
    rest = Pipeline.from_pretrained(recipe.rest_base(tmp_path))
    assert rest.model.config.expert_scope == "rest" and rest.model.span_end_ids.numel() == 0
    assert torch.equal(rest.model.state_dict()["layers.0.attention.expert.wq.weight"],
                       base.model.state_dict()["layers.0.attention.expert.wq.weight"])
    # --experts-head goes on from the rest run's model, its experts given a copy of the norm and head.
    config = load_config(recipe.write_config(tmp_path, smoke=False, stage="experts-head"))
    assert config.model.pipeline == str(tmp_path / "base-experts-head") and config.train.trainable == "experts"
    rest.save_pretrained(tmp_path / "experts-rest" / "final")
    head = Pipeline.from_pretrained(recipe.head_base(tmp_path))
    assert head.model.config.expert_head and head.model.config.expert_scope == "rest"
    ids = torch.tensor([[*range(0, 40, 3), head.vocab.video_begin, *range(1, 40, 3)]])
    with torch.no_grad():
        assert torch.equal(head.model(ids), rest.model(ids))
    # --experts-more trains the head run's model as it is, on its own fresh sets.
    config = load_config(recipe.write_config(tmp_path, smoke=False, stage="experts-more"))
    assert config.model.pipeline == str(tmp_path / "experts-head" / "final") and config.train.trainable == "experts"
    assert [s["path"] for s in config.data.train] == [str(tmp_path / "shards" / n) for n in ("speech-more", "video-more")]
    assert config.data.eval == [str(tmp_path / "shards" / "eval-more")]


def test_an_expert_stage_trains_the_stages_before_it_that_are_not_done(tmp_path, monkeypatch) -> None:
    trained = []
    monkeypatch.setattr(recipe, "train_from", lambda template, work, name, smoke: trained.append(name))
    monkeypatch.setattr(recipe, "EXPERT_STAGES", {s: (lambda work, smoke: None) for s in recipe.EXPERT_STAGES})
    recipe.train_grown(tmp_path, False, "experts-more")
    assert trained == ["experts", "experts-rest", "experts-head", "experts-more"]
    (tmp_path / "experts-rest" / "final").mkdir(parents=True)
    (tmp_path / "experts-rest" / "final" / "config.json").write_text("{}")
    trained.clear()
    recipe.train_grown(tmp_path, False, "experts-head")
    assert trained == ["experts-head"]  # a finished rest run: the head stage goes on from it


def test_same_answers_finds_a_grown_model_answering_as_its_base_and_one_that_does_not(tmp_path, old_pipe) -> None:
    spec = importlib.util.spec_from_file_location("same_answers", ROOT / "recipes" / "grow" / "same_answers.py")
    same = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(same)
    from tokenloom.modalities import add_modality

    old_pipe.save_pretrained(tmp_path / "base")
    grown = add_modality(old_pipe, "video", experts=True)
    grown.save_pretrained(tmp_path / "grown")
    argv = ["--base", str(tmp_path / "base"), "--n", "2", "--tasks", "caption,qa", "--out", str(tmp_path / "r.json")]
    assert same.main(["--grown", str(tmp_path / "grown"), *argv]) == 0
    with torch.no_grad():  # a model whose old weights moved answers otherwise
        for p in grown.model.layers[0].feed_forward.w2.parameters():
            p.mul_(-3.0)
    grown.save_pretrained(tmp_path / "moved")
    assert same.main(["--grown", str(tmp_path / "moved"), *argv]) == 1
    assert (tmp_path / "r.json").exists()
