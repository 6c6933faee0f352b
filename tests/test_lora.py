"""LoRA (through peft) and head-only fine-tuning, checked exactly: what each trains and what it leaves
bit-identical, the adapter directory peft itself reads, merging, resume, and the bad inputs."""

import hashlib
import json
import shutil
import sys

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

import tokenloom
from tokenloom.adapters import ADAPTER_META
from tokenloom.checkpoint import load_weights, save_weights
from tokenloom.cli import main as cli
from tokenloom.pipeline import random_pipeline
from tokenloom.train import ConfigError, TrainError, Trainer, load_config, train

from test_train import losses, workdir, write_config  # noqa: F401  (workdir: the tiny pipeline and its shards)

LORA = {"r": 4, "alpha": 8, "dropout": 0.1}
SHORT = {"max_steps": 8, "eval_every": 4, "save_every": 4}


def lora_config(workdir, name, lora=None, **train_keys):
    return write_config(workdir, name, train={**SHORT, "trainable": "lora", **train_keys},
                        lora={**LORA, **(lora or {})})


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def prompt_ids(pipe):
    ids = [pipe.vocab.bos, *pipe.text_tokenizer.encode("a red square"), pipe.vocab.image_begin]
    return torch.tensor([ids, ids[::-1]])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).float()


@pytest.fixture(scope="module")
def lora_run(workdir):
    """A LoRA run (modules_to_save: the output head too) and the base's files' hashes before it."""
    before = digest(workdir / "pipe")
    config = lora_config(workdir, "lora.yaml", lora={"modules_to_save": ["output"]})
    summary = train(config, out_dir=workdir / "out" / "lora")
    return summary, before


def test_a_lora_run_writes_a_peft_adapter_that_loads_and_merges_to_the_same_logits(workdir, lora_run, monkeypatch):
    summary, before = lora_run
    base, final = workdir / "pipe", workdir / "out" / "lora" / "final"
    assert summary["final_dir"] == str(final)
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       ADAPTER_META]
    meta = json.loads((final / ADAPTER_META).read_text())
    assert meta["base"]["path"] == str(base.resolve()) and meta["run"]["step"] == 8
    settings = json.loads((final / "adapter_config.json").read_text())
    assert settings["peft_type"] == "LORA" and settings["r"] == 4 and settings["lora_alpha"] == 8
    assert sorted(settings["target_modules"]) == ["w1", "w2", "w3", "wk", "wo", "wq", "wv"]
    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        head = f.get_tensor("base_model.model.output.weight")  # modules_to_save: a trained copy of the head
    assert not torch.equal(head, load_weights(base)["output.weight"])

    pipe = tokenloom.load(base)
    ids = prompt_ids(pipe)
    plain = logits(pipe.model, ids)
    # peft itself reads the directory onto the base Transformer
    by_peft = logits(PeftModel.from_pretrained(tokenloom.load(base).model, str(final)), ids)
    assert not torch.allclose(by_peft, plain, atol=1e-3)  # the adapter learned something
    ours = tokenloom.load(base, adapter=final)
    assert type(ours.model) is tokenloom.model.Transformer  # merged: no peft layer left
    torch.testing.assert_close(logits(ours.model, ids), by_peft, atol=1e-5, rtol=0)
    # the adapter directory alone finds its base
    torch.testing.assert_close(logits(tokenloom.load(final).model, ids), by_peft, atol=1e-5, rtol=0)

    merged = workdir / "out" / "merged"
    assert cli(["merge-adapter", str(base), str(final), str(merged)]) == 0
    assert not any(p.name.startswith("adapter") for p in merged.iterdir())
    (merged / "stale.txt").write_text("replaced as a whole")
    assert cli(["merge-adapter", str(base), str(final), str(merged), "--overwrite"]) == 0
    assert not (merged / "stale.txt").exists() and not list(merged.parent.glob(".merged.*"))
    monkeypatch.setitem(sys.modules, "peft", None)  # a merged model loads without peft
    again = tokenloom.load(merged)
    torch.testing.assert_close(logits(again.model, ids), by_peft, atol=1e-5, rtol=0)
    assert json.loads((merged / "config.json").read_text())["merged_adapter"]["adapter"] == str(final.resolve())
    assert digest(base) == before  # the base's files are untouched


