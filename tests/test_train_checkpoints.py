"""Checkpoint files: permissions, atomic ImageTokenizer saves, non-finite weights, verification,
optimizer state without pickle."""

import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from tokenloom.checkpoint import (NonFiniteError, atomic_write_bytes, atomic_write_json, load_weights, save_weights,
                                  verify_safetensors)
from tokenloom.image_processing import ImageTokenizer
from tokenloom.pipeline import random_pipeline
from tokenloom.train.common import load_optimizer, resume_checkpoint, save_optimizer, verify_checkpoint, \
    write_checkpoint
from tokenloom.vqgan import VQGANConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = VQGANConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, resolution=48,
                   z_channels=8, embed_dim=8, codebook_size=32)


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def modes(directory):
    return {p.name: p.stat().st_mode & 0o777 for p in Path(directory).iterdir() if p.is_file()}


def test_saved_files_get_normal_permissions(tmp_path, umask):
    """Defect 13: the atomic writes made every saved file 0600 (tempfile.mkstemp)."""
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    save_weights({"w": torch.ones(2)}, tmp_path / "weights")
    ImageTokenizer.random(TINY).save_pretrained(tmp_path / "vq")
    random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=32, image_size=32).save_pretrained(
        tmp_path / "pipe")
    assert set(modes(tmp_path).values()) == {0o644}
    assert modes(tmp_path / "weights") == {"model.safetensors": 0o644}
    assert modes(tmp_path / "vq") == {"vq.safetensors": 0o644, "vq_config.json": 0o644}
    pipe_modes = modes(tmp_path / "pipe")
    assert {"config.json", "model.safetensors", "vq.safetensors", "vq_config.json"} <= set(pipe_modes)
    assert set(pipe_modes.values()) == {0o644}, pipe_modes
    umask(0o077)  # the umask is respected, not overridden
    atomic_write_bytes(tmp_path / "private.bin", b"x")
    assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600


def test_image_tokenizer_save_is_atomic_and_refuses_non_finite_weights(tmp_path, monkeypatch):
    """Defect 13: ImageTokenizer.save_pretrained wrote its files in place."""
    from tokenloom import checkpoint

    tok = ImageTokenizer.random(TINY)
    tok.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("vq.safetensors", "vq_config.json")}
    real = checkpoint.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ImageTokenizer.random(TINY, seed=1).save_pretrained(tmp_path)
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the previous save, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vq.safetensors", "vq_config.json"]  # no temp files
    assert ImageTokenizer.from_pretrained(tmp_path).config == TINY

    with torch.no_grad():
        tok.vqgan.quantize.embedding.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"tensor 'quantize\.embedding\.weight' holds NaN or inf"):
        tok.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    with pytest.warns(UserWarning, match="saving them anyway"):
        tok.save_pretrained(tmp_path / "nan", allow_non_finite=True)


def test_non_finite_weights_are_refused_on_save_and_warned_about_on_load(tmp_path):
    """Defect 9: an all-NaN model was saved and loaded without a word."""
    state = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "steps": torch.tensor([3])}
    with pytest.raises(NonFiniteError, match=r"tensor 'b' holds NaN or inf values; refusing"):
        save_weights(state, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing written
    assert isinstance(NonFiniteError("x"), ValueError)
    with pytest.warns(UserWarning, match="saving them anyway"):
        save_weights(state, tmp_path / "bad", allow_non_finite=True)
    with pytest.warns(UserWarning, match=r"bad/model\.safetensors: tensor 'b' holds NaN or inf values"):
        loaded = load_weights(tmp_path / "bad")
    assert torch.equal(loaded["a"], state["a"])
    save_weights({"a": torch.ones(3)}, tmp_path / "good")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights(tmp_path / "good")  # finite weights: no warning


def test_verification_tells_whole_files_from_damaged_ones(tmp_path):
    """Defect 10: resume needs to tell a damaged checkpoint from an intact one."""
    save_weights({"w": torch.randn(64)}, tmp_path)
    path = tmp_path / "model.safetensors"
    verify_safetensors(path)
    data = path.read_bytes()
    for damaged in (data[:-1], data[:5], b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", data + b"x"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            verify_safetensors(path)

    def write(directory):
        save_weights({"w": torch.ones(2)}, directory)

    root = tmp_path / "ckpts"
    for step in (2, 4, 6):
        write_checkpoint(root, step, write, {"step": step}, keep=5)
    assert verify_checkpoint(root / "step-00000006") is None
    (root / "step-00000006" / "model.safetensors").unlink()
    (root / "step-00000004" / "state.json").write_text("")
    with pytest.warns(UserWarning) as caught:
        assert resume_checkpoint(root) == root / "step-00000002"
    messages = [str(w.message) for w in caught]
    assert "step-00000006 (model.safetensors is missing)" in messages[0]
    assert "step-00000004 (state.json is unreadable" in messages[1]
    assert all("resuming from the newest intact one" in m and "step-00000002" in m for m in messages)
    write_checkpoint(root, 8, write, {"step": 8}, keep=2)  # keeps the newest two
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004.damaged", "step-00000006.damaged",
                                                      "step-00000008"]


def test_optimizer_state_round_trips_exactly_without_pickle(tmp_path):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))

    def step(model, opt):
        opt.zero_grad()
        model(torch.arange(8.0).reshape(2, 4)).pow(2).sum().backward()
        opt.step()

    model, opt = make()
    for _ in range(3):
        step(model, opt)
    save_optimizer(opt, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    model2, opt2 = make()
    model2.load_state_dict(model.state_dict())
    load_optimizer(opt2, tmp_path)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    for _ in range(2):
        step(model, opt)
        step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_nothing_in_the_package_unpickles():
    """A crafted checkpoint must not run code: no torch.load(weights_only=False), no pickle.load."""
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "src").rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(", line)]
    assert offenders == []
    loads = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "src").rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "torch.load(" in line and "weights_only=True" not in line]
    assert loads == []
