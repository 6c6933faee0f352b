"""Does a model grown through experts answer the old tasks exactly as the model it grew from?

    python recipes/grow/same_answers.py --grown runs/experts/run/final --out runs/experts/same.json

Both models run the evaluation's own requests for the old tasks (t2i, caption, qa, story, edit) with
every draw greedy (image temperature 0, one text-to-image candidate, story text at temperature 0), so
that the answers are functions of the logits alone; every generated token id is recorded and compared.
The evaluation proper samples, and its noise is drawn over the whole vocabulary, which the grown model
widened: a sampled score is a draw from the same distribution on another stream of noise, so it is
only equal in expectation. Greedy answers show whether the distributions are the same.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import tokenloom
from tokenloom import evaluation

OLD_TASKS = ("t2i", "caption", "qa", "story", "edit")
SHIPPED = Path(tokenloom.__file__).parent / "assets" / "shapes-tiny"


def greedy_answers(model_dir: Path, tasks, n: int) -> tuple[dict, dict]:
    """{task: [generated ids of each request]} and {task: score} of the greedy evaluation."""
    pipe = tokenloom.load(model_dir)
    pipe.config.image_sampling = {**pipe.config.image_sampling, "temperature": 0.0}
    pipe.config.image_candidates = 1
    engine, answers, scores = pipe.engine, {}, {}
    generate = engine.generate

    def recording(requests, *args, **kwargs):  # every draw of every task goes through here
        results = generate(requests, *args, **kwargs)
        answers[task].extend(r.ids for r in results)
        return results

    engine.generate = recording
    story = evaluation.STORY_TEXT_SAMPLING
    evaluation.STORY_TEXT_SAMPLING = {"temperature": 0.0}
    try:
        for task in tasks:
            answers[task] = []
            with tempfile.TemporaryDirectory() as out:
                scores[task] = evaluation.evaluate(pipe, out, n=n, tasks=(task,), progress=False)["scores"][task]
    finally:
        engine.generate, evaluation.STORY_TEXT_SAMPLING = generate, story
    return answers, scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grown", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=SHIPPED, help="the model it grew from (default: the shipped one)")
    ap.add_argument("--n", type=int, default=50, help="held-out samples of each task")
    ap.add_argument("--tasks", default=",".join(OLD_TASKS))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the comparison as JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tasks = tuple(a.tasks.split(","))
    runs = {}
    for name, model in (("base", a.base), ("grown", a.grown)):
        start = time.time()
        runs[name] = greedy_answers(model, tasks, a.n)
        print(f"{name}: {model} in {time.time() - start:.0f} s, greedy scores {runs[name][1]}", flush=True)
    (base, base_scores), (grown, grown_scores) = runs["base"], runs["grown"]
    report = {"n": a.n, "base": str(a.base), "grown": str(a.grown), "tasks": {}}
    for task in tasks:
        same = sum(x == y for x, y in zip(base[task], grown[task])) if len(base[task]) == len(grown[task]) else 0
        tokens = sum(map(len, base[task]))
        report["tasks"][task] = {"requests": len(base[task]), "identical": same, "tokens": tokens}
        print(f"{task}: {same}/{len(base[task])} answers identical ({tokens} tokens)")
    report["scores"] = {"base": base_scores, "grown": grown_scores}
    report["all_identical"] = all(t["identical"] == t["requests"] > 0 for t in report["tasks"].values())
    print("every answer identical" if report["all_identical"] else "answers differ")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["all_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
