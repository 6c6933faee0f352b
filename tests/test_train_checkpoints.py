"""Checkpoint files: permissions, atomic ImageTokenizer saves, non-finite weights, verification,
optimizer state without pickle."""

import json
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
    for p, p2 in zip(model.parameters(), model2.parameters()):  # `step` stays on the CPU, as in a fresh run
        assert opt2.state[p2]["step"].device.type == "cpu" and torch.equal(opt2.state[p2]["step"], opt.state[p]["step"])
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


# --------------------------------------------------------------------------- review findings


def test_a_torn_metrics_line_is_skipped_with_a_warning_and_truncate_rewrites_atomically(tmp_path, monkeypatch):
    """A killed run can leave a torn last line in metrics.jsonl: it must not kill resume."""
    from tokenloom import checkpoint
    from tokenloom.train.common import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n[1, 2]\n{"step": 3, "loss": 1.2}\n'
                    '{"step": 4, "lo')  # a line that is no record, and a torn last line
    log = MetricsLog(path)
    with pytest.warns(UserWarning) as caught:
        assert [r["step"] for r in log.read()] == [1, 2, 3]
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert messages[0].startswith(f"{path}:3: skipping a metrics line") and "integer 'step'" in messages[0]
    assert messages[1].startswith(f"{path}:5: skipping a metrics line that does not parse")
    written = []
    real = checkpoint.atomic_write_bytes

    def spy(target, data):
        written.append(Path(target))
        real(target, data)

    monkeypatch.setattr("tokenloom.train.common.atomic_write_bytes", spy)
    with pytest.warns(UserWarning) as caught:
        log.truncate(2)
    assert sorted(str(w.message).split(": skipping")[0] for w in caught) == [f"{path}:3", f"{path}:5"]
    assert written == [path]  # atomically: a temporary file, fsynced, renamed
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(log.read()) == 2  # the torn line is gone


def write_tiny_checkpoint(root, step):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    from tokenloom.train.common import save_training_checkpoint

    return save_training_checkpoint(root, step, model, opt, {"step": step}, keep=5)


def test_checkpoints_of_an_older_tokenloom_are_refused_not_unpickled(tmp_path):
    """Old-format checkpoints (optimizer.pt / rng.pt, state.json without a file list) were read with torch.load."""
    from tokenloom.train.common import TrainError

    root = tmp_path / "checkpoints"
    for old in ("optimizer.pt", "rng.pt"):
        path = write_tiny_checkpoint(root, 2)
        (path / old).write_bytes(b"\x80\x04 never unpickled")
        with pytest.raises(TrainError, match=rf"step-00000002 was written by an older tokenloom \(pickled {old}\)"
                                             r".*start a new output directory"):
            resume_checkpoint(root)
        (path / old).unlink()
    assert resume_checkpoint(root) == root / "step-00000002"
    state = json.loads((root / "step-00000002" / "state.json").read_text())
    del state["files"]
    (root / "step-00000002" / "state.json").write_text(json.dumps(state))
    with pytest.raises(TrainError, match=r"older tokenloom \(a state\.json that lists no files\)"):
        resume_checkpoint(root)
    assert verify_checkpoint(root / "step-00000002") == "state.json lists no files (written by an older tokenloom)"


def test_nothing_in_the_trainers_calls_torch_load():
    offenders = [f"{path.relative_to(ROOT)}:{n}"
                 for path in [*(ROOT / "src" / "tokenloom" / "train").rglob("*.py"),
                              ROOT / "src" / "tokenloom" / "checkpoint.py"]
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "torch.load" in line]
    assert offenders == []


def test_stale_temporary_checkpoint_directories_are_cleared(tmp_path):
    from tokenloom.train.common import remove_stale_temps

    root = tmp_path / "checkpoints"
    write_tiny_checkpoint(root, 2)
    (root / ".step-00000004.tmp").mkdir()
    (root / ".step-00000004.tmp" / "model.safetensors").write_bytes(b"half")
    write_tiny_checkpoint(root, 6)
    os.replace(root / "step-00000006", root / ".step-00000006.old.tmp")  # set aside, never replaced
    write_tiny_checkpoint(root, 8)
    (root / ".step-00000008.old.tmp").mkdir()  # set aside and replaced, not yet deleted
    with pytest.warns(UserWarning) as caught:
        remove_stale_temps(root)
    messages = [str(w.message) for w in caught]
    assert any(".step-00000004.tmp, a temporary checkpoint directory left by an interrupted run" in m
               for m in messages)
    assert any("moved" in m and ".step-00000006.old.tmp back to step-00000006" in m for m in messages)
    assert any("removed" in m and ".step-00000008.old.tmp" in m for m in messages)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000006", "step-00000008"]
    assert verify_checkpoint(root / "step-00000006") is None


