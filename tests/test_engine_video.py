"""The engine drawing videos on random weights: a video is `video_begin, size(F), F image spans of one
size, video_end` (tokenloom.formats), drawn in one cache next to text and images, guided and
speculated inside its frames as images are, and streamed frame by frame."""

import copy
import dataclasses

import numpy as np
import pytest
from test_speculative import run_counting
import torch

from tokenloom.document import Document, ImagePart, TextPart, VideoPart
from tokenloom.engine import (ContinuousBatcher, Finished, FrameDone, FrameRow, FrameStarted, GenerationRequest,
                              ImageDone, ImageRow, ImageStarted, SamplingParams, TextDelta, TurnEnd, VideoDone,
                              VideoStarted)
from tokenloom.engine.grammar import CODES, DONE, TEXT, Grammar, GrammarTables
from tokenloom.pipeline import Pipeline
from tokenloom.vocab import Vocabulary

GREEDY = SamplingParams(temperature=0.0)
WARM = SamplingParams(temperature=1.0, top_k=20)
WILD = SamplingParams(temperature=3.0)


# New native vocabularies (the random test pipelines') have the video tokens from the start; a model
# that lacks them gains them with tokenloom.modalities.add_modality.
@pytest.fixture(scope="module")
def vpipe(pipe):
    assert pipe.vocab.has_video
    return pipe


@pytest.fixture(scope="module")
def vflat(flat_pipe):
    assert flat_pipe.vocab.has_video
    return flat_pipe


@pytest.fixture(scope="module")
def novideo(pipe):
    """The same model and tokenizers over a vocabulary without the video roles (as the shipped models'
    vocabularies predate video): their ids are plain text ids there."""
    v = pipe.vocab
    specials = {r: i for r, i in v.specials.items() if r not in ("video_begin", "video_end")}
    vocab = Vocabulary(v.size, specials, v.code_ids, v.size_token_ids, size_unit=v.size_unit)
    return Pipeline(pipe.model, vocab, pipe.text_tokenizer, pipe.image_tokenizer, pipe.config)


@pytest.fixture(scope="module")
def fond(pipe):
    """A pipeline whose model likes to start videos: video_begin's output row is 1.05 times the row of
    the token greedy text decoding picks third, so a greedy answer in mode "any" writes a little text,
    then a video where that token would have come."""
    out = pipe.engine.generate([video_request(pipe, mode="text", max_new_tokens=3, text=GREEDY)])[0].ids
    model = copy.deepcopy(pipe.model)
    with torch.no_grad():
        model.output.weight[pipe.vocab.video_begin] = 1.05 * model.output.weight[out[2]]
    return Pipeline(model, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, pipe.config)


def prompt(p, text="a ball rolling"):
    return p.format.encode(Document.chat([("user", [text])]), generation_role="assistant").ids


def video_request(p, words="a ball rolling", **kw) -> GenerationRequest:
    kw = {"mode": "video", "max_new_tokens": 60, "text": GREEDY, "image": GREEDY, **kw}
    return GenerationRequest(prompt(p, words), **kw)


def guided(p, request, scale=3.0):
    return dataclasses.replace(request, guidance_scale=scale, uncond_prompt_ids=p.unconditional_prompt())


def jacobi(request, window=4, init="above"):
    return dataclasses.replace(request, speculative="jacobi", speculative_window=window, speculative_init=init)


def reference_greedy(p, request: GenerationRequest) -> list[int]:
    """Recompute everything from scratch at every step: a full forward over the prompt and every token so
    far, guidance by a separate full forward of the unconditional prompt and the span (image or video,
    its earlier frames included) so far, and the argmax over the tokens the grammar allows."""
    model, eng = p.model, p.engine
    grammar = Grammar(eng.tables, [request.mode], [request.image_size], [request.max_new_tokens], eng.device,
                      [request.video_frames])
    out: list[int] = []
    span_start = None
    with torch.no_grad():
        for _ in range(request.max_new_tokens):
            cond = model(torch.tensor([request.prompt_ids + out]))[0, -1]
            if request.guidance_scale != 1.0 and bool(grammar.in_codes()[0]):
                u = model(torch.tensor([request.uncond_prompt_ids + out[span_start:]]))[0, -1]
                cond = u + request.guidance_scale * (cond - u)
            token = int(cond.masked_fill(~grammar.allowed()[0], float("-inf")).argmax())
            flags = grammar.advance(torch.tensor([token]))
            if bool(flags["opened"][0]):
                span_start = len(out)
            out.append(token)
            if bool(grammar.done()[0]):
                break
    return out


