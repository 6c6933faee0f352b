"""The evaluation's scorers: right answers score 1, wrong ones 0 (so the numbers can be trusted)."""

import json

import numpy as np
import pytest
from PIL import Image

from tokenloom.document import Document, ImagePart, TextPart
from tokenloom.evaluation import evaluate, score_edit, score_story, score_t2i, score_text
from tokenloom.pipeline import random_pipeline
from tokenloom.world.tasks import TELL_A_STORY, heldout_samples


def test_t2i_scorer_accepts_true_renders_and_rejects_wrong_ones():
    samples = heldout_samples("t2i", 30, seed=3)
    score, breakdown, records, shown = score_t2i(samples, [s.images[0] for s in samples])
    assert score == 1.0 and all(v == 1.0 for v in breakdown.values())
    assert len(shown) == 30 and all(r["right"] for r in records)
    blank = Image.new("RGB", samples[0].size, "white")
    assert score_t2i(samples, [blank] * 30)[0] == 0.0
    # Another sample's image is right only when it happens to fit this caption.
    shifted = [samples[(i + 1) % 30].images[0] for i in range(30)]
    assert score_t2i(samples, shifted)[0] < 0.2


def test_text_edit_and_story_scorers():
    qa = heldout_samples("qa", 20, seed=1)
    score, breakdown, _ = score_text(qa, [s.info["answer"] + " " for s in qa])
    assert score == 1.0 and set(breakdown) == {"kind_count", "kind_color", "kind_shape", "kind_where"}
    # Right only on color questions whose answer is purple: the breakdown puts every miss elsewhere.
    score, breakdown, _ = score_text(qa, ["purple"] * 20)
    assert score < 0.5 and breakdown["kind_count"] == breakdown["kind_where"] == 0.0
    captions = heldout_samples("caption", 20, seed=1)
    score, breakdown, _ = score_text(captions, [s.info["answer"] if len(s.scenes[0]) == 1 else "" for s in captions])
    assert breakdown["objects_1"] == 1.0 and all(v == 0.0 for k, v in breakdown.items() if k != "objects_1")
    edits = heldout_samples("edit", 20, seed=1)
    score, breakdown, records = score_edit(edits, [s.images[1] for s in edits])
    assert score == 1.0 and breakdown["kept_rest"] == 1.0 and breakdown["unchanged"] == 0.0
    assert {k for k in breakdown if k.startswith("kind_")} == {f"kind_{r['kind']}" for r in records}
    assert all(v == 1.0 for k, v in breakdown.items() if k.startswith("kind_"))
    # The unedited image is wrong, but it keeps everything the change leaves alone.
    score, breakdown, _ = score_edit(edits, [s.images[0] for s in edits])
    assert score == 0.0 and breakdown["unchanged"] == 1.0 and breakdown["kept_rest"] == 1.0
    # Another sample's edited image keeps the wrong rest (an empty rest is kept by any image).
    score, breakdown, _ = score_edit(edits, [edits[(i + 1) % 20].images[1] for i in range(20)])
    assert score < 0.2 and breakdown["kept_rest"] < 0.5
    score, breakdown, _ = score_edit(edits, [None] * 20)
    assert score == 0.0 and breakdown["kept_rest"] == 0.0 and breakdown["unchanged"] == 0.0
    stories = heldout_samples("story", 15, seed=1)

    def doc(s, images):
        parts = [TextPart(p) if isinstance(p, str) else ImagePart(np.zeros((1, 1), dtype=np.int64), pixels=im)
                 for p, im in zip(s.answer, _images_in_order(s.answer, images))]
        return Document.from_parts(parts, role="assistant")

    right = [doc(s, s.images) for s in stories]
    score, breakdown, _ = score_story(stories, right)
    assert score == 1.0 and set(breakdown) == {"image_1", "image_2", "image_3"}
    wrong = [doc(s, [s.images[0]] * len(s.images)) for s in stories]  # nothing ever changes
    score, breakdown, _ = score_story(stories, wrong)
    assert score < 0.7 and breakdown["image_1"] == 1.0 and breakdown["image_2"] == 0.0
    # A story that stops after its first image counts the images it did not draw as wrong.
    first_only = [Document.from_parts(d.parts[:_first_image(d.parts) + 1], role="assistant") for d in right]
    score, breakdown, _ = score_story(stories, first_only)
    assert breakdown["image_1"] == 1.0 and breakdown["image_2"] == breakdown["image_3"] == 0.0
    assert score == len(stories) / sum(len(s.scenes) for s in stories)


def _first_image(parts):
    return next(i for i, p in enumerate(parts) if not isinstance(p, TextPart))


