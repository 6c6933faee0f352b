"""Regression tests for the defects a first user met within minutes (numbered as in the house issue)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tokenloom.cli import main
from tokenloom.document import Document, ImagePart
from tokenloom.engine import Engine
from tokenloom.pipeline import Pipeline, random_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("defects") / "model"
    random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=32).save_pretrained(path)
    return path


@pytest.fixture()
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir)


def _codes(image, pipe):
    return pipe.encode_image(image).codes


# 1. No seed means fresh randomness, not greedy; a given seed stays reproducible.
def test_1_no_seed_samples_fresh_images_and_a_seed_reproduces(pipe):
    images = pipe.generate_images("a red circle", num_images=3, candidates=1)
    arrays = [np.asarray(im) for im in images]
    assert not (np.array_equal(arrays[0], arrays[1]) and np.array_equal(arrays[1], arrays[2]))
    again = [np.asarray(im) for im in pipe.generate_images("a red circle", num_images=3, candidates=1, seed=7)]
    same = [np.asarray(im) for im in pipe.generate_images("a red circle", num_images=3, candidates=1, seed=7)]
    assert all(np.array_equal(a, b) for a, b in zip(again, same))


def test_1_reranking_without_a_seed_draws_different_candidates(pipe, monkeypatch):
    from tokenloom import scoring

    groups = []
    monkeypatch.setattr(scoring, "best_candidate", lambda pipe, prompt, text, group: groups.append(group) or 0)
    pipe.generate_images("a red circle", candidates=4)
    codes = [part.codes for part in groups[0]]
    assert len(codes) == 4 and len({c.tobytes() for c in codes}) > 1


def test_1_the_result_keeps_the_seed_it_used(pipe):
    first = pipe.chat("hello", max_new_tokens=12, temperature=1.0)
    assert isinstance(first.seed, int)
    assert pipe.chat("hello", max_new_tokens=12, temperature=1.0, seed=first.seed).ids == first.ids


def test_1_cli_prints_the_seed_with_verbose_and_the_seed_reproduces(model_dir, tmp_path, capsys):
    assert main(["generate", "a red circle", "--out", str(tmp_path / "a.png"), "--model", str(model_dir),
                 "--candidates", "1", "-v"]) == 0
    err = capsys.readouterr().err
    seed = int(err.split("--seed ")[1].split(")")[0])
    assert main(["generate", "a red circle", "--out", str(tmp_path / "b.png"), "--model", str(model_dir),
                 "--candidates", "1", "--seed", str(seed)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert main(["generate", "a red circle", "--out", str(tmp_path / "c.png"), "--model", str(model_dir),
                 "--candidates", "1", "--num-images", "3"]) == 0
    drawn = [(tmp_path / f"c_{k}.png").read_bytes() for k in range(3)]
    assert len(set(drawn)) > 1


# 2. eval --image-temperature reaches reranked text-to-image, and the report says what was used.
def test_2_eval_image_temperature_reaches_reranked_candidates(model_dir, tmp_path, monkeypatch):
    seen = []
    original = Engine.generate

    def spy(self, requests, progress=False):
        seen.extend(r.image.temperature for r in requests if r.mode == "image")
        return original(self, requests, progress)

    monkeypatch.setattr(Engine, "generate", spy)
    assert main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--n", "2", "--tasks", "t2i",
                 "--candidates", "2", "--image-temperature", "0.25"]) == 0
    assert seen and set(seen) == {0.25}
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["settings"]["candidate_sampling"]["temperature"] == 0.25
    assert "drawn at temperature 0.25" in (tmp_path / "e" / "summary.md").read_text()


# 3. Hugging Face keyword names, lists batched in one engine call, pipe.to().
def test_3_chat_ask_caption_stream_take_hf_keywords_and_lists(pipe, monkeypatch):
    image = Image.new("RGB", (32, 32), "red")
    calls = []
    original = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, reqs, progress=False: calls.append(reqs)
                        or original(self, reqs, progress))
    result = pipe.chat("hi", temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1, max_new_tokens=8,
                       image_temperature=0.5, image_top_k=3, image_top_p=0.8)
    (request,) = calls[-1]
    assert (request.text.temperature, request.text.top_k, request.text.top_p,
            request.text.repetition_penalty) == (0.7, 5, 0.9, 1.1)
    assert (request.image.temperature, request.image.top_k, request.image.top_p) == (0.5, 3, 0.8)
    assert request.max_new_tokens == 8 and len(result.ids) <= 8
    pipe.chat("hi", do_sample=False, max_new_tokens=4)
    assert calls[-1][0].text.temperature == 0 and calls[-1][0].image.temperature == 0
    results = pipe.chat(["hi", "hello"], max_new_tokens=4, seed=3)
    assert len(results) == 2 and len(calls[-1]) == 2  # one engine call for the list
    answers = pipe.ask([image, image], ["What?", "Which?"], max_new_tokens=4, temperature=0.5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers) and len(calls[-1]) == 2
    assert len(pipe.caption([image, image, image], max_new_tokens=4, top_k=2)) == 3 and len(calls[-1]) == 3
    rows = {e.row for e in pipe.stream(["a", "b"], max_new_tokens=3, temperature=0.1)}
    assert rows == {0, 1}
    assert pipe.to("cpu", "bfloat16") is pipe and next(pipe.model.parameters()).dtype == torch.bfloat16
    assert pipe.chat("hi", max_new_tokens=3).ids  # the engine is rebuilt for the new dtype


# 4. Text-only requests carry no guidance row.
def test_4_text_only_requests_have_no_guidance_rows(pipe, monkeypatch):
    rows = []  # batch rows of every forward
    original = type(pipe.model).forward
    monkeypatch.setattr(type(pipe.model), "forward",
                        lambda self, ids, **kw: rows.append(ids.shape[0]) or original(self, ids, **kw))
    image = Image.new("RGB", (32, 32), "blue")
    pipe.ask(image, "What color is it?", max_new_tokens=4)
    assert set(rows) == {1}
    rows.clear()
    pipe.caption([image, image], max_new_tokens=4)
    assert max(rows) == 2
    rows.clear()
    pipe.chat("hi", mode="text", guidance_scale=3.0, max_new_tokens=4)
    assert set(rows) == {1}
    rows.clear()
    pipe.chat("draw", mode="image", guidance_scale=3.0, max_new_tokens=pipe.format.image_length(2, 2) + 1,
              image_size=(2, 2))
    assert set(rows) == {2}  # an image request keeps its unconditional row


# 5. Text parts separated by images do not run together.
def test_5_result_text_keeps_parts_apart(model_dir, tmp_path, capsys, monkeypatch):
    image = ImagePart(np.zeros((2, 2), dtype=np.int64))
    doc = Document.from_parts(["bottom left", image, "the yellow square"], role="assistant")
    assert doc.text == "bottom left\nthe yellow square"
    from tokenloom.engine import GenerationResult

    monkeypatch.setattr(Pipeline, "chat", lambda self, *a, **k: GenerationResult([1], doc, "stop", 0))
    assert main(["chat", "hi", "--out", str(tmp_path / "c"), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bottom left" and out[1].startswith("[image 2x2 codes") and out[2] == "the yellow square"


# 6. Zero is an error, never "the default".
@pytest.mark.parametrize("flag", ["--width", "--height"])
def test_6_zero_size_is_an_error(model_dir, tmp_path, capsys, flag):
    assert main(["generate", "x", "--out", str(tmp_path / "a.png"), "--model", str(model_dir), flag, "0"]) == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_6_zero_max_new_tokens_is_an_error(pipe, model_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        pipe.chat("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="width must be >= 1"):
        pipe.generate_images("x", width=0)
    assert main(["chat", "hi", "--out", str(tmp_path / "c"), "--model", str(model_dir), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


# 7. Non-UTF-8 bytes in a prompt: a clear error, for the API and the CLI (with real bytes in argv).
def test_7_non_utf8_prompt_is_a_clear_error(pipe):
    bad = b"a red \xff circle".decode("utf-8", "surrogateescape")
    image = Image.new("RGB", (32, 32), "red")
    for call in (lambda: pipe.chat(bad), lambda: pipe.ask(image, bad), lambda: pipe.generate_images(bad)):
        with pytest.raises(ValueError, match=r"prompt is not valid UTF-8: byte b'\\xff' at character 6"):
            call()


def test_7_non_utf8_argv_exits_2_without_traceback(model_dir, tmp_path):
    for argv in ([b"generate", b"a \xff", b"--out", str(tmp_path / "a.png").encode()],
                 [b"chat", b"\xfe\xff", b"--out", str(tmp_path / "c").encode()]):
        run = subprocess.run([sys.executable.encode(), b"-m", b"tokenloom.cli", *argv, b"--model",
                              str(model_dir).encode()], capture_output=True, timeout=120)
        err = run.stderr.decode("utf-8", "replace")
        assert run.returncode == 2 and "not valid UTF-8" in err and "Traceback" not in err, err


# 8. Every numeric argument is validated up front, by name.
@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"temperature": float("inf")}, "temperature must be finite"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": float("nan")}, "top_p must be finite"),
    ({"num_images": 1.5}, "num_images must be an integer"),
    ({"num_images": True}, "num_images must be an integer"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be in"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"seed": -1}, "seed must be >= 0"),
])
def test_8_generate_images_validates_numbers(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate_images("x", **kwargs)


def test_8_bad_prompts_and_chat_numbers(pipe):
    with pytest.raises(ValueError, match="prompts must be a string"):
        pipe.generate_images(None)
    with pytest.raises(ValueError, match="prompt must be a string"):
        pipe.generate_images([3])
    with pytest.raises(ValueError, match="temperature must be finite"):
        pipe.chat("hi", temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        pipe.chat("hi", top_k=2.5)
    with pytest.raises(ValueError, match="do_sample must be True or False"):
        pipe.chat("hi", do_sample="yes")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_8_cli_non_finite_temperature(model_dir, tmp_path, capsys, value):
    assert main(["generate", "x", "--out", str(tmp_path / "a.png"), "--model", str(model_dir),
                 f"--temperature={value}"]) == 2
    assert "temperature must be finite" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


# 11. generate checks its output before drawing, writes each image as it is done, and bounds --num-images.
def test_11_generate_bounds_counts_and_checks_paths_first(model_dir, tmp_path, capsys, monkeypatch):
    drawn = []
    monkeypatch.setattr(Engine, "generate", lambda *a, **k: drawn.append(1) or [])
    base = ["generate", "x", "--model", str(model_dir)]
    assert main([*base, "--out", str(tmp_path / "a.png"), "--num-images", "100000"]) == 2
    assert "--num-images must be <= 1000" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "a.xyz")]) == 2
    assert "unknown image extension '.xyz'" in capsys.readouterr().err
    (tmp_path / "file").write_text("not a directory")
    assert main([*base, "--out", str(tmp_path / "file" / "a.png")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert drawn == []  # nothing was drawn for any of them


def test_11_images_drawn_before_an_interruption_are_kept(model_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    original, calls = Engine.generate, []

    def interrupted(self, requests, progress=False):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, requests, progress)

    monkeypatch.setattr(Engine, "generate", interrupted)
    assert main(["generate", "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "out"), "--model",
                 str(model_dir), "--batch-size", "1", "--candidates", "1", "--seed", "0"]) == 130
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0000.png", "0001.png"]


# 14. A device this build lacks, and a truncated weights file, are clear errors.
def test_14_missing_cuda_is_a_clear_error(model_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["info", "--model", str(model_dir), "--device", "cuda"]) == 2
    assert "device 'cuda' is not available here" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        Pipeline.from_pretrained(model_dir, device="gpu0")


def test_14_truncated_weights_name_the_file(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["info", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err
