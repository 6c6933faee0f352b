"""Data mixing: data.train as {path, weight} entries. Rows come from each source in proportion to its
weight (seeded, resumed exactly), metrics.jsonl logs loss/<source>, and bad entries are config errors
naming file, line and key before anything is written."""

import json

import numpy as np
import pytest

from tokenloom.cli import main as cli
from tokenloom.data import MixtureSampler, pretokenize
from tokenloom.pipeline import random_pipeline
from tokenloom.train import ConfigError, load_config, train
from tokenloom.train.trainer import MetricsLog


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny pipeline and two text-only shard sets, "mine" and "replay" (text: no VQ encoding, fast)."""
    root = tmp_path_factory.mktemp("mixing")
    pipe = random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32)
    pipe.save_pretrained(root / "pipe")
    words = {"mine": ["red circle", "blue square", "green triangle"], "replay": ["top left", "center", "bottom"]}
    for name, texts in words.items():
        lines = [{"parts": [{"type": "text", "text": f"{texts[k % 3]} number {k}"}]} for k in range(30)]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        pretokenize(root / f"{name}.jsonl", pipe, root / "shards" / name, shard_size=10, progress=False)
    return root


def write(work, name, train_entries, **train_keys):
    config = {"model": {"pipeline": "pipe"},
              "data": {"train": train_entries, "seq_len": 64, "batch_size": 2, "context_dropout": 0.0},
              "optim": {"lr": 3e-3, "warmup_steps": 2},
              "train": {"max_steps": 8, "eval_every": 0, "save_every": 3, "progress": False, **train_keys}}
    path = work / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def records(out):
    """The training records, without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in MetricsLog(out / "metrics.jsonl").read()
            if "loss" in r]


def test_mixture_sampler_draws_in_proportion_exactly_reproducibly_and_resumes():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, 300)
    starts = [0, 120, 300]  # source 0: 120 documents, source 1: 180
    kwargs = dict(seq_len=64, batch_size=4, seed=7, window=64)

    def draw(sampler, batches):
        it = iter(sampler)
        return [next(it) for _ in range(batches)]

    sampler = MixtureSampler(lengths, starts, [3, 1], **kwargs)
    batches = draw(sampler, 500)  # 2000 rows
    rows = [row for batch in batches for row in batch]
    source = [int(row[0] >= 120) for row in rows]
    assert all(int(i >= 120) == s for row, s in zip(rows, source) for i in row)  # a row never mixes sources
    share = source.count(0) / len(source)
    assert abs(share - 0.75) < 0.03, share  # 3:1 (binomial sd of the share: 0.01)
    assert draw(MixtureSampler(lengths, starts, [3, 1], **kwargs), 500) == batches  # exactly reproducible
    assert draw(MixtureSampler(lengths, starts, [3, 1], **{**kwargs, "seed": 8}), 500) != batches

    # Resumed from its state after 200 batches, a new sampler goes on with the same batches.
    first = MixtureSampler(lengths, starts, [3, 1], **kwargs)
    draw(first, 200)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = MixtureSampler(lengths, starts, [3, 1], **kwargs)
    resumed.load_state_dict(state)
    assert draw(resumed, 300) == batches[200:]
    with pytest.raises(ValueError, match="another data mix"):
        MixtureSampler(lengths, starts, [2, 1], **kwargs).load_state_dict(state)

    # A source of weight 0 is never read; every document of a source comes round once per epoch.
    only = [row for batch in draw(MixtureSampler(lengths, starts, [0, 1], **kwargs), 100) for row in batch]
    assert all(i >= 120 for row in only for i in row)
    assert {i for row in only for i in row} == set(range(120, 300))


