"""The shapes world's speech tasks: documents with spoken parts, written as WAV files, in training voices
for training and the held-out voices (m7, f4) for evaluation only."""

import json

import numpy as np
import pytest

from tokenloom.audio_io import Audio, read_audio
from tokenloom.world import parse_caption
from tokenloom.world.speech import HELD_OUT_VARIANTS, LEAD_SILENCE, TAIL_SILENCE
from tokenloom.world.speech_tasks import DRAW_WHAT_YOU_HEAR, SAY, SPEECH_TASKS, TRANSCRIBE
from tokenloom.world.tasks import TASKS, build_dataset, heldout_samples, training_sample


def _variant(said) -> str | None:
    return said["voice"].partition("+")[2] or None


def test_speech_tasks_follow_every_other_task() -> None:
    # appended: the earlier tasks' places (part of their documents' seeds) are unchanged
    assert list(TASKS)[-4:] == list(SPEECH_TASKS)
    assert list(TASKS)[:5] == ["t2i", "caption", "qa", "story", "edit"]


@pytest.mark.parametrize("task", SPEECH_TASKS)
def test_voices_of_training_and_held_out_samples(task) -> None:
    train = [training_sample(task, j, seed=1) for j in range(4)]
    held = heldout_samples(task, 4, seed=1)
    for s in train:
        assert all(_variant(x) not in HELD_OUT_VARIANTS for x in s.info["speech"])
    if task != "tts":  # tts answers in a training voice whatever the stream: only what it says is scored
        assert all(_variant(x) in HELD_OUT_VARIANTS for s in held for x in s.info["speech"])
    for s in train + held:
        (audio,) = s.audio
        assert audio.dtype == np.float32 and len(audio) > (LEAD_SILENCE + TAIL_SILENCE) * 16000
    again = training_sample(task, 2, seed=1)
    assert np.array_equal(again.audio[0], train[2].audio[0]) and again.document == train[2].document


def test_what_each_task_asks() -> None:
    asr, tts, qa, t2i = (heldout_samples(t, 1, seed=2)[0] for t in SPEECH_TASKS)
    assert isinstance(asr.prompt[0], Audio) and asr.prompt[1] == TRANSCRIBE and asr.answer == [asr.info["answer"]]
    assert parse_caption(asr.info["answer"]).objects  # a canonical caption, said and expected back
    assert tts.prompt == [SAY + tts.info["text"]] and isinstance(tts.answer[0], Audio)
    assert isinstance(qa.prompt[1], Audio) and qa.answer == [qa.info["answer"]]
    assert isinstance(t2i.prompt[0], Audio) and t2i.prompt[1] == DRAW_WHAT_YOU_HEAR and t2i.info["caption"]


def test_build_dataset_writes_utterances_as_wav_files(tmp_path) -> None:
    summary = build_dataset(tmp_path, {"asr": 2, "spoken_qa": 1, "t2i": 1}, seed=3, progress=False)
    assert summary["utterances"] == 3 and summary["images"] == 2
    docs = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    paths = [p["path"] for d in docs for m in d["messages"] for p in m["content"] if p["type"] == "speech"]
    assert len(paths) == 3 and all(p.startswith("audio/train-") for p in paths)
    assert all(len(read_audio(tmp_path / p)) > 16000 for p in paths)