def test_every_verb_that_loads_a_model_takes_an_adapter(workdir, lora_run, capsys):
    from tokenloom.cli import verb_parser

    for verb in ("info", "demo", "generate", "chat", "caption", "ask", "eval", "serve"):
        options = {o for action in verb_parser(verb)._actions for o in action.option_strings}
        assert "--adapter" in options, verb
    final = workdir / "out" / "lora" / "final"
    assert cli(["info", "--model", str(workdir / "pipe"), "--adapter", str(final)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["adapter"]["r"] == 4 and shown["adapter"]["modules_to_save"] == ["output"]
    # fingerprints come from the base's files: loading it in bfloat16 is still the same base
    pipe = tokenloom.load(workdir / "pipe", adapter=final, dtype="bfloat16")
    assert next(pipe.model.parameters()).dtype == torch.bfloat16


def test_serve_loads_the_adapter(workdir, lora_run):
    import httpx

    from tokenloom.serve import ServerThread, ServeSettings, create_app

    final = workdir / "out" / "lora" / "final"
    app = create_app(ServeSettings(model=str(workdir / "pipe"), adapter=str(final)))
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "pipe+lora"
        ids = prompt_ids(app.state.worker.pipe)
        expected = logits(tokenloom.load(workdir / "pipe", adapter=final).model, ids)
        torch.testing.assert_close(logits(app.state.worker.pipe.model, ids), expected, atol=0, rtol=0)


def test_lora_trains_only_the_adapter(workdir, capsys):
    config = lora_config(workdir, "lora-only.yaml")
    trainer = Trainer(load_config(config), workdir / "out" / "lora-only")
    message = capsys.readouterr().err
    trainable = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert f"trainable {trainable:,} of {total:,} parameters" in message
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.run()
    base = load_weights(workdir / "pipe")
    seen = set()
    for name, p in trainer.model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, initial[name]), name  # every adapter matrix moved
            continue
        plain = name.replace(".base_layer", "")
        assert torch.equal(p, base[plain]), name  # bit-identical, weight_decay: 0.1 notwithstanding
        seen.add(plain)
    assert seen == set(base)
    # checkpoints and final/ hold the adapter, nothing of the base
    checkpoint = load_weights(workdir / "out" / "lora-only" / "checkpoints" / "step-00000008")
    assert set(checkpoint) == set(initial)
    with safe_open(str(workdir / "out" / "lora-only" / "final" / "adapter_model.safetensors"), "pt") as f:
        assert f.keys() and all(".lora_A." in k or ".lora_B." in k for k in f.keys())


def test_image_head_changes_exactly_the_image_code_rows(workdir, capsys):
    config = write_config(workdir, "head-exact.yaml", train={**SHORT, "trainable": "image_head"})
    trainer = Trainer(load_config(config), workdir / "out" / "head-exact")
    code = trainer.pipeline.vocab.code_mask
    hidden = trainer.model.config.hidden_size
    total = sum(p.numel() for p in trainer.model.parameters())
    assert f"trainable {int(code.sum()) * hidden:,} of {total:,} parameters" in capsys.readouterr().err
    trainer.run()
    before = load_weights(workdir / "pipe")
    after = load_weights(workdir / "out" / "head-exact" / "final")
    assert before.keys() == after.keys()
    for name in before:
        if name != "output.weight":
            assert torch.equal(before[name], after[name]), name
    w0, w1 = before["output.weight"], after["output.weight"]
    rows = torch.zeros(w0.shape[0], dtype=torch.bool)
    rows[: len(code)] = code
    assert torch.equal(w0[~rows], w1[~rows])  # every other row bit-identical (text, specials, padding)
    assert (w0[rows] != w1[rows]).any(dim=1).all()  # every image-code row moved
    for name in ("tokenizer.json", "vq.safetensors", "vq_config.json"):
        assert (workdir / "pipe" / name).read_bytes() == (workdir / "out" / "head-exact" / "final" / name).read_bytes()


def test_full_training_reports_every_parameter_trainable(workdir, capsys):
    config = write_config(workdir, "all-count.yaml", train={**SHORT, "max_steps": 1})
    trainer = Trainer(load_config(config), workdir / "out" / "all-count")
    total = sum(p.numel() for p in trainer.model.parameters())
    assert f"trainable {total:,} of {total:,} parameters (100%)" in capsys.readouterr().err


def test_a_resumed_lora_run_repeats_the_uninterrupted_one(workdir):
    config = lora_config(workdir, "lora-resume.yaml")
    straight, split = workdir / "out" / "lora-straight", workdir / "out" / "lora-split"
    train(config, out_dir=straight)
    train(config, out_dir=split, max_steps=4)
    assert not (split / "final").exists()
    train(config, out_dir=split)
    assert [s for s, _ in losses(straight)] == list(range(1, 9))
    assert losses(split) == losses(straight)  # the same floats: dropout's RNG and the adapter resume
    assert losses(split, "eval_loss") == losses(straight, "eval_loss")
    with safe_open(str(straight / "final" / "adapter_model.safetensors"), "pt") as f, \
            safe_open(str(split / "final" / "adapter_model.safetensors"), "pt") as g:
        assert f.keys() == g.keys()
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key

    # a LoRA checkpoint holds no base: resuming onto a base whose weights changed is refused
    other = workdir / "pipe-changed"
    shutil.copytree(workdir / "pipe", other)
    weights = load_weights(other)
    moved = write_config(workdir, "lora-moved.yaml", model={"pipeline": "pipe-changed"},
                         train={**SHORT, "trainable": "lora"}, lora=LORA)
    resumed = workdir / "out" / "lora-moved"
    train(moved, out_dir=resumed, max_steps=4)
    save_weights({**weights, "norm.weight": weights["norm.weight"] * 2}, other)
    with pytest.raises(TrainError, match=r"cannot resume .*the base model .*pipe-changed has other weights"):
        train(moved, out_dir=resumed)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("lora, key, message", [
    ({"r": 0}, "lora.r", r"'lora\.r' \(the rank\) must be a positive integer, got 0"),
    ({"r": -2}, "lora.r", r"'lora\.r' \(the rank\) must be a positive integer, got -2"),
    ({"alpha": 0}, "lora.alpha", r"'lora\.alpha' must be positive"),
    ({"dropout": 1.0}, "lora.dropout", r"'lora\.dropout' must be in \[0, 1\)"),
    ({"target_modules": "w[q"}, "lora.target_modules", r"'lora\.target_modules' is not a valid regex"),
    ({"target_modules": 5}, "lora.target_modules", r"'lora\.target_modules' must be a list or str"),
])
def test_bad_lora_settings_are_config_errors_naming_file_line_and_key(workdir, lora, key, message):
    path = lora_config(workdir, "bad-lora.yaml", lora=lora)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("lora:")) + 1
    line += list({**LORA, **lora}).index(key.split(".")[1])
    with pytest.raises(ConfigError, match=rf"bad-lora\.yaml:{line}: {message}"):
        load_config(path)