def check_well_formed(p, request, result):
    """Strict decoding of the prompt and the answer succeeds and gives the engine's document; every video's
    frame count is its count token and its frames are one size (the request's, where it fixed one)."""
    assert len(result.ids) <= request.max_new_tokens
    decoded = p.format.decode(request.prompt_ids + result.ids, strict=True)
    assert decoded.turns[-1].parts == result.document.normalized().turns[0].parts
    v = p.vocab
    counts = [v.size_of_token(result.ids[i + 1]) for i, t in enumerate(result.ids) if t == v.video_begin]
    assert [video.num_frames for video in result.video_parts] == counts
    for video in result.video_parts:
        if request.video_frames is not None:
            assert video.num_frames == request.video_frames
        size = p.config.flat_grid if p.config.layout == "flat" else request.image_size
        if size is not None:
            assert (video.height, video.width) == tuple(size)
        assert len(video.pixels) == video.num_frames
        assert all(im.size == (video.width * p.factor, video.height * p.factor) for im in video.pixels)
    if request.mode == "video":
        assert len(result.video_parts) == 1 and result.document.parts == result.video_parts


# -- the grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["unirep", "flat"])
def test_the_grammar_takes_every_video_the_layout_writes(vpipe, vflat, layout):
    """Each token of encoded videos (and text and an image around them) is allowed where it comes, and the
    row ends in text with one video done; a budget one token short of a video never lets it begin."""
    p = vpipe if layout == "unirep" else vflat
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 4), (3, 4, 4), (5, 2, 3)] if layout == "unirep" else [(1, 4, 4), (4, 4, 4)]
    for f, h, w in shapes:
        video = VideoPart(rng.integers(0, p.vocab.codebook_size, (f, h, w)))
        ids = p.format.encode(Document.from_parts(["hi ", video, ImagePart(video.codes[0]), "bye"]),
                              add_bos=False, add_eos=False).ids
        for frames in (None, f):
            g = Grammar(p.engine.tables, ["any"], [None if layout == "unirep" else (h, w)], [len(ids)],
                        p.engine.device, [frames])
            for pos, token in enumerate(ids):
                assert bool(g.allowed()[0, token]), (f, h, w, pos, token)
                g.advance(torch.tensor([token]))
            assert int(g.state[0]) in (TEXT, DONE) and int(g.videos_done[0]) == 1 and int(g.images_done[0]) == 1
        need = p.engine.tables.video_length(f, h, w)
        tight = Grammar(p.engine.tables, ["video"], [(h, w)], [need - 1], p.engine.device, [f])
        assert not bool(tight.allowed()[0, p.vocab.video_begin])
        roomy = Grammar(p.engine.tables, ["video"], [(h, w)], [need], p.engine.device, [f])
        assert bool(roomy.allowed()[0, p.vocab.video_begin])


def greediest(p, mode, size, frames, budget) -> list[int]:
    """The tokens of a row whose every choice is the greediest the grammar allows: a video (else an image)
    whenever one may begin, the largest frame count and size offered, else the first token allowed."""
    t, v = p.engine.tables, p.vocab
    g = Grammar(t, [mode], [size], [budget], p.engine.device, [frames])
    size_of = t.size_value.tolist()
    ids = []
    while not bool(g.done()[0]):
        allowed = g.allowed()[0].nonzero().squeeze(1).tolist()
        sizes = [x for x in allowed if size_of[x]]
        token = (v.video_begin if v.video_begin in allowed else v.image_begin if v.image_begin in allowed else
                 max(sizes, key=size_of.__getitem__) if sizes else allowed[0])
        g.advance(torch.tensor([token]))
        ids.append(token)
    return ids


