"""VQGAN training on shapes-world renders: losses, dead-code restarts, exact resume, evaluation."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenloom.image_processing import ImageTokenizer
from tokenloom.vq_training import (
    VQTrainConfig,
    VQTrainer,
    code_stability,
    copied_target,
    copy_ceiling,
    grow_cells,
    evaluate_vq,
    load_config,
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

# factor 2, 48x48 renders (the smallest canvas): a step takes tens of milliseconds
TINY = VQGANConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, resolution=48,
                   z_channels=8, embed_dim=8, codebook_size=32)
SIZES = ((48, 48),)


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
            straight.save(tmp_path / "ckpt.pt")
        losses.append(straight.step()["loss"])
    resumed = VQTrainer(TINY, cfg)
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.step_count == 4
    assert [resumed.step()["loss"] for _ in range(4)] == losses[4:]
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        VQTrainer(TINY, tiny_train(steps=8, seed=1)).load(tmp_path / "ckpt.pt")


def test_train_vqgan_resumes_after_a_stop(tmp_path):
    kw = dict(sizes=SIZES, warmup_steps=2, restart_every=3, eval_every=3, eval_images=4, eval_sizes=SIZES,
              log_every=1, checkpoint_every=2, progress=False)

    def train_losses(path):
        return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    train_vqgan(TINY, tmp_path / "a", 6, 4, 2e-3, 0, **kw)
    # the budget runs out after the first step; the second call picks up from its checkpoint
    train_vqgan(TINY, tmp_path / "b", 6, 4, 2e-3, 0, max_minutes=0, **kw)
    assert len(train_losses(tmp_path / "b")) == 1
    tok = train_vqgan(TINY, tmp_path / "b", 6, 4, 2e-3, 0, **kw)
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    assert (tmp_path / "b" / "best" / "vq.safetensors").exists()
    assert isinstance(tok, ImageTokenizer)
    summary = json.loads((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["kind"] == "summary" and summary["step"] == 6 and summary["best"] is not None


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
    assert perfect["code_stability"] == 1.0 and perfect["copy_ceiling"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    blank = evaluate_vq(_Blank(), n=10, seed=0, sizes=sizes)
    assert blank["parse_exact"] == 0.0 and blank["psnr"] < 25
    assert blank["copy_ceiling"] == {"0": 0.0, "1": 0.0, "2": 0.0}
    untrained = evaluate_vq(ImageTokenizer.random(TINY), n=5, seed=0, sizes=((48, 48),))
    assert untrained["parse_exact"] == 0.0 and untrained["psnr"] < 15
    assert 0 < untrained["codebook_usage"] <= 1


def test_committed_config_builds_a_small_factor_8_model():
    model_cfg, train_cfg = load_config(ROOT / "configs" / "shapes-tiny-vq.yaml")
    assert model_cfg.downsample_factor == 8
    assert (64, 64) in train_cfg.sizes and train_cfg.steps > 0
    trainer = VQTrainer(model_cfg, train_cfg)
    assert sum(p.numel() for p in trainer.model.parameters()) < 5_000_000
    # the local-encoder experiment differs in that flag alone
    local_cfg, local_train = load_config(ROOT / "configs" / "shapes-tiny-vq-local.yaml")
    assert local_cfg.local_encoder and not model_cfg.local_encoder
    assert dataclasses.replace(local_cfg, local_encoder=False) == model_cfg and local_train == train_cfg


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
    with pytest.raises(ValueError, match="now precision: bf16"):
        load_config(old)
    for native in (True, False):  # auto: bf16 autocast only where the CPU has bf16 units
        monkeypatch.setattr(precision_module, "native_bf16", lambda device: native)
        assert VQTrainer(TINY, VQTrainConfig(precision="auto")).bf16 is native
    assert VQTrainer(TINY, VQTrainConfig()).bf16 is False


def test_code_stability_is_one_for_local_codes_and_lower_for_image_wide_ones():
    # pixels as codes: an untouched cell keeps its code by construction
    assert code_stability(_Identity(), n=6, seed=0, sizes=SIZES) == 1.0
    # GroupNorm over the whole image makes far cells' codes follow an edit
    image_wide = ImageTokenizer.random(TINY)
    assert code_stability(image_wide, n=6, seed=0, sizes=SIZES) < 0.9



def test_grow_cells_and_copied_target():
    changed = np.zeros((4, 5), dtype=bool)
    changed[0, 0] = True
    assert grow_cells(changed, 0).sum() == 1
    assert grow_cells(changed, 1).sum() == 4 and grow_cells(changed, 1)[1, 1]  # diagonals count
    assert grow_cells(changed, 2)[:3, :3].all() and grow_cells(changed, 2).sum() == 9
    source, target = np.zeros((4, 5), int), np.ones((4, 5), int)
    drawn = copied_target(source, target, changed, 1)
    assert drawn.sum() == 4 and drawn[1, 1] == 1 and drawn[3, 4] == 0
    pixels = copied_target(np.zeros((4, 5, 3)), np.ones((4, 5, 3)), changed, 0)  # trailing code dims
    assert pixels[0, 0].tolist() == [1, 1, 1] and pixels.sum() == 3


def test_copy_ceiling_is_one_for_a_perfect_round_trip_and_zero_for_garbage():
    # pixels as codes: copying every pixel the edit left alone redraws the edit exactly
    assert copy_ceiling(_Identity(), n=5, seed=0, sizes=SIZES, margins=(0, 2)) == {0: 1.0, 2: 1.0}
    assert copy_ceiling(_Blank(), n=5, seed=0, sizes=SIZES, margins=(1,)) == {1: 0.0}
