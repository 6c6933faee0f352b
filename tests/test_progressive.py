"""Progressive resolution (FP-SFT): a config's schedule of stages at growing image sizes runs in order
in one output directory, each stage from the previous one's weights, resumes inside any stage to the
losses of an uninterrupted run, and refuses image sizes the image tokenizer or the shards do not
have, before any stage trains."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokenloom
from tokenloom.checkpoint import load_weights
from tokenloom.cli import main as cli
from tokenloom.data import pretokenize, read_manifest
from tokenloom.pipeline import Pipeline, random_pipeline
from tokenloom.train import ConfigError, TrainError, load_config, train
from tokenloom.train.config import train_sources
from tokenloom.train.schedule import schedule_stages
from tokenloom.train.trainer import MetricsLog

SIZES = (16, 24, 32)  # multiples of the tiny VQGAN's factor 8


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny pipeline and text-to-image shards of the same documents at 16, 24 and 32 pixels."""
    root = tmp_path_factory.mktemp("progressive")
    pipe = random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32)
    pipe.save_pretrained(root / "pipe")
    (root / "img").mkdir()
    colors = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}
    for i, (name, rgb) in enumerate(colors.items()):
        image = Image.new("RGB", (40, 40), "white")
        image.paste(rgb, (4 + 6 * i, 8, 24 + 4 * i, 30))
        image.save(root / "img" / f"{name}.png")
    lines = [{"messages": [{"role": "user", "content": f"a {name} square"},
                           {"role": "assistant", "content": [{"type": "image", "path": f"img/{name}.png"}]}]}
             for k in range(12) for name in [list(colors)[k % 3]]]
    (root / "t2i.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for size in SIZES:  # parts without width/height take --image-size
        pretokenize(root / "t2i.jsonl", pipe, root / "shards" / f"t2i-{size}", image_size=size, shard_size=5,
                    progress=False)
    return root


STAGE1 = "    image_size: 24\n    data:\n      train: [{path: shards/t2i-24, weight: 3}, {path: shards/t2i-16, weight: 1}]\n"
TEMPLATE = """model: {pipeline: pipe}
data: {seq_len: 128, batch_size: 2, context_dropout: 0.2, eval: [shards/t2i-32]}
optim: {lr: 3.0e-3, warmup_steps: 1}
train: {max_steps: 3, eval_every: 2, save_every: 2, progress: false}
schedule:
  - {name: s16, image_size: 16, data: {train: [shards/t2i-16]}}
  - name: s24
STAGE1  - {name: s32, image_size: 32, data: {train: [shards/t2i-32]}, train: {max_steps: 4}, optim: {lr: 1.0e-3}}
"""
SCHEDULE = TEMPLATE.replace("STAGE1", STAGE1)


def write(work, text, name="schedule.yaml"):
    (work / name).write_text(text)
    return work / name


def losses(out):
    """Each stage's (step, loss or eval_loss) records."""
    return {stage: [(r["step"], r.get("loss"), r.get("eval_loss")) for r in MetricsLog(out / stage / "metrics.jsonl").read()]
            for stage in ("s16", "s24", "s32")}


def test_stages_run_in_order_each_from_the_previous_ones_weights(work):
    summary = train(write(work, SCHEDULE), out_dir=work / "out" / "straight")
    out = work / "out" / "straight"
    assert [s["stage"] for s in summary["stages"]] == ["s16", "s24", "s32"]
    assert [s["step"] for s in summary["stages"]] == [3, 3, 4] and summary["step"] == 10 == summary["total_steps"]
    assert summary["final_dir"] == str(out / "final")
    previous = str(work / "pipe")
    for name, size in zip(("s16", "s24", "s32"), SIZES):
        config = json.loads((out / name / "config.json").read_text())
        assert config["model"]["pipeline"] == previous, name  # from the stage before (the first: the config's)
        previous = str(out / name / "final")
        final = tokenloom.load(out / name / "final")
        assert (final.config.image_width, final.config.image_height) == (size, size)  # draws at its size
    assert json.loads((out / "s32" / "config.json").read_text())["optim"]["lr"] == 1e-3
    assert json.loads((out / "s16" / "config.json").read_text())["data"]["train"] == [str(work / "shards" / "t2i-16")]
    # The schedule's final/ is the last stage's; every stage trained (its weights moved).
    last = load_weights(out / "s32" / "final")
    for name, tensor in load_weights(out / "final").items():
        assert torch.equal(tensor, last[name]), name
    assert not torch.equal(load_weights(out / "s16" / "final")["output.weight"], last["output.weight"])
    assert (out / "loss.png").is_file() and json.loads((out / "config.json").read_text())["schedule"][1]["name"] == "s24"
    mixed = [r for r in MetricsLog(out / "s24" / "metrics.jsonl").read() if "loss" in r]
    assert all("tokens/t2i-24" in r and "tokens/t2i-16" in r for r in mixed)


def test_an_interrupted_schedule_resumes_inside_its_stage_to_the_same_losses(work, monkeypatch):
    config = write(work, SCHEDULE)
    expected = losses(work / "out" / "straight") if (work / "out" / "straight").exists() else None
    if expected is None:
        train(config, out_dir=work / "out" / "straight")
        expected = losses(work / "out" / "straight")

    # Stopped by max_steps inside the second stage (3 steps of s16, 2 of s24), then run again.
    out = work / "out" / "split"
    stopped = train(config, out_dir=out, max_steps=5)
    assert stopped["step"] == 5 and stopped["final_dir"] is None and stopped["stage"] == "s24"
    assert not (out / "s32").exists() and not (out / "final").exists()
    assert (out / "s24" / "checkpoints" / "step-00000002").is_dir()
    again = train(config, out_dir=out)
    assert again["step"] == 10 and again["steps_this_run"] == 5 and again["final_dir"] == str(out / "final")
    assert losses(out) == expected  # exactly: same floats

    # Killed inside the last stage (after its step 3; its last checkpoint is at 2), then run again.
    class Crash(Exception):
        pass

    real_write = MetricsLog.write

    def crash(self, record):
        real_write(self, record)
        if self.path.parent.name == "s32" and record.get("step") == 3 and "loss" in record:
            raise Crash

    out = work / "out" / "crash"
    monkeypatch.setattr(MetricsLog, "write", crash)
    with pytest.raises(Crash):
        train(config, out_dir=out)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    train(config, out_dir=out)
    assert losses(out) == expected
    for name, tensor in load_weights(work / "out" / "straight" / "final").items():
        assert torch.equal(load_weights(out / "final")[name], tensor), name

    # A finished schedule run again trains nothing; changing a finished stage is refused.
    assert train(config, out_dir=out)["steps_this_run"] == 0
    changed = write(work, SCHEDULE.replace("optim: {lr: 3.0e-3", "optim: {lr: 2.0e-3"), "changed.yaml")
    saved = (out / "config.json").read_text()
    with pytest.raises(TrainError, match=r"cannot resume .*s16: optim\.lr was 0\.003, now 0\.002"):
        train(changed, out_dir=out)
    assert (out / "config.json").read_text() == saved, "a refused rerun must leave the run's config.json"


def test_the_shards_record_their_image_sizes(work):
    for size in SIZES:
        assert read_manifest(work / "shards" / f"t2i-{size}")["counts"]["image_sizes"] == {f"{size}x{size}": 12}


@pytest.mark.parametrize("stage1, message", [
    ("    image_size: 20\n    data: {train: [shards/t2i-24]}\n",
     r"stage 1 \(s24\): 'schedule\[1\]\.image_size' 20x20 cannot be encoded .*must be a multiple of 8"),
    ("    image_size: 2048\n    data: {train: [shards/t2i-24]}\n",
     r"stage 1 \(s24\): 'schedule\[1\]\.image_size' 2048x2048 cannot be encoded .*exceeds the maximum side"),
    ("    image_size: 24\n    data: {train: [shards/t2i-32]}\n",
     r"stage 1 \(s24\): 'schedule\[1\]\.data\.train\[0\]' holds 32x32 images, larger than the stage's "
     r"'schedule\[1\]\.image_size' 24x24"),
    ("    image_size: 24\n    data: {train: [shards/t2i-16]}\n",
     r"stage 1 \(s24\): no training images of the stage's 'schedule\[1\]\.image_size' 24x24"),
    ("    image_size: 24\n    data: {train: [shards/none]}\n",
     r"stage 1 \(s24\): .*'schedule\[1\]\.data\.train\[0\]': .*shards/none does not exist"),
])
def test_a_stage_the_image_tokenizer_or_its_shards_cannot_serve_is_refused_before_training(work, capsys, stage1,
                                                                                            message):
    path = str(write(work, TEMPLATE.replace("STAGE1", stage1), "bad-stage.yaml"))
    out = work / "out" / "refused"
    with pytest.raises(ConfigError, match=r"bad-stage\.yaml:\d+: " + message):
        train(path, out_dir=out)
    assert not out.exists()  # nothing trained, nothing written
    assert cli(["train", path, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "bad-stage.yaml:" in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("schedule, line, message", [
    ("  - {name: a, model: {pipeline: pipe}}\n", 6,
     r"unknown key 'schedule\[0\]\.model' .*'model' is set once, at the top"),
    ("  - {name: a, data: {train: [x]}}\n  - {name: a, data: {train: [x]}}\n", 7,
     r"'schedule\[1\]\.name' 'a' is taken by schedule\[0\]"),
    ("  - {name: final, data: {train: [x]}}\n", 6, r"'schedule\[0\]\.name' .*not final or checkpoints"),
    ("  - {image_size: [16], data: {train: [x]}}\n", 6,
     r"'schedule\[0\]\.image_size' must be a positive number of pixels or \[width, height\]"),
    ("  - {data: {train: [x]}}\n  - {train: {max_steps: 0}}\n", 7, r"'schedule\[1\]\.train\.max_steps' must be positive"),
    ("  - {data: {train: [x]}, optim: {lrate: 1}}\n", 6, r"unknown key 'schedule\[0\]\.optim\.lrate'"),
    ("  - {data: {seq_len: 64}}\n", 6, r"'schedule\[0\]\.data\.train' needs at least one shard directory"),
])
def test_bad_stages_are_config_errors_naming_file_line_and_key(work, schedule, line, message):
    path = write(work, "model: {pipeline: pipe}\ndata: {seq_len: 128}\noptim: {lr: 1.0e-3}\ntrain: {max_steps: 2}\n"
                       "schedule:\n" + schedule, "bad-schedule.yaml")
    with pytest.raises(ConfigError, match=rf"bad-schedule\.yaml:{line}: {message}"):
        load_config(path)


# --------------------------------------------------------------------------- the recipe (recipes/finetune/)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "finetune"


def recipe_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_progressive", RECIPE / "progressive.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_finetune_recipe_configs_resolve_to_the_same_budget(tmp_path):
    recipe = recipe_module()
    shipped = Pipeline.from_pretrained(recipe.SHIPPED)
    fpsft = load_config(recipe.write_config("fpsft", tmp_path, recipe.SHIPPED))
    direct = load_config(recipe.write_config("direct", tmp_path, recipe.SHIPPED))
    stages = schedule_stages(fpsft, tmp_path / "fpsft")
    assert [(s.name, s.image_size) for s in stages] == [("s64", (64, 64)), ("s80", (80, 80)), ("s96", (96, 96))]
    replay = str(tmp_path / "shards" / "replay-64")
    for s, size in zip(stages, recipe.SIZES):
        # Two thirds of the rows at the stage's size, a third replay of the old tasks at 64x64.
        assert [(src.path, src.weight) for src in train_sources(s.config)] == [
            (str(tmp_path / "shards" / f"t2i-{size}"), 2.0), (replay, 1.0)]
        assert s.config.data.eval == direct.data.eval == [str(tmp_path / "shards" / "eval-96")]
        shipped.grid_size(size, size)  # the shipped image tokenizer encodes every stage's size
    assert [(src.path, src.weight) for src in train_sources(direct)] == [
        (str(tmp_path / "shards" / "t2i-96"), 2.0), (replay, 1.0)]
    other = load_config(recipe.write_config("direct-all-sizes", tmp_path, recipe.SHIPPED))
    assert [(src.path, src.weight) for src in train_sources(other)] == [
        (str(tmp_path / "shards" / "t2i-96"), 2.0), (str(tmp_path / "shards" / "replay-all"), 1.0)]
    assert {k: v for k, v in other.to_dict().items() if k != "data"} == {k: v for k, v in direct.to_dict().items()
                                                                         if k != "data"}
    assert stages[0].config.model.pipeline == str(recipe.SHIPPED) == direct.model.pipeline
    assert stages[2].config.model.pipeline == str(tmp_path / "fpsft" / "s80" / "final")
    # The same budget: steps x batch x seq_len row positions, the rest of the settings alike.
    budget = sum(s.config.train.max_steps * s.config.data.batch_size * s.config.data.seq_len for s in stages)
    assert budget == direct.train.max_steps * direct.data.batch_size * direct.data.seq_len
    assert direct.data.seq_len <= shipped.model.config.max_position_embeddings
    for key in ("optim", "train"):
        a, b = stages[2].config.to_dict()[key], direct.to_dict()[key]
        assert {k: v for k, v in a.items() if k != "max_steps"} == {k: v for k, v in b.items() if k != "max_steps"}
    smoke = load_config(recipe.write_config("fpsft", tmp_path, recipe.SHIPPED, smoke=True))
    assert [s.config.train.max_steps for s in schedule_stages(smoke, tmp_path / "x")] == [2, 2, 2]
    assert load_config(recipe.write_config("direct", tmp_path, recipe.SHIPPED, smoke=True)).train.max_steps == 6


@pytest.mark.slow
def test_the_finetune_recipe_smoke_run(tmp_path):
    """Minutes: tiny sets at 64, 80 and 96 px and a tiny replay set with the shipped model, both runs for 2
    steps a stage, the comparison on one prompt."""
    recipe = recipe_module()
    assert recipe.main(["--work", str(tmp_path), "--smoke", "--n", "1"]) == 0
    for size in (64, 80, 96):
        assert read_manifest(tmp_path / "shards" / f"t2i-{size}")["counts"]["image_sizes"] == {f"{size}x{size}": 12}
    assert set(read_manifest(tmp_path / "shards" / "replay-64")["counts"]["image_sizes"]) == {"64x64"}
    report = json.loads((tmp_path / "compare.json").read_text())
    assert set(report["models"]) == {"start", "fpsft", "direct", "direct-all-sizes"}
    assert report["models"]["fpsft"]["steps"] == report["models"]["direct"]["steps"] == 6
    assert report["models"]["direct-all-sizes"]["steps"] == 6
    assert set(read_manifest(tmp_path / "shards" / "replay-all")["counts"]["image_sizes"]) <= {"64x64", "96x64", "64x96"}
    # a second compare scores nothing again: the same numbers, read back
    again = recipe.compare(tmp_path, recipe.SHIPPED, n=1)
    for name, record in report["models"].items():
        for key in ("t2i", "text"):
            assert json.dumps(again["models"][name][key]) == json.dumps(record[key]), (name, key)
    assert tokenloom.load(tmp_path / "fpsft" / "final").config.image_width == 96
    assert set(report["models"]["direct"]["text"]) == {"caption", "qa"}
    assert set(report["models"]["direct"]["text"]["caption"]["by_size"]) <= {"64x64", "96x64", "64x96"}


def test_a_relative_output_directory_holds_its_stages(work, monkeypatch):
    """Stage folders go under the output directory as given (relative to where the command runs), not
    under the config file's folder."""
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    summary = train(write(work, SCHEDULE, "relative.yaml"), out_dir="rel-out", max_steps=1)
    assert (elsewhere / "rel-out" / "s16" / "checkpoints").is_dir(), summary
    assert not (work / "rel-out").exists()