@pytest.mark.parametrize("layout", ["unirep", "flat"])
def test_the_greediest_choices_still_close_every_video_in_its_budget(vpipe, vflat, layout):
    """Every budget from the smallest video's up: taking the largest count and sizes offered each time
    still closes every video (strict decoding) and never overruns the budget, and each budget is used
    to within one smallest frame: the grammar offers exactly what fits."""
    p = vpipe if layout == "unirep" else vflat
    t = p.engine.tables
    cases = [(None, None), (None, 2), ((1, 2), None), ((2, 1), 3)] if layout == "unirep" else [(None, None), (None, 2)]
    for size, frames in cases:
        h, w = size or t.flat_grid or (1, 1)
        least = t.video_length(frames or 1, h, w)
        for budget in range(least, least + 30):
            ids = greediest(p, "video", size, frames, budget)
            assert len(ids) <= budget
            (video,) = p.format.decode([p.vocab.role_id("assistant")] + ids, strict=True).videos
            assert frames is None or video.num_frames == frames
            assert ids[-1] == t.final_stop or len(ids) == budget
            if frames is None and size is not None:  # the count fills the budget
                assert budget - len(ids) < t.image_length(h, w) + 1
        for budget in range(1, 60, 3):  # in mode "any" too: videos, images and text around them
            ids = greediest(p, "any", size, frames, budget)
            assert len(ids) <= budget
            p.format.decode([p.vocab.role_id("assistant")] + ids, strict=True)


def test_select_and_concat_carry_the_video_state(vpipe):
    t = vpipe.engine.tables
    a = Grammar(t, ["video", "text"], [(2, 2), None], [40, 40], vpipe.engine.device, [3, None])
    for token in (t.video_begin, int(t.size_ids[2]), t.image_begin):  # into the first frame
        a.advance(torch.tensor([token, vpipe.vocab.text_mask.nonzero()[0, 0].item()]))
    b = Grammar(t, ["any"], [None], [40], vpipe.engine.device)
    both = a.concat(b).select(torch.tensor([2, 0]))
    assert both.in_video.tolist() == [False, True] and both.frames.tolist()[1] == 3
    assert both.fixed_f.tolist() == [0, 3] and both.max_videos.tolist()[1] == 1
    assert torch.equal(both.allowed()[1], a.allowed()[0])


# -- well formed whatever the weights --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["unirep", "flat"])
def test_random_weight_fuzz_videos_always_well_formed(vpipe, vflat, layout):
    """Hot sampling over many seeds, modes "video" and "any", fixed and free frame counts and sizes, tight
    and loose budgets: every answer decodes strictly, and its videos are what their count tokens say."""
    p = vpipe if layout == "unirep" else vflat
    rng = np.random.default_rng(1)
    sizes = [None, (2, 3), (1, 1)] if layout == "unirep" else [None]
    reqs = []
    for i in range(48):
        size, frames = sizes[i % len(sizes)], (None, None, 1, 3)[i % 4]
        mode = ("video", "any")[i % 2]
        fits = p.engine.tables.video_length(frames or 1, *(size or p.config.flat_grid or (1, 1)))
        low = fits if mode == "video" or frames else 2  # a count asked for must fit (a ValueError otherwise)
        reqs.append(GenerationRequest(prompt(p, f"clip {i}"), mode=mode, image_size=size, video_frames=frames,
                                      max_new_tokens=int(rng.integers(low, low + 90)), text=WILD, image=WILD, seed=i))
    results = p.engine.generate(reqs)
    for req, res in zip(reqs, results):
        check_well_formed(p, req, res)
    videos = [len(r.video_parts) for r in results]
    assert all(videos[0::2]) and sum(videos[1::2]) > 0, "mode 'any' should have started some videos too"
    assert len({v.num_frames for r in results for v in r.video_parts}) > 2, "free counts should vary"


