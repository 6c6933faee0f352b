"""A catalogue of bad inputs, run through the command line (and a few through the API).

Each CLI case must end with exit status 2 and one short message on stderr that names the bad thing,
print no traceback, and leave every file already written as it was: the output directory holds a
file written before the run (`keep.txt`, and an `old.png` that some cases aim --out at) whose bytes
must not change.
"""

import json
import os
import struct
import zlib

import pytest
import torch
from PIL import Image

from tokenloom.cli import main
from tokenloom.pipeline import Pipeline, random_pipeline
from tokenloom.vqgan import VQGANConfig, load_vqgan_checkpoint


class Exploit:
    """Unpickling this creates a directory: the proof that nothing ran is that it does not exist."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no real pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Every bad file once: images, text, JSONL, configs, model directories, pickles."""
    root = tmp_path_factory.mktemp("bad")
    model = root / "model"
    random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32).save_pretrained(model)
    Image.new("RGB", (32, 32), "red").save(root / "good.png")
    png = (root / "good.png").read_bytes()
    files = {
        "truncated.png": png[: len(png) // 2],
        "corrupt.png": png[:16] + bytes(range(256)) * 4,
        "empty.png": b"",
        "huge.png": _png_header(100_000, 100_000),
        "text.png": b"this is not an image\n",
        "notutf8.txt": b"a red circle\n\xff\xfe broken\n",
        "blank.txt": b"\n\n   \n",
        "garbage.jsonl": b'{"parts": [{"type": "text", "text": "ok"}]}\n{not json\n',
        "unknown_field.jsonl": b'{"parts": [{"type": "text", "text": "ok"}], "colour": 3}\n',
        "wrong_type.jsonl": b'{"parts": [{"type": "text", "text": 5}]}\n',
        "missing_image.jsonl": b'{"parts": [{"type": "image", "path": "nowhere.png"}]}\n',
        "bad_part.jsonl": b'{"parts": [{"type": "video", "path": "x.mp4"}]}\n',
        "notutf8.jsonl": b'{"parts": [{"type": "text", "text": "\xff"}]}\n',
        "bad_yaml.yaml": b"model: {pipeline: model\ndata: [\n",
        "unknown_key.yaml": b"model: {pipeline: model}\ndata: {train: [x], sequence_len: 3}\n",
        "wrong_type.yaml": b"model: {pipeline: model}\ndata: {train: [x]}\ntrain: {max_steps: ten}\n",
        "inf_lr.yaml": b"model: {pipeline: model}\ndata: {train: [x]}\noptim: {lr: .inf}\n",
        "nan_clip.yaml": b"model: {pipeline: model}\ndata: {train: [x]}\noptim: {grad_clip: .nan}\n",
        "list.yaml": b"- just\n- a list\n",
        "vq_unknown.yaml": b"model: {codebook_size: 16}\ntrain: {stepz: 3}\n",
        "config.ini": b"[model]\npipeline = model\n",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "a_directory.png").mkdir()
    # Model directories, each broken in one way.
    import shutil

    def broken(name, edit):
        path = root / name
        shutil.copytree(model, path)
        edit(path)
        return path

    broken("m_no_config", lambda p: (p / "config.json").unlink())
    broken("m_bad_json", lambda p: (p / "config.json").write_text("{not json"))
    broken("m_no_section", lambda p: (p / "config.json").write_text(json.dumps({"model": {}})))
    broken("m_truncated", lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:999]))
    broken("m_empty_weights", lambda p: (p / "model.safetensors").write_bytes(b""))
    broken("m_no_weights", lambda p: (p / "model.safetensors").unlink())
    broken("m_no_tokenizer", lambda p: (p / "tokenizer.json").unlink())
    broken("m_bad_tokenizer", lambda p: (p / "tokenizer.json").write_text('{"model": 3}'))
    broken("m_bad_vq_config", lambda p: (p / "vq_config.json").write_text("[1, 2"))
    broken("m_truncated_vq", lambda p: (p / "vq.safetensors").write_bytes((p / "vq.safetensors").read_bytes()[:500]))
    marker = root / "pwned"
    Exploit.marker = str(marker)
    broken("m_pickled_weights", lambda p: torch.save({"w": Exploit()}, p / "model.safetensors"))
    evil = root / "meta_evil" / "models" / "7b"
    evil.mkdir(parents=True)
    (evil / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 400}))
    torch.save({"tok_embeddings.weight": torch.zeros(8, 32), "payload": Exploit()}, evil / "consolidated.pth")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Exploit()}, root / "evil_vqgan.ckpt")
    return root