def test_a_lora_section_without_trainable_lora_is_an_error(workdir):
    path = write_config(workdir, "stray-lora.yaml", lora=LORA)
    with pytest.raises(ConfigError, match=r"stray-lora\.yaml:\d+: a 'lora' section only applies with "
                                          r"'train\.trainable: lora' \(train\.trainable is 'all'\)"):
        load_config(path)
    path = write_config(workdir, "random-lora.yaml", model={"weights": "random"}, train={"trainable": "lora"})
    with pytest.raises(ConfigError, match=r"'train\.trainable: lora' adapts pretrained weights"):
        load_config(path)


@pytest.mark.parametrize("targets, message", [
    (["wq", "wqq"], r"'lora\.target_modules': 'wqq' matches no module of the model "
                    r"\(its Linear layers: w1, w2, w3, wk, wo, wq, wv\)"),
    ("layers\\.9\\..*", r"'lora\.target_modules': the regex 'layers\\\\\.9\\\\\.\.\*' matches no module"),
    (["output"], r"'lora\.target_modules': 'output' matches the output head 'output'.*lora\.modules_to_save"),
    (["attention"], r"'lora\.target_modules': 'attention' matches 'layers\.0\.attention' \(Attention\), "
                    r"not a Linear layer"),
])
def test_lora_targets_are_checked_against_the_built_model_before_any_step(workdir, targets, message):
    path = lora_config(workdir, "bad-targets.yaml", lora={"target_modules": targets})
    config = load_config(path)  # names are not known before the model is built
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "target_modules" in text)
    out = workdir / "out" / "bad-targets"
    with pytest.raises(ConfigError, match=rf"bad-targets\.yaml:{line}: {message}"):
        train(config, out_dir=out)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_modules_to_save_must_name_a_module(workdir):
    path = lora_config(workdir, "bad-save.yaml", lora={"modules_to_save": ["head"]})
    with pytest.raises(ConfigError, match=r"bad-save\.yaml:\d+: 'lora\.modules_to_save': 'head' matches no module"):
        train(path, out_dir=workdir / "out" / "bad-save")


