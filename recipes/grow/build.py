"""shapes-tiny grows video and speech at once, at the learning rate its last stage ended on, so that what it
has is kept: the shipped model grown by the video tokens and by the speech codec's codes, trained on the
video and speech tasks mixed with replay of its old tasks, measured on every task.

    python recipes/grow/build.py --work runs/grow                # everything
    python recipes/grow/build.py --work runs/grow --only train   # or corpus, codec, base, data, train, eval
    python recipes/grow/build.py --work runs/grow-smoke --smoke  # tiny sets, a few steps
    python recipes/grow/build.py --work runs/grow --experts      # the same, grown through experts
    python recipes/grow/build.py --work runs/grow --experts-rest # then the experts take the answers too
    python recipes/grow/build.py --work runs/grow --experts-head # then they get their own output head
    python recipes/grow/build.py --work runs/grow --experts-more # then more steps on fresh sets

The video recipe (lr 5e-4, 60:40) and the speech recipe (3e-4, 50:50) each cost the old tasks 1-9 points
(docs/video.md, docs/speech.md). shapes-tiny's last stage (recipes/shapes-tiny/stages.yaml, train-13) ran at
1e-4; this recipe trains the new modalities at that rate with half of every batch replaying the old tasks.

1. corpus, codec: the speech recipe's steps (same corpus seeds, same codec.yaml) into WORK/corpus, WORK/codec;
2. base: `tokenloom add-modality` of the shipped model (read only) by video, then by speech with the codec,
   into WORK/base (WORK/base-video is the step between);
3. data: sets drawn with seeds no other recipe used: WORK/data/video, WORK/data/speech, WORK/data/replay (the
   old tasks in train-13's proportions), WORK/data/eval (some of every task); pre-tokenized with the base;
4. train: grow.yaml (written to WORK/grow.yaml); WORK/grow/final is the model;
5. eval: `tokenloom.evaluation.evaluate` of the trained model on every task (WORK/eval/), and the shipped
   model on the old ones with --only eval-before (its model card's numbers, reproduced);
6. with --install-to DIR (a checkout's src/tokenloom/assets/shapes-tiny): WORK/grow/final is copied there.

--experts grows the model through experts instead (tokenloom.modalities; the same corpus, codec and sets,
in the same WORK): WORK/base-experts has expert projections for video and speech spans, experts.yaml
trains only them and the new rows on the video and speech sets (no replay: the old tasks cannot change),
into WORK/experts; the eval step writes WORK/eval-experts...; --install-to installs WORK/experts/final.
--experts-rest goes on from WORK/experts/final with expert_scope "rest" (WORK/base-experts-rest): the
experts compute from a video or speech begin marker to the end of the document, the answer included;
experts-rest.yaml trains it into WORK/experts-rest (eval: WORK/eval-experts-rest...).
--experts-head goes on from WORK/experts-rest/final with the experts' own final norm and output head
(WORK/base-experts-head; ModelConfig.expert_head), so that they can write words the image-text model never
wrote; experts-head.yaml trains it into WORK/experts-head.
--experts-more goes on from WORK/experts-head/final on fresh sets (MORE_SETS, drawn when the stage starts),
weighted to the speech tasks that answer in text; experts-more.yaml trains it into WORK/experts-more.

Every step skips what is done and resumes what was interrupted: rerun the same command. Measured:
docs/model-growth.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from modality import SHIPPED, arguments, build_sets, evaluate_model, install_model, train_from  # noqa: E402
from modality import write_config as write_from  # noqa: E402

import tokenloom  # noqa: E402
from tokenloom.convert import add_modality_dir  # noqa: E402


def _recipe(name: str):
    """recipes/NAME/build.py as a module of its own name (every recipe's script is called build.py)."""
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", HERE.parent / name / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


speech, video = _recipe("speech"), _recipe("video")
OLD_TASKS, VIDEO_TASKS, SPEECH_TASKS = video.OLD_TASKS, video.VIDEO_TASKS, speech.SPEECH_TASKS
SETS = {  # name: (seed, documents per task); seeds 0-65 went to earlier recipes and the speech corpus
    "video": (66, {t: 2000 for t in VIDEO_TASKS}),
    "speech": (67, {t: 2000 for t in SPEECH_TASKS}),
    "replay": (68, {"t2i": 8000, "caption": 3000, "qa": 6000, "story": 5000, "edit": 8000}),
    "eval": (69, {t: 16 for t in OLD_TASKS + VIDEO_TASKS + SPEECH_TASKS}),
}
# The experts-more stage's fresh sets: speech weighted to transcripts and spoken questions. The tasks are
# listed in the order the shipped run drew them: a set's document order depends on it.
_SPEECH_MORE = {"asr": 3000, "spoken_qa": 3000, "tts": 1000, "speech_t2i": 1000}
_VIDEO_MORE = {"video_caption": 500, "video_qa": 500, "t2v": 500, "next_frames": 500}
MORE_SETS = {
    "speech-more": (75, _SPEECH_MORE),
    "video-more": (76, _VIDEO_MORE),
    "eval-more": (77, {t: 16 for t in [*_SPEECH_MORE, *_VIDEO_MORE]}),
}
STEPS = ("corpus", "codec", "base", "data", "train", "eval")
EXTRA_STEPS = ("eval-before",)


def build_base(work: Path, source: Path = SHIPPED, experts: bool = False) -> Path:
    name = "base-experts" if experts else "base"
    base, between = work / name, work / f"{name}-video"
    if not (base / "config.json").exists():
        if not (between / "config.json").exists():
            add_modality_dir(source, between, "video", experts=experts, overwrite=True)
        add_modality_dir(between, base, "speech", codec=work / "codec" / "best", experts=experts, overwrite=True)
    return base


def rest_base(work: Path, smoke: bool = False) -> Path:
    """WORK/experts/final with expert_scope "rest": WORK/base-experts-rest."""
    base = work / "base-experts-rest"
    if not (base / "config.json").exists():
        pipe = tokenloom.load(work / "experts" / "final")
        pipe.model.config = dataclasses.replace(pipe.model.config, expert_scope="rest")
        pipe.save_pretrained(base)
    return base


def head_base(work: Path, smoke: bool = False) -> Path:
    """WORK/experts-rest/final with the experts' own final norm and output head (copies of the shared ones,
    ModelConfig.expert_head): WORK/base-experts-head."""
    base = work / "base-experts-head"
    if not (base / "config.json").exists():
        add_modality_dir(work / "experts-rest" / "final", base, "video", experts=True, expert_head=True,
                         overwrite=True)
    return base


def more_sets(work: Path, smoke: bool = False) -> None:
    """The experts-more stage trains its predecessor's model as it is; it needs only its own sets."""
    build_sets(work, MORE_SETS, smoke)


EXPERT_STAGES = {"experts": None, "experts-rest": rest_base, "experts-head": head_base,
                 "experts-more": more_sets}  # each from the last


def _template(stage: str) -> Path:
    return HERE / ("grow.yaml" if stage == "grow" else f"{stage}.yaml")


def write_config(work: Path, smoke: bool, stage: str = "grow") -> Path:
    return write_from(_template(stage), work, smoke)


def train_grown(work: Path, smoke: bool, stage: str = "grow") -> dict:
    """Train `stage` ("grow", or an expert stage: the expert stages before it first where not done)."""
    if stage == "grow":
        return train_from(_template(stage), work, stage, smoke)
    stages = list(EXPERT_STAGES)
    before = stages[stages.index(stage) - 1] if stage != stages[0] else None
    if before and not (work / before / "final" / "config.json").exists():
        train_grown(work, smoke, before)  # which trains the stages before it that are not done
    if EXPERT_STAGES[stage] is not None:
        EXPERT_STAGES[stage](work, smoke)  # what the stage needs first: its base, or its own sets
    return train_from(_template(stage), work, stage, smoke)


def main(argv=None) -> int:
    ap = arguments(__doc__, STEPS + EXTRA_STEPS)
    ap.add_argument("--tasks", help="comma-separated tasks of the eval step (default: every task)")
    ap.add_argument("--threads", type=int, default=None, help="threads of the codec's training")
    ap.add_argument("--experts", action="store_true",
                    help="grow through expert projections for video and speech spans (the old tasks stay exact)")
    ap.add_argument("--experts-rest", action="store_true",
                    help="--experts, then on with expert_scope 'rest': the experts write the answers too")
    ap.add_argument("--experts-head", action="store_true",
                    help="--experts-rest, then on with the experts' own final norm and output head")
    ap.add_argument("--experts-more", action="store_true",
                    help="--experts-head, then more steps on fresh sets weighted to transcripts and spoken questions")
    a = ap.parse_args(argv)
    run = ("experts-more" if a.experts_more else "experts-head" if a.experts_head
           else "experts-rest" if a.experts_rest else "experts" if a.experts else "grow")
    a.experts = run != "grow"
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    n = 4 if a.smoke else a.n
    tasks = tuple(a.tasks.split(",")) if a.tasks else OLD_TASKS + VIDEO_TASKS + SPEECH_TASKS
    for step in [a.only] if a.only else STEPS:
        print(f"== {step}", flush=True)
        if step == "corpus":
            speech.build_corpus(work, a.smoke)
        elif step == "codec":
            speech.train_codec(work, a.smoke, a.threads)
        elif step == "base":
            build_base(work, a.base, a.experts)
        elif step == "data":
            build_sets(work, SETS, a.smoke)
        elif step == "eval-before":
            evaluate_model(a.base, work / "eval-before", OLD_TASKS, n)
        elif step == "train":
            train_grown(work, a.smoke, run)
        else:
            out = "eval" + ("-" + run if a.experts else "") + ("-" + "-".join(tasks) if a.tasks else "")
            evaluate_model(work / run / "final", work / out, tasks, n)
    if a.install_to is not None:
        print(f"installed {install_model(work / run / 'final', a.install_to)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