def test_modes_image_and_text_never_start_a_video(fond):
    """Even with a model that likes video_begin: modes "text" and "image" never emit it, nor "any" with
    modalities that leave video out (a story on a model grown by video); "any" does."""
    v = fond.vocab
    for mode, size, modalities in (("text", None, None), ("image", (2, 2), None), ("any", (2, 2), None),
                                   ("any", (2, 2), ("text", "image")), ("any", (2, 2), ("video",))):
        reqs = [GenerationRequest(prompt(fond, f"x {s}"), mode=mode, image_size=size, max_new_tokens=40, text=WARM,
                                  image=WARM, seed=s, modalities=modalities) for s in range(16)]
        results = fond.engine.generate(reqs)
        started = [v.video_begin in r.ids for r in results]
        assert any(started) if mode == "any" and modalities != ("text", "image") else not any(started), mode
        if modalities == ("text", "image"):
            assert any(v.image_begin in r.ids for r in results), "images stay allowed"


# -- the same tokens as recomputation from scratch ---------------------------------------------------


@pytest.mark.parametrize("case", ["fixed", "free count", "free size", "guided", "flat guided"])
def test_greedy_video_equals_recomputation(vpipe, vflat, case):
    p, kw = vpipe, {}
    if case == "fixed":
        kw = dict(image_size=(2, 3), video_frames=3)
    elif case == "free count":
        kw = dict(image_size=(2, 2))
    elif case == "free size":
        kw = dict(video_frames=2)
    elif case == "guided":
        kw = dict(image_size=(2, 2), video_frames=3, guidance_scale=3.0, uncond_prompt_ids=vpipe.unconditional_prompt())
    else:
        p = vflat
        kw = dict(video_frames=2, guidance_scale=3.0, uncond_prompt_ids=vflat.unconditional_prompt())
    req = video_request(p, **kw)
    got = p.engine.generate([req])[0]
    assert got.ids == reference_greedy(p, req)
    check_well_formed(p, req, got)
    # A video (its count and frame sizes too) samples with the image settings: hot text settings change nothing.
    assert p.engine.generate([dataclasses.replace(req, text=WILD, seed=0)])[0].ids == got.ids
    if case in ("guided", "flat guided"):
        plain = p.engine.generate([dataclasses.replace(req, guidance_scale=1.0)])[0]
        assert plain.ids != got.ids, "guidance at scale 3 should change a random model's greedy video"


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_text_then_video_equals_recomputation(fond, guidance):
    """Mode "any": text, then a video, then on: the cache carries across the switches, and guidance
    restarts at the video and follows it over its frames."""
    req = guided(fond, video_request(fond, mode="any", image_size=(2, 2), max_new_tokens=70), guidance)
    got = fond.engine.generate([req])[0]
    assert got.ids == reference_greedy(fond, req)
    kinds = [type(part) for part in got.document.parts]
    assert kinds[:2] == [TextPart, VideoPart], kinds


# -- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_batch_of_video_image_and_text_rows_equals_each_row_alone(vpipe, fond, sampling):
    s = GREEDY if sampling == "greedy" else WARM
    common = dict(text=s, image=s, seed=None if sampling == "greedy" else 4)
    uncond = vpipe.unconditional_prompt()
    reqs = [
        video_request(vpipe, "a ball", image_size=(2, 2), video_frames=3, **common),
        video_request(vpipe, "a cat", max_new_tokens=50, guidance_scale=2.0, uncond_prompt_ids=uncond, **common),
        GenerationRequest(prompt(vpipe, "a square"), mode="image", image_size=(3, 3), max_new_tokens=30,
                          guidance_scale=2.0, uncond_prompt_ids=uncond, **common),
        GenerationRequest(prompt(vpipe, "hello"), mode="text", max_new_tokens=15, **common),
        jacobi(video_request(vpipe, "a dog", image_size=(3, 3), video_frames=2, **common), 5),
    ]
    batched = vpipe.engine.generate(reqs)
    for req, res in zip(reqs, batched):
        assert res.ids == vpipe.engine.generate([req])[0].ids
    assert [len(r.video_parts) for r in batched] == [1, 1, 0, 0, 1]
    # Text, then a video, in one row of a batch (a model that likes videos) equals it alone too.
    mixed = [guided(fond, video_request(fond, mode="any", image_size=(2, 2), max_new_tokens=70, **common)),
             video_request(fond, "a dog", video_frames=2, **common)]
    for req, res in zip(mixed, fond.engine.generate(mixed)):
        assert res.ids == fond.engine.generate([req])[0].ids


