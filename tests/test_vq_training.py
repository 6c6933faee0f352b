"""VQGAN training on shapes-world renders: losses, dead-code restarts, exact resume, evaluation,
the config file, non-finite losses and damaged checkpoints."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenloom.checkpoint import load_weights
from tokenloom.image_processing import ImageTokenizer
from tokenloom.cli import main as cli
from tokenloom.train import ConfigError, TrainError
from tokenloom.train.vq import (
    VQTrainConfig,
    VQTrainer,
    evaluate_vq,
    load_vq_config,
    parse_labels,
    parse_loss,
    render_batch,
    to_pixels,
    train_vqgan,
    training_batch,
)
from tokenloom.vqgan import VQGANConfig
from tokenloom.world import classify_pixels

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "src" / "tokenloom" / "assets" / "shapes-tiny"
RECIPE = ROOT / "recipes" / "shapes-tiny"

# factor 2, 48x48 renders (the smallest canvas): a step takes tens of milliseconds
TINY = VQGANConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, resolution=48,
                   z_channels=8, embed_dim=8, codebook_size=32)
SIZES = ((48, 48),)


def main(argv):
    return cli(["train-vq", *argv])


def tiny_train(**kw):
    opts = dict(steps=40, batch_size=4, lr=2e-3, seed=0, sizes=SIZES, warmup_steps=2, restart_every=5,
                eval_every=0, log_every=1, checkpoint_every=1000, progress=False)
    opts.update(kw)
    return VQTrainConfig(**opts)


def test_a_few_steps_lower_the_reconstruction_loss():
    trainer = VQTrainer(TINY, tiny_train(steps=25))
    fixed = training_batch(123, 0, 8, SIZES)  # not a training batch: seed 123 is not the run's

    def rec_loss():
        trainer.model.eval()
        with torch.no_grad():
            out, _, _ = trainer.losses(fixed)
        return out["l1"].item() + out["mse"].item()

    before = rec_loss()
    for _ in range(25):
        trainer.step()
    after = rec_loss()
    assert after < 0.5 * before, (before, after)


def test_dead_code_restart_reassigns_unused_codes():
    trainer = VQTrainer(TINY, tiny_train())
    weight = trainer.model.quantize.embedding.weight
    old = weight.detach().clone()
    used = torch.tensor([1, 5, 7])
    trainer.usage[used] = 3
    z = torch.randn(2, TINY.embed_dim, 4, 4) * 5  # far from the tiny initial codebook
    n = trainer.restart_dead_codes(z, step=0)
    assert n == TINY.codebook_size - len(used)
    new = weight.detach()
    assert torch.equal(new[used], old[used])  # live codes are left alone
    dead = torch.tensor([i for i in range(TINY.codebook_size) if i not in used.tolist()])
    latents = z.permute(0, 2, 3, 1).reshape(-1, TINY.embed_dim)
    # each restarted code sits next to one of the batch's latents (noise is 1% of their spread)
    nearest = torch.cdist(new[dead], latents).min(dim=1).values
    assert (nearest < 0.2 * latents.std() * TINY.embed_dim ** 0.5).all()
    assert not torch.allclose(new[dead], old[dead])
    assert int(trainer.usage.sum()) == 0  # a new usage window starts
    assert trainer.restart_dead_codes(z, step=1) == TINY.codebook_size  # nothing used since: all dead


def test_restarts_keep_the_codebook_in_use():
    # same steps with and without restarts: restarts must leave more codes alive
    def usage(restart_every):
        trainer = VQTrainer(TINY, tiny_train(steps=15, restart_every=restart_every))
        for _ in range(15):
            trainer.step()
        return trainer.evaluate(n=8, sizes=SIZES)["codebook_usage"]

    assert usage(5) > usage(0)


def test_checkpoint_resume_repeats_an_uninterrupted_run(tmp_path):
    cfg = tiny_train(steps=8, restart_every=3)
    straight = VQTrainer(TINY, cfg)
    losses = []
    for i in range(8):
        if i == 4:
            straight.consider_best(straight.evaluate(n=2, sizes=SIZES))
            checkpoint = straight.save_checkpoint(tmp_path)
        losses.append(straight.step()["loss"])
    assert checkpoint.name == "step-00000004"
    # nothing pickled: safetensors and JSON only
    assert sorted(p.suffix for p in checkpoint.iterdir()) == [".json"] * 2 + [".safetensors"] * 5
    resumed = VQTrainer(TINY, cfg)
    resumed.load_checkpoint(checkpoint)
    assert resumed.step_count == 4 and resumed.best["step"] == 4
    assert [resumed.step()["loss"] for _ in range(4)] == losses[4:]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.ema_sum, resumed.ema_sum) and torch.equal(straight.usage, resumed.usage)
    with pytest.raises(TrainError, match="training seed was 0, now 1"):
        VQTrainer(TINY, tiny_train(steps=8, restart_every=3, seed=1)).load_checkpoint(checkpoint)
    with pytest.raises(TrainError, match="model codebook_size was 32, now 16 .*use a new output directory"):
        VQTrainer(dataclasses.replace(TINY, codebook_size=16), cfg).load_checkpoint(checkpoint)


KW = dict(sizes=SIZES, warmup_steps=2, restart_every=3, eval_every=3, eval_images=4, eval_sizes=SIZES,
          log_every=1, checkpoint_every=2, progress=False)


def train_losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_train_vqgan_resumes_after_a_stop(tmp_path):
    train_vqgan(TINY, tmp_path / "a", steps=6, batch_size=4, lr=2e-3, **KW)
    # the budget runs out after the first step; the second call picks up from its checkpoint
    train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, max_minutes=0, **KW)
    assert len(train_losses(tmp_path / "b")) == 1
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["stopped_early"]
    # max_steps stops at step 4 (checkpointed) without changing the schedule
    train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, max_steps=4, **KW)
    assert [s for s, _ in train_losses(tmp_path / "b")] == [1, 2, 3, 4]
    tok = train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, **KW)
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert (tmp_path / "b" / "best" / "vq.safetensors").exists()
    assert isinstance(tok, ImageTokenizer)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["finished"] and summary["best"] is not None
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, resume=False, **KW)
    with pytest.raises(TrainError, match="training lr was 0.002, now 0.001"):
        train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=1e-3, **KW)


def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(tmp_path):
    """Defect 10: a truncated newest checkpoint made resume die while an intact one sat beside it."""
    train_vqgan(TINY, tmp_path / "a", steps=6, batch_size=4, lr=2e-3, **KW)
    train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, max_steps=4, **KW)
    root = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    weights = root / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step-00000004.*model\.safetensors"):
        train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, **KW)
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")  # resumed from step 2, exactly
    assert (root / "step-00000004.damaged").is_dir()  # kept aside, not deleted
    # a garbled state.json and an optimizer file gone are damage too; nothing intact left: an error
    (root / "step-00000006" / "state.json").write_text("{not json")
    (root / "step-00000004" / "optimizer.safetensors").unlink()
    with pytest.raises(TrainError, match=r"no intact checkpoint.*state\.json is unreadable.*optimizer\.safetensors "
                                         r"is missing"):
        train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, **KW)


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Defect 9: a NaN loss trained on, and an all-NaN model was saved with exit status 0."""
    real = VQTrainer.losses

    def poisoned(self, pixels):
        out, z, codes = real(self, pixels)
        if self.step_count == 4:  # the fifth step
            out["loss"] = out["loss"] * float("nan")
        return out, z, codes

    monkeypatch.setattr(VQTrainer, "losses", poisoned)
    with pytest.raises(TrainError, match=r"stopped at step 5: the loss is nan.*step-00000004.* is untouched") as stop:
        train_vqgan(TINY, tmp_path, steps=8, batch_size=4, lr=2e-3, **KW)
    assert "a resumed run starts from it" not in str(stop.value)
    assert "training.lr and training.grad_clip cannot change on resume: train again in a new output directory" \
        in str(stop.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    weights = load_weights(tmp_path / "checkpoints" / "step-00000004")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "best").exists()  # nothing is exported from a failed run
    # an inf gradient norm stops it the same way, before the update
    trainer = VQTrainer(TINY, tiny_train())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("inf")))
    monkeypatch.setattr(VQTrainer, "losses", real)
    with pytest.raises(TrainError, match="step 1: the gradient norm is inf"):
        trainer.step()
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_parse_labels_match_the_parser_and_the_parse_loss_pays_for_flips():
    scenes, arr = render_batch(np.random.default_rng(0), 6, 64, 64)
    pixels = to_pixels(arr)
    labels = parse_labels(pixels)
    assert np.array_equal(labels.numpy(), np.stack([classify_pixels(a) for a in arr]))
    # renders hold a few anti-aliased rim pixels inside the hinge's margin band: the loss of a
    # perfect reconstruction is that small floor, not zero
    floor = parse_loss(pixels, pixels).item()
    assert 0.0 <= floor < 1e-3
    broken = pixels.clone()
    obj = labels[0] >= 0
    broken[0, :, obj] = 1.0  # the first image's objects turn white: every object pixel flips
    assert parse_loss(broken, pixels).item() > 20 * floor + 1e-3
    # small color errors that keep every label cost little more than the floor
    assert parse_loss((pixels + 0.02).clamp(-1, 1), pixels).item() < floor + 1e-4