def test_weighted_mix_logs_loss_per_source_and_resumes_exactly(work):
    mix = [{"path": "shards/mine", "weight": 3}, {"path": "shards/replay", "weight": 1, "name": "old"}]
    config = write(work, "mix", mix, max_steps=24, save_every=8)
    straight = train(config, out_dir=work / "out" / "mix")
    assert straight["step"] == 24
    logged = records(work / "out" / "mix")
    assert all("tokens/mine" in r and "tokens/old" in r for r in logged)
    assert any("loss/mine" in r for r in logged) and any("loss/old" in r for r in logged)
    for r in logged:  # the step's loss is the per-source losses weighted by their targets
        parts = [r[f"loss/{k}"] for k in ("mine", "old") if f"loss/{k}" in r]
        assert min(parts) - 1e-6 <= r["loss"] <= max(parts) + 1e-6
    tokens = {k: sum(r[f"tokens/{k}"] for r in logged) for k in ("mine", "old")}
    # 3:1 in rows (the sampler test measures it); over 48 rows, tokens follow loosely
    assert tokens["mine"] > 2 * tokens["old"] > 0, tokens

    train(config, out_dir=work / "out" / "split", max_steps=10)
    assert not (work / "out" / "split" / "final").exists()
    train(config, out_dir=work / "out" / "split")
    assert records(work / "out" / "split") == logged  # the same floats

    # The same entries without weights: the directories read as one set, losses still logged per source.
    plain = train(write(work, "plain", ["shards/mine", "shards/replay"], max_steps=4), out_dir=work / "out" / "plain")
    assert plain["step"] == 4
    assert all("tokens/mine" in r and "tokens/replay" in r for r in records(work / "out" / "plain"))
    one = train(write(work, "one", ["shards/mine"], max_steps=2), out_dir=work / "out" / "one")
    assert one["step"] == 2 and not any(k.startswith("loss/") for k in records(work / "out" / "one")[0])


@pytest.mark.parametrize("entries, line, message", [
    ('[{path: shards/mine, weight: 3}, {path: shards/replay, weight: -1}]', 3,
     r"'data\.train\[1\]\.weight' must be a finite number >= 0, got -1"),
    ('[{path: shards/mine, weight: 0}, {path: shards/replay, weight: 0}]', 3,
     r"'data\.train' weights are all 0"),
    ('[{path: shards/mine, weight: 3}, shards/replay]', 3, r"'data\.train\[1\]' has no weight"),
    ('[{path: shards/mine, weight: .nan}]', 3, r"'data\.train\[0\]\.weight' must be a finite number, got nan"),
    ('[{path: shards/mine, weight: 1, share: 2}]', 3, r"unknown key 'data\.train\[0\]\.share'"),
    ('[{weight: 1}]', 3, r"'data\.train\[0\]\.path' \(a shard directory\) must be a non-empty string"),
    ('[{path: shards/mine, weight: 1, name: a}, {path: shards/replay, weight: 1, name: a}]', 3,
     r"'data\.train\[1\]\.name' 'a' is taken by data\.train\[0\]"),
])
def test_bad_mix_entries_are_config_errors_naming_file_line_and_key(work, entries, line, message):
    path = work / "bad.yaml"
    path.write_text(f"model: {{pipeline: pipe}}\ndata:\n  train: {entries}\n")
    with pytest.raises(ConfigError, match=rf"bad\.yaml:{line}: {message}"):
        load_config(path)


def test_a_missing_source_is_a_config_error_before_anything_is_written(work, capsys):
    path = work / "missing.yaml"
    path.write_text("model: {pipeline: pipe}\ndata:\n  train:\n    - {path: shards/mine, weight: 3}\n"
                    "    - path: shards/nowhere\n      weight: 1\ntrain: {progress: false}\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml:5: 'data\.train\[1\]\.path': .*shards/nowhere does not "
                                          r"exist"):
        train(path, out_dir=work / "out" / "never")
    (work / "shards" / "empty").mkdir()
    path.write_text("model: {pipeline: pipe}\ndata:\n  train: [shards/mine, shards/empty]\ntrain: {progress: false}\n")
    assert cli(["train", str(path), "--out-dir", str(work / "out" / "never")]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "missing.yaml:3: 'data.train[1]':" in lines[0] and "is not a shard directory" in lines[0], err
    assert not (work / "out" / "never").exists()
