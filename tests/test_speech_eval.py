"""The speech tasks in `tokenloom eval`, on the small random speech pipeline: they run, they are scored as
the issue says, and they are offered only to a model that can hear and speak."""

import json

import pytest

from tokenloom.cli import main
from tokenloom.evaluation import default_tasks, evaluate
from tokenloom.speech_evaluation import SPEECH_TASKS


def test_default_tasks_follow_what_the_model_can_do(pipe, speech_pipe) -> None:
    assert not set(SPEECH_TASKS) & set(default_tasks(pipe))
    assert set(SPEECH_TASKS) <= set(default_tasks(speech_pipe))
    with pytest.raises(ValueError, match="speech codes and a speech codec"):
        evaluate(pipe, "unused", n=1, tasks=["asr"])


def test_speech_tasks_are_scored(speech_pipe, tmp_path) -> None:
    report = evaluate(speech_pipe, tmp_path, n=2, tasks=SPEECH_TASKS, progress=False)
    assert set(report["scores"]) == set(SPEECH_TASKS)
    assert all(0.0 <= s <= 1.0 for s in report["scores"].values())
    tts = report["tts_breakdown"]
    # the recogniser's ceiling on espeak-ng's own renders of the same captions is measured beside the model
    assert set(tts) == {"recognizer_on_espeak", "recognizer_on_codec_round_trip", "model_share_of_espeak_ceiling"}
    assert tts["recognizer_on_espeak"] > 0  # two held-out captions: the recogniser hears espeak-ng well
    records = report["details"]["tts"]
    assert all(r["right"] is False for r in records) and all("espeak_heard" in r for r in records)  # random weights
    assert {r["expected"] for r in report["details"]["asr"]} and report["details"]["speech_t2i"][0]["prompt"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| tts |" in summary and "recognizer_on_espeak" in summary
    assert json.loads((tmp_path / "report.json").read_text())["n"] == 2


def test_eval_verb_takes_speech_tasks(speech_pipe, old_pipe, tmp_path, capsys) -> None:
    model, old = tmp_path / "model", tmp_path / "old"
    speech_pipe.save_pretrained(model)
    old_pipe.save_pretrained(old)
    assert main(["eval", "--model", str(model), "--out", str(tmp_path / "eval"), "--n", "1",
                 "--tasks", "asr,spoken_qa"]) == 0
    assert main(["eval", "--model", str(old), "--out", str(tmp_path / "old-eval"), "--n", "1", "--tasks", "tts"]) == 2
    assert "speech codes" in capsys.readouterr().err