class _Identity:
    """A stand-in tokenizer whose 'codes' are the pixels themselves: a perfect round trip."""

    class config:
        codebook_size = 256

    def encode(self, images, width, height):
        return [np.asarray(im) for im in images]

    def decode(self, codes):
        return [Image.fromarray(np.asarray(c, np.uint8), "RGB") for c in codes]


class _Blank(_Identity):
    def decode(self, codes):
        return [Image.new("RGB", (c.shape[1], c.shape[0]), (255, 255, 255)) for c in codes]


def test_evaluate_vq_scores_perfect_and_garbage_round_trips():
    sizes = ((64, 64), (96, 64))
    perfect = evaluate_vq(_Identity(), n=10, seed=0, sizes=sizes)
    assert perfect["parse_exact"] == 1.0 and perfect["psnr"] == 100.0
    assert set(perfect["sizes"]) == {"64x64", "96x64"} and perfect["n"] == 20
    assert 0 < perfect["codebook_usage"] <= 1
    assert set(perfect) == {"psnr", "parse_exact", "codebook_usage", "n", "sizes"}  # product metrics only
    blank = evaluate_vq(_Blank(), n=10, seed=0, sizes=sizes)
    assert blank["parse_exact"] == 0.0 and blank["psnr"] < 25
    untrained = evaluate_vq(ImageTokenizer.random(TINY), n=5, seed=0, sizes=((48, 48),))
    assert untrained["parse_exact"] == 0.0 and untrained["psnr"] < 15
    assert 0 < untrained["codebook_usage"] <= 1