@pytest.fixture(scope="module")
def other_bases(workdir, lora_run):
    """Bases the LoRA run's adapter was not made for: another shape, and the same shape with other weights."""
    root = workdir / "others"
    for name, seed, hidden in (("small", 0, 32), ("seed1", 1, 64)):
        random_pipeline(seed=seed, hidden_size=hidden, num_layers=2, codebook_size=64,
                        image_size=32).save_pretrained(root / name)
    return root


def test_an_adapter_for_another_base_is_a_value_error_naming_the_file(workdir, other_bases):
    final = workdir / "out" / "lora" / "final"
    with pytest.raises(ValueError, match=rf"{ADAPTER_META}: this adapter was made for another base model "
                                         r"\(hidden_size 64 there, 32 here"):
        tokenloom.load(other_bases / "small", adapter=final)
    with pytest.raises(ValueError, match=rf"{ADAPTER_META}: this adapter was made for another base model: .*seed1 has "
                                         r"the shape of the base it was trained on .* but other weights"):
        tokenloom.load(other_bases / "seed1", adapter=final)
    # a plain peft adapter (no tokenloom_adapter.json): the tensors' shapes still tell
    bare = workdir / "out" / "bare-adapter"
    shutil.copytree(final, bare, dirs_exist_ok=True)
    (bare / ADAPTER_META).unlink()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor 'base_model\.model\.layers\.0\..*' has "
                                         r"shape .* the base model needs .*: this adapter was made for another base"):
        tokenloom.load(other_bases / "small", adapter=bare)


def _cli_cases():
    return [
        ("train-r-zero", ["train", "{root}/cli-r0.yaml", "--out-dir", "{out}/run"], "cli-r0.yaml:"),
        ("train-target-matches-nothing", ["train", "{root}/cli-target.yaml", "--out-dir", "{out}/run"],
         "'lora.target_modules': 'wqq' matches no module"),
        ("info-adapter-other-base", ["info", "--model", "{root}/others/small", "--adapter", "{final}"],
         "this adapter was made for another base model"),
        ("generate-adapter-missing", ["generate", "x", "--out", "{out}/new.png", "--model", "{root}/pipe",
                                      "--adapter", "{root}/nowhere"], "no adapter directory at"),
        ("eval-adapter-other-weights", ["eval", "--model", "{root}/others/seed1", "--adapter", "{final}",
                                        "--out", "{out}/eval", "--n", "1"], "but other weights"),
        ("merge-other-base", ["merge-adapter", "{root}/others/small", "{final}", "{out}/merged"],
         "this adapter was made for another base model"),
        ("merge-not-an-adapter", ["merge-adapter", "{root}/pipe", "{root}/pipe", "{out}/merged"],
         "adapter_config.json is missing"),
        ("merge-into-non-empty", ["merge-adapter", "{root}/pipe", "{final}", "{out}"], "is not empty"),
        ("serve-adapter-missing", ["serve", "--model", "{root}/pipe", "--adapter", "{root}/nowhere", "--port", "0"],
         "not a LoRA adapter directory"),
    ]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in _cli_cases()], ids=[c[0] for c in _cli_cases()])
def test_bad_lora_input_on_the_command_line_exits_2_with_one_line(workdir, other_bases, tmp_path, capsys, argv,
                                                                  expected):
    lora_config(workdir, "cli-r0.yaml", lora={"r": 0})
    lora_config(workdir, "cli-target.yaml", lora={"target_modules": ["wq", "wqq"]})
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before the run")
    fill = {"root": str(workdir), "out": str(out), "final": str(workdir / "out" / "lora" / "final")}
    try:
        status = cli([a.format(**fill) for a in argv])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert status == 2, err
    assert expected in err and "Traceback" not in err and len(lines) <= 1, err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "written before the run"


def test_the_weights_fingerprint_ignores_dtype_and_sharding_but_not_weights(workdir, tmp_path):
    from tokenloom.adapters import weights_fingerprint

    pipe = tokenloom.load(workdir / "pipe")
    expected = weights_fingerprint(workdir / "pipe")
    pipe.to(dtype="bfloat16").save_pretrained(tmp_path / "bf16", max_shard_bytes=20_000)
    assert len(list((tmp_path / "bf16").glob("model-*.safetensors"))) > 1
    assert weights_fingerprint(tmp_path / "bf16") == expected
    with torch.no_grad():
        pipe.model.output.weight[-1, 0] += 1.0  # one value of the last row, which is always sampled
    pipe.save_pretrained(tmp_path / "other")
    assert weights_fingerprint(tmp_path / "other") != expected
