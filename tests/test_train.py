"""Training from a config file: loss goes down, exact resume, config errors, image-head fine-tuning."""

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import tokenloom
from tokenloom.checkpoint import load_weights
from tokenloom.data import pretokenize
from tokenloom.pipeline import random_pipeline
from tokenloom.cli import main as cli
from tokenloom.train import ConfigError, TrainError, Trainer, load_config, lr_at, train
from tokenloom import precision as precision_module
from tokenloom.precision import native_bf16, resolve_precision
from tokenloom.train.trainer import MetricsLog

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}


def main(argv):
    return cli(["train", *argv])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny random pipeline and train/eval shards of caption -> image documents."""
    root = tmp_path_factory.mktemp("train")
    pipe = random_pipeline(seed=0, hidden_size=64, num_layers=2, codebook_size=64, image_size=32)
    pipe.save_pretrained(root / "pipe")
    (root / "img").mkdir()
    lines = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        image = Image.new("RGB", (32, 32), rgb)
        image.paste((255, 255, 255), (4 + 4 * i, 8, 20 + 2 * i, 24))
        image.save(root / "img" / f"{name}.png")
    for k in range(24):
        name = list(COLORS)[k % 4]
        if k % 2:
            image = {"type": "image", "path": f"img/{name}.png"}
            lines.append({"messages": [{"role": "user", "content": f"Draw a {name} square"},
                                       {"role": "assistant", "content": [image]}]})
        else:
            lines.append({"parts": [{"type": "text", "text": f"a {name} square"},
                                    {"type": "image", "path": f"img/{name}.png"}]})
    for split, chunk in (("train", lines[:20]), ("eval", lines[20:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in chunk))
        pretokenize(root / f"{split}.jsonl", pipe, root / "shards" / split, shard_size=8, progress=False)
    return root


def write_config(workdir, name="run.yaml", **sections):
    base = {
        "model": {"pipeline": "pipe"},
        "data": {"train": ["shards/train"], "eval": ["shards/eval"], "seq_len": 64, "batch_size": 4,
                 "context_dropout": 0.3},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "weight_decay": 0.1},
        "train": {"max_steps": 12, "eval_every": 5, "save_every": 4, "z_loss": 1e-5, "progress": False},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    lines = []
    for section, values in base.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in values.items()]
    path = workdir / name
    path.write_text("\n".join(lines) + "\n")
    return path


def losses(out_dir, key="loss"):
    return [(r["step"], r[key]) for r in MetricsLog(out_dir / "metrics.jsonl").read() if key in r]


def test_training_lowers_the_loss_and_saves_a_loadable_pipeline(workdir):
    config = write_config(workdir, train={"max_steps": 30, "eval_every": 10, "save_every": 10})
    summary = train(config, out_dir=workdir / "out" / "loss")
    out = workdir / "out" / "loss"
    curve = [loss for _, loss in losses(out)]
    assert len(curve) == 30 and summary["step"] == 30
    assert 0.4 < summary["non_pad_fraction"] <= 1 and summary["tokens"] > 30 * 4 * 20
    assert np.mean(curve[-5:]) < curve[0] - 1.5, curve
    evals = [loss for _, loss in losses(out, "eval_loss")]
    assert len(evals) == 3 and evals[-1] < evals[0]
    record = MetricsLog(out / "metrics.jsonl").read()[0]
    assert 0 < record["non_pad_fraction"] <= 1 and record["lr"] == pytest.approx(1e-3)
    with Image.open(out / "loss.png") as png:
        assert png.format == "PNG" and png.size == (800, 500)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]

    loaded = tokenloom.load(summary["final_dir"])
    trained = load_weights(out / "checkpoints" / "step-00000030")
    initial = tokenloom.load(workdir / "pipe")
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert not torch.equal(loaded.model.output.weight, initial.model.output.weight)
    ids = torch.tensor([[loaded.vocab.bos, *loaded.text_tokenizer.encode("a red square"), loaded.vocab.image_begin]])
    with torch.no_grad():
        assert loaded.model(ids)[0, -1].argmax().item() in loaded.vocab.size_token_ids.tolist()


def test_resumed_run_repeats_the_uninterrupted_loss_curve(workdir, monkeypatch):
    # Model dropout draws from torch's RNG and context dropout from the data position: both must resume.
    config = write_config(workdir, model={"weights": "random", "config": {"dropout": 0.1}})
    straight = train(config, out_dir=workdir / "out" / "straight")
    assert straight["step"] == 12

    # Stop at step 6 via max_steps (checkpointed there), then go on.
    train(config, out_dir=workdir / "out" / "split", max_steps=6)
    assert not (workdir / "out" / "split" / "final").exists()
    train(config, out_dir=workdir / "out" / "split")

    # Crash after step 10 (last checkpoint at 8): steps 9-10 were logged and must be redone, not doubled.
    class Crash(Exception):
        pass

    real_write = MetricsLog.write

    def crash_at_10(self, record):
        real_write(self, record)
        if record.get("step") == 10 and "loss" in record:
            raise Crash

    monkeypatch.setattr(MetricsLog, "write", crash_at_10)
    with pytest.raises(Crash):
        train(config, out_dir=workdir / "out" / "crash")
    monkeypatch.setattr(MetricsLog, "write", real_write)
    assert losses(workdir / "out" / "crash")[-1][0] == 10
    train(config, out_dir=workdir / "out" / "crash")

    expected = losses(workdir / "out" / "straight")
    assert [s for s, _ in expected] == list(range(1, 13))
    for run in ("split", "crash"):
        out = workdir / "out" / run
        assert losses(out) == expected, run  # exactly: same floats
        assert losses(out, "eval_loss") == losses(workdir / "out" / "straight", "eval_loss")
        final = load_weights(out / "final")
        for name, tensor in load_weights(workdir / "out" / "straight" / "final").items():
            assert torch.equal(final[name], tensor), (run, name)

    # Resuming with a config that changes the trajectory is refused.
    changed = write_config(workdir, "changed.yaml", model={"weights": "random", "config": {"dropout": 0.1}},
                           optim={"lr": 1e-3})
    with pytest.raises(TrainError, match=r"cannot resume .*straight: optim\.lr was 0\.003, now 0\.001 \(that would be "
                                         r"another run; use a new output directory\)"):
        train(changed, out_dir=workdir / "out" / "straight")
    saved = workdir / "out" / "straight" / "config.json"
    saved.rename(saved.with_name("config.json.aside"))
    with pytest.raises(TrainError, match="config.json, the run's config, is unreadable"):
        train(config, out_dir=workdir / "out" / "straight")
    saved.with_name("config.json.aside").rename(saved)
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(config, out_dir=workdir / "out" / "straight", resume=False)


def test_unknown_key_is_a_config_error_naming_file_line_and_key(workdir, capsys):
    path = workdir / "bad.yaml"
    path.write_text("model:\n  pipeline: pipe\ndata:\n  train: [shards/train]\n  sequence_len: 64\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:5: unknown key 'data\.sequence_len'"):
        load_config(path)
    toml = workdir / "bad.toml"
    toml.write_text('[model]\npipeline = "pipe"\n\n[optim]\nlr = 1e-3\nmomentum = 0.9\n')
    with pytest.raises(ConfigError, match=r"bad\.toml:6: unknown key 'optim\.momentum'"):
        load_config(toml)
    (workdir / "top.yaml").write_text("model: {pipeline: pipe}\ndata: {train: [x]}\nepochs: 3\n")
    with pytest.raises(ConfigError, match=r"top\.yaml:3: unknown key 'epochs'"):
        load_config(workdir / "top.yaml")
    (workdir / "type.yaml").write_text("model: {pipeline: pipe}\ndata: {train: [x]}\ntrain: {max_steps: ten}\n")
    with pytest.raises(ConfigError, match=r"type\.yaml:3: 'train\.max_steps' must be int"):
        load_config(workdir / "type.yaml")
    assert main([str(path), "--out-dir", str(workdir / "out" / "never")]) == 2
    assert "unknown key 'data.sequence_len'" in capsys.readouterr().err
    assert not (workdir / "out" / "never").exists()


def test_toml_config_resolves_paths_against_its_folder(workdir):
    path = workdir / "ok.toml"
    path.write_text('[model]\npipeline = "pipe"\n[data]\ntrain = ["shards/train"]\nseq_len = 64\n'
                    '[optim]\nbetas = [0.9, 0.99]\n')
    config = load_config(path)
    assert config.model.pipeline == str(workdir / "pipe")
    assert config.data.train == [str(workdir / "shards" / "train")]
    assert config.optim.betas == [0.9, 0.99] and config.train.max_steps == 1000
    # one spelling per directory, so that resuming never sees "another" dataset
    path.write_text('[model]\npipeline = "x/../pipe"\n[data]\ntrain = ["./shards/../shards/train"]\n')
    config = load_config(path)
    assert config.model.pipeline == str(workdir / "pipe")
    assert config.data.train == [str(workdir / "shards" / "train")]


# Head-only tuning (trainable: image_head) is checked row by row in tests/test_lora.py.


def test_bf16_training_of_a_fresh_model(workdir):
    config = write_config(workdir, model={"weights": "random",
                                          "config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                                     "num_kv_heads": 1}},
                          train={"max_steps": 3, "precision": "bf16", "eval_every": 0, "save_every": 0})
    # Where bf16 is emulated (AVX2-only CPUs) an explicit bf16 still trains, with a warning.
    emulated = not native_bf16(torch.device("cpu"))
    with pytest.warns(UserWarning, match="no native bf16") if emulated else contextlib.nullcontext():
        summary = train(config, out_dir=workdir / "out" / "bf16")
    assert summary["precision"] == "bf16"
    assert all(np.isfinite(loss) for _, loss in losses(workdir / "out" / "bf16"))
    loaded = tokenloom.load(summary["final_dir"])
    assert loaded.model.config.hidden_size == 32 and loaded.model.config.num_layers == 1
    assert next(loaded.model.parameters()).dtype == torch.float32  # master weights stay float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_uses_bf16_only_where_it_is_native(monkeypatch, native):
    monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.warns(UserWarning, match="no native bf16") if not native else contextlib.nullcontext():
        assert resolve_precision("bf16", cpu) == "bf16"


def test_learning_rate_schedule():
    kw = dict(lr=1.0, warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(50, **kw) == pytest.approx(0.1)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(3, 20))


# --------------------------------------------------------------------------- defects 9 and 10


@pytest.mark.parametrize("key, value, message", [
    ("lr", ".inf", r"'optim\.lr' must be a finite number, got inf"),
    ("grad_clip", ".nan", r"'optim\.grad_clip' must be a finite number, got nan"),
    ("weight_decay", "-.inf", r"'optim\.weight_decay' must be a finite number, got -inf"),
])
def test_non_finite_config_values_are_errors_naming_file_line_and_key(workdir, key, value, message):
    """Defect 9: `lr: .inf` trained to NaN (exit 0), `grad_clip: .nan` turned clipping off."""
    path = workdir / "nonfinite.yaml"
    path.write_text(f"model:\n  pipeline: pipe\ndata:\n  train: [shards/train]\noptim:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=r"nonfinite\.yaml:6: " + message):
        load_config(path)
    toml = workdir / "nonfinite.toml"
    toml.write_text('[model]\npipeline = "pipe"\n[data]\ntrain = ["x"]\n[optim]\nlr = inf\n')
    with pytest.raises(ConfigError, match=r"nonfinite\.toml:6: 'optim\.lr' must be a finite number"):
        load_config(toml)
    nested = workdir / "nested.yaml"
    nested.write_text("model:\n  pipeline: pipe\n  weights: random\n  config:\n    dropout: .nan\n"
                      "data:\n  train: [x]\n")
    with pytest.raises(ConfigError, match=r"nested\.yaml:5: 'model\.config\.dropout' must be a finite number"):
        load_config(nested)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(workdir, monkeypatch):
    """Defect 9: a NaN loss must stop the run (TrainError naming the step), not train on and save NaNs."""
    from tokenloom.train import trainer as trainer_module

    real = trainer_module.token_losses
    calls = {"train": 0}

    def poisoned(model, batch, device):
        ce, z = real(model, batch, device)
        if model.training:
            calls["train"] += 1
            if calls["train"] == 6:  # the sixth optimizer step (grad_accum 1)
                ce = ce * float("nan")
        return ce, z

    monkeypatch.setattr(trainer_module, "token_losses", poisoned)
    config = write_config(workdir, "nan.yaml", train={"eval_every": 0})
    out = workdir / "out" / "nan"
    with pytest.raises(TrainError, match=r"stopped at step 6: the loss is nan.*step-00000004.* is untouched") as stop:
        train(config, out_dir=out)
    message = str(stop.value)
    assert "a resumed run starts from it" not in message
    assert "optim.lr and optim.grad_clip cannot change on resume: train in a new output directory" in message
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000004"]
    assert all(torch.isfinite(t).all() for t in load_weights(out / "checkpoints" / "step-00000004").values())
    assert not (out / "final").exists()
    assert [s for s, _ in losses(out)] == [1, 2, 3, 4, 5]  # nothing logged for the NaN step
    # from the command line: one line naming the step, exit status 2
    monkeypatch.setattr(trainer_module, "token_losses", poisoned)
    calls["train"] = 0
    assert main([str(config), "--out-dir", str(workdir / "out" / "nan-cli")]) == 2

    # what the message suggests works: a copy of the pipeline holding the checkpoint's weights,
    # trained with a lower learning rate in a new output directory, starts from those weights
    monkeypatch.setattr(trainer_module, "token_losses", real)
    copy = workdir / "pipe-restart"
    shutil.copytree(workdir / "pipe", copy)
    shutil.copy(out / "checkpoints" / "step-00000004" / "model.safetensors", copy / "model.safetensors")
    lower = write_config(workdir, "restart.yaml", model={"pipeline": "pipe-restart"}, optim={"lr": 1e-3},
                         train={"eval_every": 0})
    trainer = Trainer(load_config(lower), workdir / "out" / "restart")
    checkpoint = load_weights(out / "checkpoints" / "step-00000004")
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), name
    assert trainer.run(max_steps=2)["step"] == 2


def test_resume_skips_a_damaged_newest_checkpoint(workdir):
    """Defect 10: a truncated newest checkpoint made resume die while an intact older one sat beside it."""
    config = write_config(workdir, "damaged.yaml", train={"eval_every": 0})
    straight = workdir / "out" / "damaged-straight"
    train(config, out_dir=straight)
    out = workdir / "out" / "damaged"
    train(config, out_dir=out, max_steps=8)
    newest = out / "checkpoints" / "step-00000008"
    # nothing pickled: weights, optimizer and RNG state are safetensors, the rest JSON
    assert sorted(p.name for p in newest.iterdir()) == ["model.safetensors", "optimizer.json",
                                                        "optimizer.safetensors", "rng.safetensors", "state.json"]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step-00000008 \(.*model\.safetensors"):
        summary = train(config, out_dir=out)
    assert summary["step"] == 12
    assert losses(out) == losses(straight)  # resumed from step 4: the same curve, bit for bit
    assert (out / "checkpoints" / "step-00000008.damaged").is_dir()
    for name, tensor in load_weights(straight / "final").items():
        assert torch.equal(load_weights(out / "final")[name], tensor), name