def test_committed_config_builds_a_small_factor_8_model():
    run = load_vq_config(RECIPE / "vq.yaml")
    model_cfg, train_cfg = run.model, run.training
    assert model_cfg.downsample_factor == 8
    assert (64, 64) in train_cfg.sizes and train_cfg.steps > 0
    trainer = VQTrainer(model_cfg, train_cfg)
    assert sum(p.numel() for p in trainer.model.parameters()) < 5_000_000
    # the local-encoder variant differs in that flag alone
    local = load_vq_config(RECIPE / "vq-local.yaml")
    assert local.model.local_encoder and not model_cfg.local_encoder
    assert dataclasses.replace(local.model, local_encoder=False) == model_cfg and local.training == train_cfg


def write(tmp_path, text, name="vq.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


MODEL = "model:\n  base_channels: 32\n  channel_mult: [1, 1]\n  codebook_size: 32\n"


@pytest.mark.parametrize("line, message", [
    ("  lr: .inf", r"vq\.yaml:7: 'training\.lr' must be a finite number, got inf"),
    ("  grad_clip: .nan", r"vq\.yaml:7: 'training\.grad_clip' must be a finite number, got nan"),
    ("  lr: -1.0", r"vq\.yaml:7: 'training\.lr' must be positive, got -1\.0"),
    ("  sizes: [[64, 63]]", r"vq\.yaml:7: 'training\.sizes': \[\[64, 63\]\] are not multiples .* factor 2"),
    ("  sizes: [[64, 64, 3]]", r"vq\.yaml:7: 'training\.sizes' must be a list of 2"),
    ("  steps: many", r"vq\.yaml:7: 'training\.steps' must be int, got 'many'"),
    ("  epochs: 3", r"vq\.yaml:7: unknown key 'training\.epochs'"),
    ("  codebook_ema: 1.5", r"vq\.yaml:7: 'training\.codebook_ema' must be in \[0, 1\)"),
])
def test_config_errors_name_file_line_and_key(tmp_path, line, message):
    """Defect 9: `lr: .inf` trained to NaN and `grad_clip: .nan` turned clipping off, silently."""
    path = write(tmp_path, MODEL + "training:\n  steps: 5\n" + line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_vq_config(path)


def test_model_config_errors_and_toml(tmp_path):
    path = write(tmp_path, "model:\n  base_channels: 32\n  codebook_size: 0\n")
    with pytest.raises(ConfigError, match=r"vq\.yaml:3: 'model\.codebook_size' must be positive, got 0"):
        load_vq_config(path)
    path = write(tmp_path, "model:\n  dropout: .nan\n")
    with pytest.raises(ConfigError, match=r"vq\.yaml:2: 'model\.dropout' must be a finite number"):
        load_vq_config(path)
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: no such config file"):
        load_vq_config(tmp_path / "nowhere.yaml")
    with pytest.raises(ConfigError, match=r"vq\.yaml: a 'model:' section .* is required"):
        load_vq_config(write(tmp_path, "training: {steps: 3}\n"))
    toml = write(tmp_path, '[model]\nbase_channels = 32\nchannel_mult = [1, 1]\n[training]\nsizes = [[48, 48]]\n'
                           'lr = inf\n', "vq.toml")
    with pytest.raises(ConfigError, match=r"vq\.toml:6: 'training\.lr' must be a finite number"):
        load_vq_config(toml)
    toml.write_text('out_dir = "runs/x"\n[model]\nbase_channels = 32\nchannel_mult = [1, 1]\n'
                    '[training]\nsizes = [[48, 48]]\nbetas = [0.5, 0.9]\n')
    run = load_vq_config(toml)
    assert run.training.sizes == ((48, 48),) and run.training.betas == (0.5, 0.9)
    assert run.out_dir == str(tmp_path / "runs" / "x")  # relative to the config's folder
    with pytest.raises(ValueError, match="lr must be a finite number"):
        VQTrainConfig(lr=float("inf"))


def test_command_line_trains_resumes_and_reports_user_errors(tmp_path, capsys):
    config = write(tmp_path, MODEL.replace("codebook_size: 32", "codebook_size: 32\n  z_channels: 8\n  embed_dim: 8"
                                           "\n  resolution: 48\n  num_res_blocks: 1")
                   + "training:\n  steps: 4\n  batch_size: 2\n  sizes: [[48, 48]]\n  eval_sizes: [[48, 48]]\n"
                     "  eval_images: 2\n  eval_every: 2\n  checkpoint_every: 2\n  log_every: 1\n"
                     "  progress: false\n")
    out = tmp_path / "run"
    assert main([str(config), "--out", str(out), "--max-steps", "2", "--eval-images", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main([str(config), "--out", str(out), "--eval-images", "2", "--eval-sizes", "48x48",
                 "--export", str(tmp_path / "export")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 4 and result["finished"] and result["final_eval"]["n"] == 2
    assert ImageTokenizer.from_pretrained(tmp_path / "export").config.codebook_size == 32
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]
    bad = write(tmp_path, MODEL + "training:\n  lr: .inf\n", "bad.yaml")
    assert main([str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "bad.yaml:6: 'training.lr' must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    assert main([str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "missing.yaml: no such config file" in capsys.readouterr().err
    assert main([str(config)]) == 2  # no output directory
    assert "no output directory" in capsys.readouterr().err


@pytest.mark.skipif(not (ASSET / "vq.safetensors").exists(), reason="shapes-tiny VQGAN not trained yet")
def test_shipped_shapes_vq_reconstructs_parseable_images():
    tok = ImageTokenizer.from_pretrained(ASSET)
    assert tok.factor == 8
    result = evaluate_vq(tok, n=40, seed=99, sizes=((64, 64),))
    assert result["parse_exact"] >= 0.95, result


def test_precision_setting_is_checked_and_resolved(tmp_path, monkeypatch):
    from tokenloom import precision as precision_module

    with pytest.raises(ValueError, match="precision must be one of"):
        VQTrainConfig(precision="fp16")
    old = tmp_path / "old.yaml"
    old.write_text("model: {}\ntraining: {bf16: true}\n")
    with pytest.raises(ConfigError, match="old.yaml:2: unknown key 'training.bf16'.*now precision: bf16"):
        load_vq_config(old)
    for native in (True, False):  # auto: bf16 autocast only where the CPU has bf16 units
        monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
        assert VQTrainer(TINY, VQTrainConfig(precision="auto")).bf16 is native
    assert VQTrainer(TINY, VQTrainConfig()).bf16 is False


def test_resume_survives_a_torn_metrics_line_and_clears_stale_temporary_directories(tmp_path):
    """A torn last metrics line killed resume; temporary checkpoint directories of a killed run stayed forever."""
    train_vqgan(TINY, tmp_path / "a", steps=6, batch_size=4, lr=2e-3, **KW)
    train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, max_steps=4, **KW)
    log = tmp_path / "b" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"kind": "train", "step": 5, "lo')  # killed mid-line
    torn = len(log.read_text().splitlines())  # its line number
    stale = tmp_path / "b" / "checkpoints" / ".step-00000005.tmp"  # a step this run does not write again
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    with pytest.warns(UserWarning) as caught:
        train_vqgan(TINY, tmp_path / "b", steps=6, batch_size=4, lr=2e-3, **KW)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"{log}:{torn}: skipping a metrics line that does not parse") for m in messages), messages
    assert any(f"removed {stale}, a temporary checkpoint directory" in m for m in messages), messages
    assert not stale.exists()
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")


def test_non_finite_weights_at_a_checkpoint_name_the_step_and_the_tensor(tmp_path):
    """The wrapped NonFiniteError named the temporary directory and offered allow_non_finite, which trainers lack."""
    trainer = VQTrainer(TINY, tiny_train())
    trainer.step()
    with torch.no_grad():
        trainer.model.quantize.embedding.weight[1, 2] = float("nan")
    with pytest.raises(TrainError, match=r"^training stopped at step 1: weight 'quantize\.embedding\.weight' holds NaN "
                                         r"or inf values, so checkpoint step-00000001 was not written$") as stop:
        trainer.save_checkpoint(tmp_path)
    assert ".tmp" not in str(stop.value) and "allow_non_finite" not in str(stop.value)
    assert list(tmp_path.iterdir()) == []


def test_an_older_tokenloom_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"pickled")
    with pytest.raises(TrainError, match=r"checkpoint\.pt was written by an older tokenloom.*start a new output "
                                         r"directory"):
        train_vqgan(TINY, tmp_path, steps=2, batch_size=4, **KW)
