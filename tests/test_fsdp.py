"""FSDP2 under torchrun: two CPU ranks (gloo) train what one process trains.

Every two-rank run is `python -m torch.distributed.run --nproc_per_node 2 -m tokenloom train ...`, a
subprocess, on the tiny random pipeline and shards of test_train.py, in fp32. A 2-rank run is not bit
for bit the 1-rank run: each rank sums the losses (and the gradients) of its half of the batch, and
the halves are then added across ranks, so float32 sums are taken in another order (and matmuls on
2 rows instead of 4 may block differently). What is checked is the stated tolerance: logged
losses within rtol 1e-5 (measured: at most 1.3e-7), gradient norms within rtol 1e-4 (measured: at
most 6e-7), final weights within atol 1e-5 (measured: at most 1.5e-6). A sharded run stopped
after a checkpoint and resumed on the same 2 ranks repeats the uninterrupted one exactly.

The rendezvous is c10d on 127.0.0.1 port 0 (a free port torchrun picks); `--master_port 0` does not
work with torch 2.13's torchrun (its workers are handed port 0).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tokenloom
from tokenloom.checkpoint import load_weights
from tokenloom.cli import main as cli
from tokenloom.train import train
from tokenloom.train.common import read_state, verify_checkpoint
from tokenloom.train.distributed import verify_sharded
from tokenloom.train.trainer import MetricsLog

from test_train import workdir, write_config  # noqa: F401  (workdir: the tiny pipeline and its shards)

LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5
STEPS = {"max_steps": 6, "eval_every": 3, "save_every": 3, "progress": False, "precision": "fp32"}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "modules_to_save": ["output"]}  # no dropout: ranks draw their own


def torchrun(config, out, *extra, ranks=2):
    """`torchrun --nproc_per_node 2 -m tokenloom train CONFIG --out OUT`, on 127.0.0.1 only."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0",
               "-m", "tokenloom", "train", str(config), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)


def run_ok(config, out, *extra):
    done = torchrun(config, out, *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def records(out):
    return MetricsLog(out / "metrics.jsonl").read()


def assert_same_run(one, two):
    """The 2-rank run's metrics and final weights are the 1-rank run's, within the tolerance."""
    a, b = records(one), records(two)
    assert [(r["step"], sorted(r)) for r in a] == [(r["step"], sorted(r)) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss", "z_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=LOSS_RTOL, abs=0), (x["step"], key)
        for key in ("tokens", "targets", "eval_targets", "lr"):
            assert x.get(key) == y.get(key), (x["step"], key)
        if "grad_norm" in x:
            assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), x["step"]
    if (one / "final" / "adapter_model.safetensors").exists():
        first, second = (load_file(str(d / "final" / "adapter_model.safetensors")) for d in (one, two))
    else:
        first, second = load_weights(one / "final"), load_weights(two / "final")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=WEIGHT_ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def one_rank(workdir):
    """1-rank runs of the configs the 2-rank tests train (in this process: the plain trainer)."""
    configs = {"all": write_config(workdir, "fsdp-all.yaml", train=STEPS),
               "lora": write_config(workdir, "fsdp-lora.yaml", train={**STEPS, "trainable": "lora"}, lora=LORA),
               "head": write_config(workdir, "fsdp-head.yaml", train={**STEPS, "trainable": "image_head"})}
    for name, config in configs.items():
        train(config, out_dir=workdir / "fsdp" / f"{name}-1")
    return configs