def test_a_video_joining_a_running_batch_equals_it_alone(vpipe):
    """Continuous batching: a video request that joins mid-way, while another video is in its frames."""
    first = guided(vpipe, video_request(vpipe, "a ball", image_size=(2, 2), video_frames=4, image=WARM, seed=1))
    late = video_request(vpipe, "a cat", image_size=(2, 3), video_frames=2, image=WARM, seed=2)
    batcher = ContinuousBatcher(vpipe.engine, max_batch=2)
    results = {}
    ids = [batcher.add(first)]
    for step in range(200):
        if step == 9:
            ids.append(batcher.add(late))
        for ev in batcher.step():
            if isinstance(ev, Finished):
                results[ev.row] = ev.result
        if not batcher.has_work():
            break
    for rid, req in zip(ids, (first, late)):
        assert results[rid].ids == vpipe.engine.generate([req])[0].ids


# -- speculative decoding inside frames -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["unirep", "flat"])
@pytest.mark.parametrize("window,init", [(1, "random"), (3, "above"), (16, "random"), (16, "above")])
def test_greedy_speculative_video_equals_plain(vpipe, vflat, layout, window, init):
    p = vpipe if layout == "unirep" else vflat
    size = (3, 3) if layout == "unirep" else None
    for scale in (1.0, 3.0):
        plain = guided(p, video_request(p, image_size=size, video_frames=3, max_new_tokens=80), scale)
        (want,), plain_steps = run_counting(p.engine, [plain])
        (got,), steps = run_counting(p.engine, [jacobi(plain, window, init)])
        assert got.ids == want.ids and got.video_parts == want.video_parts
        assert steps <= plain_steps
        if window > 1 and layout == "unirep":  # forced end-of-lines at least are always accepted
            assert steps < plain_steps


def test_speculative_sampled_videos_stay_well_formed(vpipe, vflat):
    for p in (vpipe, vflat):
        size = (2, 3) if p is vpipe else None
        reqs = [jacobi(video_request(p, f"clip {s}", image_size=size, video_frames=(None, 2)[s % 2],
                                     max_new_tokens=90, image=SamplingParams(temperature=1.5), seed=s),
                       1 + s % 9, ("random", "above")[s % 2]) for s in range(10)]
        for req, res in zip(reqs, p.engine.generate(reqs)):
            check_well_formed(p, req, res)
            assert res.finish_reason == "stop" or len(res.ids) == req.max_new_tokens


def test_above_drafts_copy_the_frame_before(vpipe):
    """In a video's later frames, "above" drafts the previous frame's codes (the end-of-lines forced): the
    first window of frame 2 is frame 1, up to the window's length."""
    req = jacobi(video_request(vpipe, image_size=(3, 3), video_frames=2, image=WARM, seed=3), 10, "above")
    batcher = ContinuousBatcher(vpipe.engine, max_batch=1)
    batcher.add(req)
    g = None
    while g is None or not (int(g.frame[0]) == 1 and int(g.state[0]) == CODES):
        batcher.step()
        g = batcher._grammar
    run = batcher._running[0]
    assert run.output.codes == [] and len(run.output.frames) == 1
    before = vpipe.vocab.codes_to_ids(run.output.frames[0].codes)
    rows = np.concatenate([before, np.full((3, 1), vpipe.vocab.end_of_line)], axis=1)
    assert run.drafts == rows.ravel().tolist()[:10]
    results = []
    while batcher.has_work():
        results += [ev.result for ev in batcher.step() if isinstance(ev, Finished)]
    check_well_formed(vpipe, req, results[0])