def _images_in_order(answer, images):
    it = iter(images)
    return [None if isinstance(p, str) else next(it) for p in answer]


def test_evaluate_writes_report_for_a_random_model(tmp_path):
    pipe = random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=64)
    report = evaluate(pipe, tmp_path, n=2, tasks=("t2i", "qa", "edit"), progress=False)
    assert set(report["scores"]) == {"t2i", "qa", "edit"}
    assert {"kept_rest", "unchanged"} <= set(report["edit_breakdown"])
    assert json.loads((tmp_path / "report.json").read_text())["edit_breakdown"] == report["edit_breakdown"]
    assert "| kept_rest |" in (tmp_path / "summary.md").read_text()
    assert set(report["qa_breakdown"]) <= {"kind_count", "kind_color", "kind_shape", "kind_where"}
    assert (tmp_path / "samples.png").exists()
    with Image.open(tmp_path / "edits.png") as grid:  # two edits of (source, drawn, target) in one row
        assert grid.width > 6 * 64 and grid.height < 2 * 64
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(pipe, tmp_path, n=2, tasks=("dance",))


def test_eval_cli_overrides_sampling_and_records_it(tmp_path, capsys):
    from tokenloom.cli import main as cli

    def main(argv):
        return cli(["eval", *argv])

    model = tmp_path / "model"
    random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=64).save_pretrained(model)
    out = tmp_path / "out"
    assert main(["--model", str(model), "--out", str(out), "--n", "2", "--tasks", "t2i",
                 "--guidance-scale", "1.5", "--image-temperature", "0", "--image-top-k", "4"]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["guidance_scale"] == 1.5 and settings["edit_guidance_scale"] == 1.0
    assert settings["image_sampling"]["temperature"] == 0 and settings["image_sampling"]["top_k"] == 4
    assert "guidance 1.5 (edits 1.0), image temperature 0.0, top-k 4" in (out / "summary.md").read_text()
    assert settings["image_candidates"] == 1 and "candidates" not in (out / "summary.md").read_text()
    assert main(["--model", str(model), "--out", str(out), "--n", "2", "--tasks", "t2i", "--candidates", "3"]) == 0
    settings = json.loads((out / "report.json").read_text())["settings"]
    assert settings["image_candidates"] == 3 and "best of 3 candidates" in (out / "summary.md").read_text()
    assert main(["--model", str(model), "--out", str(out), "--guidance-scale", "500"]) == 2
    assert main(["--model", str(model), "--out", str(out), "--image-temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert main(["--model", str(model), "--out", str(out), "--candidates", "0"]) == 2
    assert "--candidates must be an integer from 1 to 64" in capsys.readouterr().err


def test_edit_eval_draws_unguided_whatever_the_pipeline_guidance(monkeypatch):
    from tokenloom import evaluation
    from tokenloom.world.tasks import heldout_samples

    pipe = random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=64)
    pipe.config.guidance_scale = 3.0
    seen = []
    monkeypatch.setattr(pipe, "run_batched", lambda requests, *a, **k: seen.extend(requests) or [
        type("R", (), {"images": []})() for _ in requests])
    samples = heldout_samples("edit", 2, 0)
    score, _, records, shown = evaluation.eval_edit(pipe, samples, 2, False)
    assert [r.guidance_scale for r in seen] == [evaluation.EDIT_GUIDANCE_SCALE] * 2 == [1.0, 1.0]
    assert score == 0 and not any(r["right"] for r in records)  # no image drawn counts as wrong
    # edits.png still shows each source and target, with a blank, red-bordered image between them.
    assert len(shown) == 6 and shown[0].getpixel((0, 0)) == shown[2].getpixel((0, 0)) == evaluation.FRAME
    assert shown[0].crop((2, 2, shown[0].width - 2, shown[0].height - 2)).tobytes() == samples[0].images[0].tobytes()
    assert shown[1].getpixel((0, 0)) == (220, 40, 40) and shown[1].getpixel((10, 10)) == (255, 255, 255)


def test_story_eval_samples_each_story_with_its_own_seed(tmp_path):
    """Greedy text would open every "Tell a story." alike and score one story n times over."""
    pipe = random_pipeline(seed=0, hidden_size=32, num_layers=1, codebook_size=64, image_size=64)
    report = evaluate(pipe, tmp_path, n=8, tasks=("story",), progress=False)
    told = [r["text"] for r in report["details"]["story"] if r["prompt"] == TELL_A_STORY]
    assert len(told) >= 2 and len(set(told)) == len(told)
    again = evaluate(pipe, tmp_path / "again", n=8, tasks=("story",), progress=False)
    assert again["details"]["story"] == report["details"]["story"]  # still reproducible