def test_rewriting_a_checkpoint_never_leaves_the_step_missing(tmp_path, monkeypatch):
    from tokenloom.train import common

    root = tmp_path / "checkpoints"

    def writer(value):
        return lambda directory: save_weights({"w": torch.full((2,), value)}, directory)

    write_checkpoint(root, 2, writer(1.0), {"step": 2}, keep=2)
    write_checkpoint(root, 2, writer(2.0), {"step": 2}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert load_weights(root / "step-00000002")["w"].tolist() == [2.0, 2.0]
    real = os.replace

    def fail_into_place(src, dst):
        if Path(src).name == ".step-00000002.tmp":
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(common.os, "replace", fail_into_place)
    with pytest.raises(OSError, match="disk gone"):
        write_checkpoint(root, 2, writer(3.0), {"step": 2}, keep=2)
    monkeypatch.setattr(common.os, "replace", real)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # the old one, moved back
    assert load_weights(root / "step-00000002")["w"].tolist() == [2.0, 2.0]
    assert verify_checkpoint(root / "step-00000002") is None


def test_verify_safetensors_rejects_malformed_data_offsets(tmp_path):
    """data_offsets [0, "8"] raised TypeError out of verify_safetensors instead of ValueError."""
    path = tmp_path / "crafted.safetensors"
    for entry in ({"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]},
                  {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]},
                  {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
                  {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]},
                  {"dtype": "F32", "shape": [2], "data_offsets": [0, True]},
                  {"dtype": "F32", "shape": [2], "data_offsets": [0]},
                  {"dtype": "F32", "shape": [2]},
                  "not an entry"):
        header = json.dumps({"w": entry}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a readable safetensors file"):
            verify_safetensors(path)
    header = b"[1, 2]"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        verify_safetensors(path)


def test_verify_checkpoint_reports_a_file_it_cannot_stat(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    path = write_tiny_checkpoint(root, 2)
    (path / "rng.safetensors").unlink()
    monkeypatch.setattr(Path, "is_file", lambda self: True)  # it vanishes between the two looks
    assert verify_checkpoint(path).startswith("rng.safetensors is unreadable (FileNotFoundError")


def test_saves_work_under_a_umask_that_takes_the_owners_read_or_write(tmp_path):
    """atomic_save_safetensors reopened its temporary file by name, which a 0o400 / 0o444 umask made unreadable."""
    old = os.umask(0o022)
    try:
        for mask in (0o400, 0o444, 0o200):
            directory = tmp_path / f"m{mask:o}"
            directory.mkdir()  # a listable directory, to look at the modes
            os.umask(mask)
            save_weights({"w": torch.ones(3)}, directory)
            ImageTokenizer.random(TINY).save_pretrained(directory)
            atomic_write_json(directory / "a.json", {"a": 1})
            os.umask(0o022)
            assert set(modes(directory).values()) == {0o666 & ~mask}, (oct(mask), modes(directory))
            for p in directory.iterdir():
                p.chmod(0o644)
            assert torch.equal(load_weights(directory)["w"], torch.ones(3))
    finally:
        os.umask(old)


def test_an_interrupted_weight_save_keeps_the_previous_weights(tmp_path, monkeypatch):
    """save_weights deleted the old files before writing the new ones."""
    from tokenloom import checkpoint

    state = {f"w{i}": torch.full((100,), float(i)) for i in range(4)}
    save_weights(state, tmp_path, max_shard_bytes=800)  # two shards + index
    before = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors.index.json" in before and len(before) == 3

    def interrupted(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_weights({k: v + 10 for k, v in state.items()}, tmp_path)  # unsharded now
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {k: v.tolist() for k, v in load_weights(tmp_path).items()} == {k: v.tolist() for k, v in state.items()}
    assert save_weights({k: v + 10 for k, v in state.items()}, tmp_path) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # stale shards and index gone
    assert load_weights(tmp_path)["w3"].tolist() == [13.0] * 100
    assert len(save_weights(state, tmp_path, max_shard_bytes=800)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_every_safetensors_load_warns_about_non_finite_tensors(tmp_path):
    from tokenloom.checkpoint import load_tensors

    tok = ImageTokenizer.random(TINY)
    with torch.no_grad():
        tok.vqgan.quantize.embedding.weight[0, 0] = float("inf")
    with pytest.warns(UserWarning, match="saving them anyway"):
        tok.save_pretrained(tmp_path, allow_non_finite=True)
    with pytest.warns(UserWarning, match=r"vq\.safetensors: tensor 'quantize\.embedding\.weight' holds NaN or inf"):
        ImageTokenizer.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"vq\.safetensors: tensor 'quantize\.embedding\.weight' holds NaN or inf"):
        load_tensors(tmp_path / "vq.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_optimizer_state_loads_onto_the_parameters_device_with_step_on_the_cpu(tmp_path):
    """load_optimizer moved `step` onto the device; a fresh AdamW keeps it on the CPU."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(2, 4, device="cuda")).sum().backward()
    opt.step()
    save_optimizer(opt, tmp_path)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_optimizer(opt2, tmp_path)
    for p in model.parameters():
        fresh, loaded = opt.state[p], opt2.state[p]
        assert loaded["step"].device == fresh["step"].device
        assert loaded["exp_avg"].device == p.device and torch.equal(loaded["exp_avg"], fresh["exp_avg"])