# -- streaming -----------------------------------------------------------------------------------


def replay(events, p, decode=True):
    """Rebuild the answer from its events, checking their order and counts: a video streams VideoStarted,
    then each frame's FrameStarted, one FrameRow per code row, FrameDone (codes = its rows, its PIL
    image), then VideoDone (its frames' codes and images). Returns the parts and the Finished result."""
    parts, text, video, frame, rows, final = [], "", None, None, [], None
    for ev in events:
        assert final is None, "nothing comes after Finished"
        if isinstance(ev, TextDelta):
            assert video is None
            text += ev.text
        elif isinstance(ev, (ImageStarted, ImageRow, ImageDone)):
            assert video is None, "a video's frames are not images"
            if isinstance(ev, ImageStarted):
                parts += [TextPart(text)] if text else []
                text = ""
            elif isinstance(ev, ImageDone):
                parts.append(ImagePart(ev.codes))
        elif isinstance(ev, VideoStarted):
            assert video is None
            parts += [TextPart(text)] if text else []
            text, video = "", {"frames": ev.frames, "size": (ev.height, ev.width), "done": [], "images": []}
        elif isinstance(ev, FrameStarted):
            assert frame is None and ev.index == len(video["done"]) < video["frames"]
            frame, rows = ev.index, []
        elif isinstance(ev, FrameRow):
            assert (ev.frame, ev.index) == (frame, len(rows)) and ev.codes.shape == (video["size"][1],)
            rows.append(ev.codes)
        elif isinstance(ev, FrameDone):
            assert ev.index == frame and len(rows) == video["size"][0]
            assert np.array_equal(np.stack(rows), ev.codes)
            if decode:
                h, w = video["size"]
                assert ev.image.size == (w * p.factor, h * p.factor)
            else:
                assert ev.image is None
            video["done"].append(ev.codes)
            video["images"].append(ev.image)
            frame = None
        elif isinstance(ev, VideoDone):
            assert frame is None and len(video["done"]) == video["frames"]
            assert np.array_equal(ev.video.codes, np.stack(video["done"]))
            if decode:
                assert all(a is b for a, b in zip(ev.video.pixels, video["images"]))
            else:
                assert ev.video.pixels is None
            parts.append(ev.video)
            video = None
        elif isinstance(ev, TurnEnd):
            assert video is None
        elif isinstance(ev, Finished):
            final = ev.result
    assert video is None and final is not None
    parts += [TextPart(text)] if text else []
    assert Document.from_parts(parts, role="assistant") == final.document
    return parts, final


def test_stream_events_of_a_video(vpipe, vflat):
    for p, size in ((vpipe, (2, 3)), (vpipe, None), (vflat, None)):
        req = video_request(p, image_size=size, video_frames=3, max_new_tokens=80, image=WARM, seed=0)
        events = list(p.engine.stream([req]))
        kinds = [type(ev) for ev in events]
        h, w = p.engine.generate([req])[0].video_parts[0].codes.shape[1:]
        assert kinds == ([VideoStarted] + ([FrameStarted] + [FrameRow] * h + [FrameDone]) * 3 + [VideoDone, TurnEnd,
                                                                                               Finished])
        assert (events[0].frames, events[0].height, events[0].width) == (3, h, w)
        _, result = replay(events, p)
        assert result.videos[0] == [ev.image for ev in events if isinstance(ev, FrameDone)]
    # Codes only: frames and the video carry no pixels.
    req = video_request(vpipe, image_size=(2, 2), video_frames=2, decode_images=False)
    replay(vpipe.engine.stream([req]), vpipe, decode=False)


