"""shapes-tiny learns video: grow the shipped model by the video tokens, train it on the shapes world's video
tasks mixed with replay of its old tasks, and measure both.

    python recipes/video/build.py --work runs/video                # everything (about 1.5 h on 2 CPU cores)
    python recipes/video/build.py --work runs/video --only train   # or base, data, eval-before, eval
    python recipes/video/build.py --work runs/video-smoke --smoke  # tiny sets, a few steps

1. base: `tokenloom add-modality` of the shipped model (read only) into WORK/base: two new ids,
   video_begin and video_end, their embedding and head rows the mean of the old ones;
2. data: shapes-world sets drawn with seeds no shapes-tiny stage used: WORK/data/video (t2v,
   video_caption, next_frames, video_qa), WORK/data/replay (the old tasks, in stage 13's proportions) and
   WORK/data/eval (some of each, for the eval loss); pre-tokenized with the base into WORK/shards/*;
3. train: video.yaml (written to WORK/video.yaml): 60% of rows from the video set, 40% from replay, loss
   logged per source; WORK/video/final is the model;
4. eval-before / eval: `tokenloom.evaluation.evaluate` of the shipped model on the old tasks and of the
   trained one on every task, WORK/eval-before/ and WORK/eval/ (report.json, summary.md, pictures);
5. with --install-to DIR (e.g. src/tokenloom/assets/shapes-tiny of a checkout): WORK/video/final is
   copied there, as the shapes-tiny recipe installs (never into an installed package).

Every step skips what is done and resumes what was interrupted: rerun the same command. Measured:
docs/video.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from modality import SHIPPED, arguments, build_sets, evaluate_model, install_model, train_from  # noqa: E402
from modality import write_config as write_from  # noqa: E402

from tokenloom.convert import add_modality_dir  # noqa: E402

VIDEO_TASKS = ("t2v", "video_caption", "next_frames", "video_qa")
OLD_TASKS = ("t2i", "caption", "qa", "story", "edit")
SETS = {  # name: (seed, documents per task); seeds 0-57 went to earlier recipes
    "video": (58, {t: 3000 for t in VIDEO_TASKS}),
    "replay": (59, {"t2i": 8000, "caption": 3000, "qa": 6000, "story": 5000, "edit": 8000}),
    "eval": (60, {**{t: 40 for t in VIDEO_TASKS}, **{t: 20 for t in OLD_TASKS}}),
}
STEPS = ("base", "data", "eval-before", "train", "eval")


def build_base(work: Path, source: Path = SHIPPED) -> Path:
    base = work / "base"
    if not (base / "config.json").exists():
        add_modality_dir(source, base, "video", overwrite=True)
    return base


def write_config(work: Path, smoke: bool) -> Path:
    return write_from(HERE / "video.yaml", work, smoke)


def train_video(work: Path, smoke: bool) -> dict:
    return train_from(HERE / "video.yaml", work, "video", smoke)


def main(argv=None) -> int:
    ap = arguments(__doc__, STEPS)
    a = ap.parse_args(argv)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    n = 4 if a.smoke else a.n
    steps = [a.only] if a.only else STEPS
    for step in steps:
        print(f"== {step}", flush=True)
        if step == "base":
            build_base(work, a.base)
        elif step == "data":
            build_sets(work, SETS, a.smoke)
        elif step == "eval-before":
            evaluate_model(a.base, work / "eval-before", OLD_TASKS, n)
        elif step == "train":
            train_video(work, a.smoke)
        else:
            evaluate_model(work / "video" / "final", work / "eval", OLD_TASKS + VIDEO_TASKS, n)
    if a.install_to is not None:
        print(f"installed {install_model(work / 'video' / 'final', a.install_to)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
