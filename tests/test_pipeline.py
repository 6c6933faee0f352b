"""Checkpoint directories, tokenloom.load, and the CLI on a tiny random pipeline."""

import json

import pytest
import torch

import tokenloom
from tokenloom.checkpoint import INDEX_NAME, WEIGHTS_NAME, iter_weights, save_weights
from tokenloom.cli import main
from tokenloom.pipeline import Pipeline


def test_load_returns_pipeline_mapping_ids_to_logits(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = tokenloom.load(tmp_path / "m")
    ids = torch.randint(0, loaded.vocab.size, (3, 11))
    logits = loaded.model(ids)
    assert logits.shape == (3, 11, loaded.model.config.vocab_size)
    assert torch.equal(logits, pipe.model(ids))
    assert loaded.vocab == pipe.vocab
    assert loaded.config == pipe.config
    assert loaded.text_tokenizer.encode("a red circle") == pipe.text_tokenizer.encode("a red circle")


def test_save_weights_keeps_views_of_one_storage_and_drops_only_aliases(tmp_path):
    fused = torch.arange(24.0).reshape(6, 4)
    q, k = fused[:3], fused[3:]  # slices of a fused weight: same storage, different offsets
    save_weights({"q": q, "k": k, "tied_a": fused, "tied_b": fused}, tmp_path)
    got = dict(iter_weights(tmp_path))
    assert set(got) == {"q", "k", "tied_a"}  # tied_b is the same view as tied_a: re-tied on load
    assert torch.equal(got["q"], q) and torch.equal(got["k"], k) and torch.equal(got["tied_a"], fused)


def test_sharded_save_round_trips(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "s", max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "s").glob("model*.safetensors"))
    assert len(files) > 1 and (tmp_path / "s" / INDEX_NAME).exists()
    assert not (tmp_path / "s" / WEIGHTS_NAME).exists()
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(pipe.model.state_dict())
    loaded = Pipeline.from_pretrained(tmp_path / "s")
    for name, t in pipe.model.state_dict().items():
        assert torch.equal(t, loaded.model.state_dict()[name]), name
    # Saving again unsharded removes the old shards.
    pipe.save_pretrained(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").glob("model*.safetensors")) == [WEIGHTS_NAME]
    assert not (tmp_path / "s" / INDEX_NAME).exists()


def test_load_in_bfloat16(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = tokenloom.load(tmp_path / "m", dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, loaded.vocab.size, (1, 7))
    assert torch.allclose(loaded.model(ids).float(), pipe.model(ids), atol=0.1)


def test_bad_directories(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory"):
        tokenloom.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        tokenloom.load(tmp_path / "empty")
    pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        tokenloom.load(tmp_path / "m")
    pipe.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["hidden_size"] = 32
    cfg["model"]["intermediate_size"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        tokenloom.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tokenloom.load(tmp_path / "m")


def test_no_pickle_files_written(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert names == {"config.json", WEIGHTS_NAME, "tokenizer.json", "vq.safetensors", "vq_config.json"}


def test_cli_generate_chat_caption(tmp_path, capsys):
    model = tmp_path / "m"
    assert main(["init-random", str(model)]) == 0
    assert main(["info", "--model", str(model)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["vocab"]["size"] > 0
    assert main(["generate", "a red circle", "--out", str(tmp_path / "a.png"), "--model", str(model),
                 "--seed", "0"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (64, 64)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\na green triangle\n")
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "many"),
                 "--model", str(model), "--seed", "1", "--width", "32", "--height", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert main(["generate", "a red circle", "--out", str(tmp_path / "best.png"), "--model", str(model),
                 "--seed", "0", "--candidates", "3"]) == 0
    assert (tmp_path / "best.png").exists()
    assert main(["generate", "x", "--out", str(tmp_path / "c.png"), "--model", str(model), "--candidates", "65"]) == 2
    assert "candidates must be an integer from 1 to 64" in capsys.readouterr().err
    assert main(["chat", "hello", "--out", str(tmp_path / "chat"), "--model", str(model), "--max-new-tokens", "20",
                 "--seed", "0"]) == 0
    assert (tmp_path / "chat" / "index.html").exists() and (tmp_path / "chat" / "index.md").exists()
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "a.png"), "--model", str(model), "--seed", "0"]) == 0
    assert main(["ask", str(tmp_path / "a.png"), "what?", "--model", str(model), "--seed", "0"]) == 0
    assert main(["caption", str(tmp_path / "missing.png"), "--model", str(model)]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["generate", "x", "--out", str(tmp_path / "b.png"), "--model", str(model), "--width", "33"]) == 2


def test_every_verb_has_help(capsys):
    from tokenloom.cli import VERBS

    assert {"info", "generate", "chat", "caption", "ask", "train", "train-vq", "pretokenize", "eval",
            "convert", "expand", "export"} <= set(VERBS)
    for verb in VERBS:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