def _cases():
    """(id, argv with {root}, {model} and {out} placeholders, what stderr must contain)."""
    m = ["--model", "{model}"]
    gen = ["generate", "a red circle", "--out", "{out}/new.png", *m]
    cases = [
        # --- images: corrupt, truncated, empty, huge, not images, not files
        *[(f"caption-{name}", ["caption", f"{{root}}/{name}", *m], name) for name in
          ("truncated.png", "corrupt.png", "empty.png", "huge.png", "text.png", "a_directory.png", "missing.png")],
        *[(f"ask-{name}", ["ask", f"{{root}}/{name}", "What is it?", *m], name) for name in
          ("truncated.png", "empty.png", "huge.png", "text.png")],
        *[(f"chat-image-{name}", ["chat", "describe", "--image", f"{{root}}/{name}", "--out", "{out}", *m], name)
          for name in ("corrupt.png", "empty.png", "huge.png", "missing.png")],
        ("huge-image-pixels", ["caption", "{root}/huge.png", *m], "exceeds"),
        # --- text: not UTF-8, empty, missing
        ("generate-non-utf8", ["generate", "a \udcff circle", "--out", "{out}/new.png", *m], "not valid UTF-8"),
        ("chat-non-utf8", ["chat", "\udcfe\udcff", "--out", "{out}", *m], "not valid UTF-8"),
        ("ask-non-utf8", ["ask", "{root}/good.png", "wh\udcffat?", *m], "not valid UTF-8"),
        ("prompts-file-non-utf8", ["generate", "--prompts-file", "{root}/notutf8.txt", "--out-dir", "{out}", *m],
         "notutf8.txt is not UTF-8"),
        ("prompts-file-blank", ["generate", "--prompts-file", "{root}/blank.txt", "--out-dir", "{out}", *m],
         "has no prompts"),
        ("prompts-file-missing", ["generate", "--prompts-file", "{root}/nope.txt", "--out-dir", "{out}", *m],
         "nope.txt"),
        ("prompts-file-directory", ["generate", "--prompts-file", "{root}", "--out-dir", "{out}", *m],
         "not a file"),
        # --- absurd sizes and counts
        ("width-zero", [*gen, "--width", "0"], "--width must be >= 1"),
        ("height-negative", [*gen, "--height=-64"], "--height must be >= 1"),
        ("width-not-multiple", [*gen, "--width", "33"], "multiple of"),
        ("width-huge", [*gen, "--width", "1000000", "--height", "64"], "exceeds the maximum side"),
        ("width-not-a-number", [*gen, "--width", "wide"], "--width: invalid int value"),
        ("num-images-zero", [*gen, "--num-images", "0"], "--num-images must be >= 1"),
        ("num-images-huge", [*gen, "--num-images", "100000"], "--num-images must be <= 1000"),
        ("candidates-zero", [*gen, "--candidates", "0"], "--candidates must be >= 1"),
        ("candidates-huge", [*gen, "--candidates", "65"], "candidates must be an integer from 1 to 64"),
        ("batch-size-zero", [*gen, "--batch-size", "0"], "--batch-size must be >= 1"),
        ("temperature-nan", [*gen, "--temperature", "nan"], "temperature must be finite"),
        ("temperature-negative", [*gen, "--temperature=-1"], "temperature must be >= 0"),
        ("top-k-zero", [*gen, "--top-k", "0"], "top_k must be >= 1"),
        ("top-p-zero", [*gen, "--top-p", "0"], "top_p must be > 0"),
        ("top-p-big", [*gen, "--top-p", "1.5"], "top_p must be <= 1"),
        ("guidance-nan", [*gen, "--guidance-scale", "nan"], "guidance_scale must be in"),
        ("guidance-huge", [*gen, "--guidance-scale", "500"], "guidance_scale must be in"),
        ("seed-negative", [*gen, "--seed=-5"], "--seed must be >= 0"),
        ("out-unknown-extension", ["generate", "x", "--out", "{out}/new.xyz", *m], "unknown image extension"),
        ("out-is-a-directory", ["generate", "x", "--out", "{out}", *m], "is a directory"),
        ("out-under-a-file", ["generate", "x", "--out", "{out}/keep.txt/new.png", *m], "not a directory"),
        ("max-new-tokens-zero", ["chat", "hi", "--out", "{out}", "--max-new-tokens", "0", *m],
         "--max-new-tokens must be >= 1"),
        ("max-new-tokens-past-context", ["chat", "hi", "--out", "{out}", "--max-new-tokens", "1000000000", *m],
         "exceeds the model's context"),
        ("chat-out-is-a-file", ["chat", "hi", "--out", "{out}/keep.txt", *m], "not a directory"),
        ("device-cuda", ["info", *m, "--device", "cuda" if not torch.cuda.is_available() else "cuda:99"],
         "device 'cuda"),
        ("device-unknown", ["info", *m, "--device", "quantum"], "unknown device 'quantum'"),
        ("dtype-unknown", ["info", *m, "--dtype", "int3"], "unknown dtype 'int3'"),
        # --- model directories
        ("model-missing", ["info", "--model", "{root}/nowhere"], "no model directory at"),
        ("model-no-config", ["info", "--model", "{root}/m_no_config"], "config.json is missing"),
        ("model-bad-json", ["info", "--model", "{root}/m_bad_json"], "config.json is not valid JSON"),
        ("model-no-section", ["info", "--model", "{root}/m_no_section"], "has no 'vocab' section"),
        ("model-truncated-weights", ["info", "--model", "{root}/m_truncated"], "model.safetensors"),
        ("model-empty-weights", ["info", "--model", "{root}/m_empty_weights"], "model.safetensors"),
        ("model-no-weights", ["info", "--model", "{root}/m_no_weights"], "m_no_weights"),
        ("model-no-tokenizer", ["info", "--model", "{root}/m_no_tokenizer"], "tokenizer.json"),
        ("model-bad-tokenizer", ["info", "--model", "{root}/m_bad_tokenizer"], "tokenizer.json"),
        ("model-bad-vq-config", ["info", "--model", "{root}/m_bad_vq_config"], "vq_config.json"),
        ("model-truncated-vq", ["info", "--model", "{root}/m_truncated_vq"], "vq.safetensors"),
        ("model-pickled-weights", ["info", "--model", "{root}/m_pickled_weights"], "model.safetensors"),
        # --- hostile pickles
        ("convert-hostile-pickle", ["convert", "--from", "chameleon-meta", "{root}/meta_evil/models/7b",
                                    "{out}/converted"], "meta_evil"),
        # --- malformed JSONL for pretokenize
        *[(f"pretokenize-{name}", ["pretokenize", "{model}", "{out}/shards", f"{{root}}/{name}"], f"{name}:")
          for name in ("garbage.jsonl", "unknown_field.jsonl", "wrong_type.jsonl", "missing_image.jsonl",
                       "bad_part.jsonl", "notutf8.jsonl")],
        ("pretokenize-missing-input", ["pretokenize", "{model}", "{out}/shards", "{root}/none.jsonl"], "none.jsonl"),
        ("pretokenize-shard-size-zero", ["pretokenize", "{model}", "{out}/shards", "{root}/garbage.jsonl",
                                         "--shard-size", "0"], "--shard-size must be >= 1"),
        # --- bad configs
        ("train-missing-config", ["train", "{root}/none.yaml"], "none.yaml"),
        ("train-bad-yaml", ["train", "{root}/bad_yaml.yaml"], "bad_yaml.yaml"),
        ("train-unknown-key", ["train", "{root}/unknown_key.yaml"], "unknown_key.yaml:2: unknown key 'data.sequence_len'"),
        ("train-wrong-type", ["train", "{root}/wrong_type.yaml"], "wrong_type.yaml:3: 'train.max_steps' must be int"),
        ("train-inf-lr", ["train", "{root}/inf_lr.yaml"], "inf_lr.yaml:3"),
        ("train-nan-grad-clip", ["train", "{root}/nan_clip.yaml"], "nan_clip.yaml:3"),
        ("train-not-a-mapping", ["train", "{root}/list.yaml"], "list.yaml"),
        ("train-unknown-format", ["train", "{root}/config.ini"], "config.ini"),
        ("train-vq-unknown-key", ["train-vq", "{root}/vq_unknown.yaml", "--out", "{out}/vq"], "vq_unknown.yaml:2"),
        ("train-vq-missing-config", ["train-vq", "{root}/none.yaml", "--out", "{out}/vq"], "none.yaml"),
        # --- eval and the command line itself
        ("eval-n-zero", ["eval", *m, "--out", "{out}/eval", "--n", "0"], "n must be in 1..5000"),
        ("eval-unknown-task", ["eval", *m, "--out", "{out}/eval", "--tasks", "dance"], "unknown task"),
        ("eval-batch-size-zero", ["eval", *m, "--out", "{out}/eval", "--batch-size", "0"], "--batch-size must be >= 1"),
        # --- speculative decoding
        ("speculative-window-zero", [*gen, "--speculative", "jacobi", "--speculative-window", "0"],
         "speculative_window must be an integer in 1..63"),
        ("speculative-window-huge", [*gen, "--speculative-window", "1000"], "speculative_window must be an integer"),
        ("speculative-unknown", [*gen, "--speculative", "medusa"], "invalid choice: 'medusa'"),
        ("eval-speculative-window", ["eval", *m, "--out", "{out}/eval", "--speculative-window", "-3"],
         "speculative_window must be an integer"),
        ("unknown-verb", ["paint", "x"], "unknown verb 'paint'"),
        ("unknown-option", ["generate", "x", "--colour", "red"], "unrecognized arguments: --colour red"),
        ("missing-argument", ["ask", "{root}/good.png"], "the following arguments are required: question"),
    ]
    return cases


