"""shapes-tiny learns speech: render the world's texts with espeak-ng, train a speech codec on them, grow the
shipped model by the codec's codes, train it on the speech tasks mixed with replay of its old tasks, and
measure both.

    python recipes/speech/build.py --work runs/speech                # everything
    python recipes/speech/build.py --work runs/speech --only codec   # or corpus, base, data, eval-before, train, eval
    python recipes/speech/build.py --work runs/speech-smoke --smoke  # tiny sets, a few steps

1. corpus: `world.speech.render_corpus` of random world texts: WORK/corpus/train (training voices) and
   WORK/corpus/eval (the held-out voices m7 and f4 only);
2. codec: `tokenloom train-codec` of codec.yaml (written to WORK/codec.yaml) into WORK/codec; best/ is the codec;
3. base: `tokenloom add-modality --modality speech --codec WORK/codec/best` of the shipped model (read only)
   into WORK/base: the speech markers and 4 x 256 speech codes, their rows the mean of the old ones;
4. data: shapes-world sets drawn with seeds no other recipe used: WORK/data/speech (asr, tts, spoken_qa,
   speech_t2i), WORK/data/replay (the old tasks) and WORK/data/eval, pre-tokenized with the base (speech the
   model hears content-only, speech it says at every level);
5. train: speech.yaml (WORK/speech.yaml): half the rows from the speech set, half replay; WORK/speech/final;
6. eval-before / eval: the shipped model on the old tasks, the trained one on every task it can do;
7. with --install-to DIR: WORK/speech/final is copied there (a checkout's assets), as the others install.

Every step skips what is done and resumes what was interrupted: rerun the same command. Measured:
docs/speech.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from modality import SHIPPED, arguments, build_sets, evaluate_model, install_model, train_from  # noqa: E402
from modality import write_config as write_from  # noqa: E402

from tokenloom.convert import add_modality_dir  # noqa: E402

SPEECH_TASKS = ("asr", "tts", "spoken_qa", "speech_t2i")
OLD_TASKS = ("t2i", "caption", "qa", "story", "edit")
CORPUS = {"train": (61, 3000, False), "eval": (62, 200, True)}  # name: (seed, utterances, held-out voices)
SETS = {  # name: (seed, documents per task); seeds 0-62 went to earlier recipes and the corpus
    "speech": (63, {t: 2500 for t in SPEECH_TASKS}),
    "replay": (64, {"t2i": 8000, "caption": 3000, "qa": 6000, "story": 5000, "edit": 8000}),
    "eval": (65, {**{t: 30 for t in SPEECH_TASKS}, **{t: 20 for t in OLD_TASKS}}),
}
SMOKE_UTTERANCES = 24
STEPS = ("corpus", "codec", "base", "data", "eval-before", "train", "eval")


def build_corpus(work: Path, smoke: bool) -> None:
    from tokenloom.world.speech import render_corpus

    for name, (seed, n, held_out) in CORPUS.items():
        out = work / "corpus" / name
        if not (out / "manifest.jsonl").exists():
            render_corpus(out, SMOKE_UTTERANCES if smoke else n, seed=seed, held_out=held_out)


def write_codec_config(work: Path, smoke: bool) -> Path:
    config = yaml.safe_load((HERE / "codec.yaml").read_text())
    config["data"].update(train=["corpus/train/manifest.jsonl"], eval="corpus/eval/manifest.jsonl")
    if smoke:
        config["train"].update(steps=4, eval_every=2, checkpoint_every=2, log_every=1, eval_utterances=4,
                               eval_audio=1, warmup_steps=1, batch_size=2)
    path = work / "codec.yaml"
    path.write_text("# written from recipes/speech/codec.yaml by its build.py; paths are relative to this folder\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def train_codec(work: Path, smoke: bool, threads: int | None) -> Path:
    from tokenloom.cli import main

    best = work / "codec" / "best"
    if not (work / "codec" / "summary.json").exists() or not best.exists():
        argv = ["train-codec", str(write_codec_config(work, smoke)), "--out", str(work / "codec")]
        if main(argv + (["--threads", str(threads)] if threads else [])) != 0:
            raise SystemExit("train-codec failed")
    return best


def build_base(work: Path, source: Path = SHIPPED) -> Path:
    base = work / "base"
    if not (base / "config.json").exists():
        add_modality_dir(source, base, "speech", codec=work / "codec" / "best", overwrite=True)
    return base


def write_config(work: Path, smoke: bool) -> Path:
    return write_from(HERE / "speech.yaml", work, smoke)


def train_speech(work: Path, smoke: bool) -> dict:
    return train_from(HERE / "speech.yaml", work, "speech", smoke)


def main(argv=None) -> int:
    ap = arguments(__doc__, STEPS)
    ap.add_argument("--threads", type=int, default=None, help="threads of the codec's training")
    a = ap.parse_args(argv)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    n = 4 if a.smoke else a.n
    for step in [a.only] if a.only else STEPS:
        print(f"== {step}", flush=True)
        if step == "corpus":
            build_corpus(work, a.smoke)
        elif step == "codec":
            train_codec(work, a.smoke, a.threads)
        elif step == "base":
            build_base(work, a.base)
        elif step == "data":
            build_sets(work, SETS, a.smoke)
        elif step == "eval-before":
            evaluate_model(a.base, work / "eval-before", OLD_TASKS, n)
        elif step == "train":
            train_speech(work, a.smoke)
        else:
            evaluate_model(work / "speech" / "final", work / "eval", OLD_TASKS + SPEECH_TASKS, n)
    if a.install_to is not None:
        print(f"installed {install_model(work / 'speech' / 'final', a.install_to)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