def interrupted_copy(out, name, step):
    """A copy of run `out` as if it had stopped after its checkpoint of `step` (later ones and final/ gone)."""
    copy = out.parent / name
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "final")
    for checkpoint in (copy / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    return copy


def test_two_ranks_train_the_one_rank_run_and_resume_it_on_two_or_one(workdir, one_rank):
    config, root = one_rank["all"], workdir / "fsdp"
    out = root / "all-2"
    done = run_ok(config, out)
    assert_same_run(root / "all-1", out)
    n = tokenloom.load(workdir / "pipe").model.num_parameters()
    assert done.stderr.count(f"trainable {n:,} of {n:,} parameters") == 1  # rank 0 alone prints
    assert json.loads(done.stdout)["step"] == 6  # one summary, rank 0's
    assert type(tokenloom.load(out / "final").model) is tokenloom.model.Transformer  # a plain model directory
    checkpoint = out / "checkpoints" / "step-00000003"
    state = read_state(checkpoint)
    assert state["format"] == "dcp" and state["world_size"] == 2 and state["step"] == 3
    assert sorted(state["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rng-00000.safetensors",
                                      "rng-00001.safetensors"]
    assert verify_checkpoint(checkpoint) is None

    # stopped after step 3's sharded checkpoint, resumed on 2 ranks: the same run, exactly
    again = interrupted_copy(out, "all-2-again", 3)
    run_ok(config, again)
    for key in ("loss", "eval_loss", "grad_norm"):
        assert [(r["step"], r[key]) for r in records(again) if key in r] == \
               [(r["step"], r[key]) for r in records(out) if key in r], key
    final = load_weights(out / "final")
    for name, tensor in load_weights(again / "final").items():
        assert torch.equal(tensor, final[name]), name

    # resumed by one process instead (DCP reshards the 2-rank checkpoint)
    alone = interrupted_copy(out, "all-2-then-1", 3)
    assert train(config, out_dir=alone)["step"] == 6
    assert read_state(alone / "checkpoints" / "step-00000006").get("format") is None  # one process: its own format
    assert_same_run(root / "all-1", alone)


def test_lora_on_two_ranks_writes_the_one_rank_adapter(workdir, one_rank):
    config, root = one_rank["lora"], workdir / "fsdp"
    out = root / "lora-2"
    run_ok(config, out)
    assert_same_run(root / "lora-1", out)
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "tokenloom_adapter.json"]
    one, two = (json.loads((d / "final" / "adapter_config.json").read_text()) for d in (root / "lora-1", out))
    assert {k: sorted(v) if k == "target_modules" else v for k, v in one.items()} == \
           {k: sorted(v) if k == "target_modules" else v for k, v in two.items()}  # the class is Transformer
    assert tokenloom.load(workdir / "pipe", adapter=final).model is not None
    # its sharded checkpoint holds the adapter only, and resumes on one process
    state = read_state(out / "checkpoints" / "step-00000003")
    assert state["format"] == "dcp"
    resumed = interrupted_copy(out, "lora-2-then-1", 3)
    assert train(config, out_dir=resumed)["step"] == 6
    assert_same_run(root / "lora-1", resumed)


def test_image_head_resumed_from_one_rank_on_two(workdir, one_rank):
    """A one-process checkpoint (safetensors) goes on on two ranks; only the image-code rows move."""
    config, root = one_rank["head"], workdir / "fsdp"
    out = root / "head-1-then-2"
    train(config, out_dir=out, max_steps=3)
    run_ok(config, out)
    assert read_state(out / "checkpoints" / "step-00000006")["format"] == "dcp"
    assert_same_run(root / "head-1", out)
    before, after = load_weights(workdir / "pipe"), load_weights(out / "final")
    for name in before:
        if name != "output.weight":
            assert torch.equal(before[name], after[name]), name
    code = tokenloom.load(workdir / "pipe").vocab.code_mask
    rows = torch.zeros(before["output.weight"].shape[0], dtype=torch.bool)
    rows[: len(code)] = code
    assert torch.equal(before["output.weight"][~rows], after["output.weight"][~rows])  # bit-identical
    assert (before["output.weight"][rows] != after["output.weight"][rows]).any(dim=1).all()


def test_a_batch_that_does_not_split_over_the_ranks_is_a_one_line_error(workdir, monkeypatch, capsys):
    config = write_config(workdir, "fsdp-odd.yaml", data={"batch_size": 3}, train=STEPS)
    out = workdir / "fsdp" / "odd"
    message = "'data.batch_size' 3 (the global batch, split over the ranks) does not divide by the 2 ranks"
    # what each rank does: checked from WORLD_SIZE before joining any process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli(["train", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"tokenloom train: error: {config}:7: {message} of this run: make it a multiple of 2"]
    monkeypatch.setenv("RANK", "1")  # the other ranks say nothing: rank 0 has said it
    assert cli(["train", str(config), "--out", str(out)]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    # under torchrun: each rank exits 2, rank 0 with the one line; torchrun itself then exits 1
    done = torchrun(config, out)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr
    assert done.stderr.count("tokenloom train: error:") == 1 and message in done.stderr
    assert not out.exists()


def test_a_sharded_checkpoint_is_verified_and_its_metadata_read_safely(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from tokenloom.train.common import write_checkpoint

    def write(directory):  # what the ranks write, here from one process
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": {"w": torch.randn(64, 8)}}, storage_writer=dcp.FileSystemWriter(str(directory)))

    checkpoint = write_checkpoint(tmp_path, 3, write, {"step": 3, "format": "dcp", "world_size": 1}, keep=2)
    assert verify_checkpoint(checkpoint) is None and verify_sharded(checkpoint) is None
    shard = checkpoint / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    assert verify_checkpoint(checkpoint).startswith("__0_0.distcp is")  # state.json's size
    assert "too short" in verify_sharded(checkpoint)  # and the chunks the metadata names
    shard.write_bytes(data)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (checkpoint / ".metadata").write_bytes(pickle.dumps(Evil()))
    problem = verify_sharded(checkpoint)
    assert "unreadable (UnpicklingError" in problem and "not part of a checkpoint's metadata" in problem
    assert not (tmp_path / "pwned").exists()


def test_each_rank_takes_its_rows_of_the_global_batch():
    from tokenloom.train.distributed import World

    ids = torch.arange(12).reshape(3, 4)
    labels = torch.tensor([[1, 2, -100, -100], [-100, 5, 6, 7], [8, -100, -100, -100]])
    docs = torch.tensor([[1, 1, 0, 0], [1, 1, 2, 2], [1, 0, 0, 0]])
    batch = {"input_ids": ids, "labels": labels, "document_ids": docs, "sources": docs - 1,
             "num_targets": 6, "num_tokens": 7}
    parts = [World(rank=r, size=2, local_rank=r, device=torch.device("cpu"), mesh=None).local(batch) for r in (0, 1)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), ids)  # contiguous shares, all rows once
    assert [p["num_targets"] for p in parts] == [2, 4] and [p["num_tokens"] for p in parts] == [2, 5]
    assert torch.equal(parts[1]["sources"], docs[1:] - 1)
    # a rank without rows (a short last evaluation batch) runs one row of padding with no target
    empty = World(rank=2, size=4, local_rank=2, device=torch.device("cpu"), mesh=None).local(
        {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    assert empty["input_ids"].shape == (1, 4) and (empty["labels"] == -100).all()
    assert empty["num_targets"] == 0 and empty["num_tokens"] == 0 and (empty["sources"] == -1).all()