CASES = _cases()


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_message_and_loses_nothing(bad, tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before the run")
    Image.new("RGB", (8, 8), "blue").save(out / "old.png")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fill = {"root": str(bad), "model": str(bad / "model"), "out": str(out)}
    args = [a.format(**fill) for a in argv]
    try:
        status = main(args)
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert expected in err, err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # not progress bars
    assert "Traceback" not in err and len(lines) <= 2, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert not (bad / "pwned").exists()  # no pickle ever ran


@pytest.mark.parametrize("make, message", [
    (lambda p, root: p.encode_image(root / "truncated.png"), "truncated.png"),
    (lambda p, root: p.encode_image(root / "huge.png"), "exceeds"),
    (lambda p, root: p.encode_image(3), "must be a PIL image or a path"),
    (lambda p, root: p.caption(root / "text.png"), "text.png"),
    (lambda p, root: p.ask([root / "good.png"] * 2, ["a", "b", "c"]), "2 images but 3 questions"),
    (lambda p, root: p.chat(["a", "b"], images=[[]]), "2 prompts but 1 image lists"),
    (lambda p, root: p.chat([]), "non-empty list"),
    (lambda p, root: p.generate_images("x", width=48, height=1_000_000), "exceeds the maximum side"),
    (lambda p, root: p.chat("x", guidance_scale=0.5), "guidance_scale must be in"),
    (lambda p, root: p.chat("x", max_new_tokens=10**9), "exceeds the model's context"),
    (lambda p, root: p.chat("x", seed=2.5), "seed must be an integer"),
    (lambda p, root: load_vqgan_checkpoint(root / "evil_vqgan.ckpt", VQGANConfig()), "weights_only=True"),
])
def test_bad_api_input_raises_value_error_naming_it(bad, make, message):
    pipe = Pipeline.from_pretrained(bad / "model")
    with pytest.raises(ValueError, match=message):
        make(pipe, bad)
    assert not (bad / "pwned").exists()