def test_stream_events_of_interleaved_answers(vpipe, fond):
    """Hot answers in mode "any" (text, images, videos) and their speculative versions rebuild into their
    documents, and a greedy speculative video streams the same events as plain decoding."""
    n_videos = 0
    for seed in range(8):
        req = video_request(vpipe, mode="any", image_size=(2, 2), max_new_tokens=80, text=WILD, image=WILD, seed=seed)
        for r in (req, jacobi(req, 4)):
            parts, _ = replay(vpipe.engine.stream([r]), vpipe)
            n_videos += sum(isinstance(q, VideoPart) for q in parts)
    assert n_videos > 0
    req = guided(fond, video_request(fond, mode="any", image_size=(3, 3), video_frames=2, max_new_tokens=80))

    def summary(events):
        return [(type(ev).__name__, getattr(ev, "index", None), getattr(ev, "text", None)) for ev in events]

    plain, spec = list(fond.engine.stream([req])), list(fond.engine.stream([jacobi(req, 5)]))
    assert summary(plain) == summary(spec) and VideoDone in map(type, plain)
    replay(spec, fond)


# -- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [0, -1, 65, 2.5, True, "3"])
def test_bad_frame_counts_are_refused(vpipe, frames):
    with pytest.raises(ValueError, match="video_frames"):
        vpipe.engine.generate([video_request(vpipe, video_frames=frames)])


def test_bad_video_requests_are_refused(vpipe, novideo):
    eng = vpipe.engine
    with pytest.raises(ValueError, match=r"3 frames of 4x4 needs 75 tokens, more than max_new_tokens=50"):
        eng.generate([video_request(vpipe, image_size=(4, 4), video_frames=3, max_new_tokens=50)])
    with pytest.raises(ValueError, match=r"one frame of 1x1 needs 9 tokens"):
        eng.generate([video_request(vpipe, max_new_tokens=8)])
    with pytest.raises(ValueError, match=r"request 1: a video of 2 frames"):  # mode "any" asking for a count too
        eng.generate([video_request(vpipe), video_request(vpipe, mode="any", video_frames=2, max_new_tokens=10)])
    with pytest.raises(ValueError, match=r"request 0: video_frames asks for video, which modalities=\['text'\]"):
        eng.generate([video_request(vpipe, mode="any", video_frames=2, modalities=("text",))])
    with pytest.raises(ValueError, match=r"mode 'video' asks for video, which modalities=\['image'\] leaves out"):
        eng.generate([video_request(vpipe, modalities=["image"])])
    for mode in ("image", "text"):
        with pytest.raises(ValueError, match="video_frames is for modes 'video' and 'any'"):
            eng.generate([video_request(vpipe, mode=mode, image_size=(2, 2), video_frames=2)])
    assert eng.tables.has_video and not novideo.engine.tables.has_video
    assert novideo.engine.tables.video_begin is None and novideo.engine.tables.video_end is None
    with pytest.raises(ValueError, match="mode 'video' needs a model whose vocabulary has video tokens"):
        novideo.engine.generate([video_request(novideo)])
    with pytest.raises(ValueError, match="video_frames needs a model whose vocabulary has video tokens"):
        novideo.engine.generate([video_request(novideo, mode="any", video_frames=2)])
    with pytest.raises(ValueError, match="mode 'video' needs"):
        Grammar(novideo.engine.tables, ["video"], [None], [50], novideo.engine.device)
    # Without video tokens mode "any" never starts one (their ids are text there, and text is all it writes).
    res = novideo.engine.generate([video_request(novideo, mode="any", max_new_tokens=60, text=WILD, image=WILD,
                                                 seed=s) for s in range(8)])
    assert not any(r.video_parts for r in res)


def test_tables_without_size_tokens_have_no_video(vpipe):
    """A frame count is a size token: a flat vocabulary without size tokens (Chameleon's) writes no video."""
    v = vpipe.vocab
    bare = Vocabulary(v.size, v.specials, v.code_ids, size_unit=1)
    t = GrammarTables.build(bare, "flat", (2, 2), vpipe.engine.device)
    assert not t.has_video and t.max_frames == 0
