"""The engine speaking on random weights: an utterance is `speech_begin, codes, speech_end` in the
format's speech layout (blocks: the content block, then one block per timbre level; interleaved: frame
by frame), kept well formed by the grammar, sampled with its own settings, guided, never speculated,
and streamed in chunks of frames."""

import copy
import dataclasses

import numpy as np
import pytest
from test_speculative import run_counting
import torch

from tokenloom.document import Document, ImagePart, SpeechPart, TextPart
from tokenloom.engine import (ContinuousBatcher, Finished, GenerationRequest, ImageDone, SamplingParams, SpeechChunk,
                              SpeechDone, SpeechStarted, TextDelta, TurnEnd, VideoDone, default_speech_sampling)
from tokenloom.engine.continuous import UNCOND
from tokenloom.engine.grammar import SPEECH, SPEECH_END, TEXT, DONE, Grammar
from tokenloom.pipeline import Pipeline, random_pipeline

GREEDY = SamplingParams(temperature=0.0)
WARM = SamplingParams(temperature=1.0, top_k=20)
WILD = SamplingParams(temperature=3.0)


@pytest.fixture(scope="module")
def ipipe():
    """The interleaved speech layout."""
    return random_pipeline(seed=3, hidden_size=64, num_layers=2, codebook_size=64, image_size=32, speech=(4, 32),
                           speech_layout="interleaved")


@pytest.fixture(scope="module")
def fond(speech_pipe):
    """A model that likes to speak: speech_begin's output row is 1.05 times the row of the token greedy text
    decoding picks third, so a greedy answer in mode "any" writes a little text, then an utterance."""
    p = speech_pipe
    out = p.engine.generate([speech_request(p, mode="text", max_new_tokens=3)])[0].ids
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        model.output.weight[p.vocab.speech_begin] = 1.05 * model.output.weight[out[2]]
    return Pipeline(model, p.vocab, p.text_tokenizer, p.image_tokenizer, p.config, p.speech_tokenizer)


def talkative(p, logit=18.0):
    """The pipeline with a model that opens utterances now and then wherever it writes hot text: speech_begin's
    output row is the mean final hidden state over a few prompts, scaled to give speech_begin a logit of
    about `logit` there (a random model's logits are about 0.2)."""
    states = []
    hook = p.model.output.register_forward_hook(lambda mod, inp, out: states.append(inp[0][0].detach()))
    with torch.no_grad():
        for i in range(4):
            p.model(torch.tensor([prompt(p, f"line {i} of a poem")]))
    hook.remove()
    mean = torch.cat(states).mean(0)
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        model.output.weight[p.vocab.speech_begin] = logit * mean / mean.norm() ** 2
    return Pipeline(model, p.vocab, p.text_tokenizer, p.image_tokenizer, p.config, p.speech_tokenizer)


@pytest.fixture(scope="module")
def wordy(speech_pipe):
    """A blocks-layout model that goes on with its content block: the random model's level-1 codes win
    the greedy choice after its first content code; here their output rows are scaled by 0.6."""
    p = speech_pipe
    model = copy.deepcopy(p.model)
    with torch.no_grad():
        model.output.weight[p.vocab.speech_level_mask(1)] *= 0.6
    return Pipeline(model, p.vocab, p.text_tokenizer, p.image_tokenizer, p.config, p.speech_tokenizer)


@pytest.fixture(scope="module")
def talkers(speech_pipe, ipipe):
    return {"blocks": talkative(speech_pipe), "interleaved": talkative(ipipe)}


def layout_pipe(speech_pipe, ipipe, layout):
    return speech_pipe if layout == "blocks" else ipipe


def prompt(p, text="say hello"):
    return p.format.encode(Document.chat([("user", [text])]), generation_role="assistant").ids


def speech_request(p, words="say hello", **kw) -> GenerationRequest:
    kw = {"mode": "speech", "max_new_tokens": 40, "text": GREEDY, "image": GREEDY, "speech": GREEDY, **kw}
    return GenerationRequest(prompt(p, words), **kw)


def guided(p, request, scale=3.0):
    return dataclasses.replace(request, guidance_scale=scale, uncond_prompt_ids=p.unconditional_prompt())


def jacobi(request, window=4, init="above"):
    return dataclasses.replace(request, speculative="jacobi", speculative_window=window, speculative_init=init)


def reference_greedy(p, request: GenerationRequest) -> list[int]:
    """Recompute everything from scratch at every step: a full forward over the prompt and every token so
    far, guidance (inside an image's codes and an utterance's) by a full forward of the unconditional
    prompt and the span so far, and the argmax over the tokens the grammar allows."""
    model, eng = p.model, p.engine
    grammar = Grammar(eng.tables, [request.mode], [request.image_size], [request.max_new_tokens], eng.device,
                      [request.video_frames], speech_levels=[request.speech_levels],
                      speech_frames=[request.speech_frames], max_speech_frames=[request.max_speech_frames])
    out: list[int] = []
    span_start = None
    with torch.no_grad():
        for _ in range(request.max_new_tokens):
            cond = model(torch.tensor([request.prompt_ids + out]))[0, -1]
            if request.guidance_scale != 1.0 and bool(grammar.in_codes()[0] | grammar.in_speech()[0]):
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


def spans(p, ids):
    """(start, end) of each utterance in ids: speech_begin's index and speech_end's (None if unclosed)."""
    v, out, start = p.vocab, [], None
    for i, t in enumerate(ids):
        if t == v.speech_begin:
            start = i
        elif t == v.speech_end and start is not None:
            out.append((start, i))
            start = None
    return out + ([(start, None)] if start is not None else [])


def check_well_formed(p, request, result, audio=True):
    """Strict decoding of the prompt and the answer succeeds and gives the engine's document; every
    utterance is closed, re-encodes to exactly its ids (so its blocks or frames have the layout's shape and
    each code its level), has the request's levels (and frame count, where fixed), and its audio."""
    assert len(result.ids) <= request.max_new_tokens
    assert result.finish_reason == "stop" or len(result.ids) == request.max_new_tokens
    decoded = p.format.decode(request.prompt_ids + result.ids, strict=True)
    assert decoded.turns[-1].parts == result.document.normalized().turns[0].parts
    found = spans(p, result.ids)
    assert len(found) == len(result.speech_parts) and all(end is not None for _, end in found)
    levels = request.speech_levels or p.vocab.speech_codebooks
    for (start, end), part in zip(found, result.speech_parts):
        assert result.ids[start:end + 1] == p.format.speech_ids(part.codes)
        assert part.levels == levels
        assert part.num_frames == request.speech_frames or (request.speech_frames is None and
                                                            part.num_frames <= request.max_speech_frames)
        if audio:
            spf = p.speech_tokenizer.config.samples_per_frame
            assert part.audio.dtype == np.float32 and part.audio.shape == (part.num_frames * spf,)
    if request.mode == "speech":
        assert len(result.speech_parts) == 1 and result.document.parts == result.speech_parts


# -- the grammar -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_the_grammar_takes_every_utterance_the_layout_writes(speech_pipe, ipipe, layout):
    """Each token of encoded utterances (text and an image around them) is allowed where it comes, and
    inside one nothing but speech codes of the one level the layout puts there (and speech_end or the next
    block's level where the model chooses); a budget one token short never lets an utterance begin."""
    p = layout_pipe(speech_pipe, ipipe, layout)
    t, v = p.engine.tables, p.vocab
    rng = np.random.default_rng(0)
    speech_or_end = v.speech_mask.clone()
    speech_or_end[v.speech_end] = True
    for levels in (1, 2, 4):
        for frames in (1, 3):
            part = SpeechPart(rng.integers(0, v.speech_codebook_size, (levels, frames)))
            ids = p.format.encode(Document.from_parts(["hi ", part, ImagePart(np.zeros((2, 2), np.int64)), "bye"]),
                                  add_bos=False, add_eos=False).ids
            begin = ids.index(v.speech_begin)
            for fixed in (None, frames):
                g = Grammar(t, ["any"], [None], [len(ids)], p.engine.device, speech_levels=[levels],
                            speech_frames=[fixed])
                for pos, token in enumerate(ids):
                    allowed = g.allowed()[0]
                    assert bool(allowed[token]), (levels, frames, fixed, pos)
                    if begin < pos <= begin + levels * frames:  # inside: one level, or the block's end
                        assert not bool((allowed & ~speech_or_end).any())
                        got = {int(x) for x in v.ids_to_speech(allowed.nonzero()[:, 0])[0] if x >= 0}
                        want, _ = v.ids_to_speech(torch.tensor([token]))
                        assert int(want) in got and len(got) <= 2 and max(got) - min(got) <= 1
                    g.advance(torch.tensor([token]))
                assert int(g.state[0]) in (TEXT, DONE) and int(g.speeches_done[0]) == 1
            need = t.speech_length(levels, frames)
            tight = Grammar(t, ["speech"], [None], [need - 1], p.engine.device, speech_levels=[levels],
                            speech_frames=[frames])
            assert not bool(tight.allowed()[0, v.speech_begin])
            roomy = Grammar(t, ["speech"], [None], [need], p.engine.device, speech_levels=[levels],
                            speech_frames=[frames])
            assert bool(roomy.allowed()[0, v.speech_begin])
    # Modes "text", "image" and "video" never open an utterance.
    g = Grammar(t, ["text", "image", "video", "speech"], [None, (2, 2), (2, 2), None], [50] * 4, p.engine.device)
    assert g.allowed()[:, v.speech_begin].tolist() == [False, False, False, True]


def walk(p, mode, levels, frames, budget, policy, rng=None, cap=None) -> list[int]:
    """The tokens of a row choosing by `policy`: "longest" (an utterance whenever one may begin, then a
    content code whenever one is allowed, else the first token allowed) or "random" (uniform over what
    the grammar allows)."""
    t, v = p.engine.tables, p.vocab
    g = Grammar(t, [mode], [None], [budget], p.engine.device, speech_levels=[levels], speech_frames=[frames],
                max_speech_frames=[cap])
    content = v.speech_level_mask(0)
    ids = []
    while not bool(g.done()[0]):
        allowed = g.allowed()[0]
        options = allowed.nonzero()[:, 0].tolist()
        if policy == "random":
            token = options[int(rng.integers(len(options)))]
        elif bool(allowed[v.speech_begin]):
            token = v.speech_begin
        else:
            extend = (allowed & content).nonzero()[:, 0].tolist()
            token = extend[0] if extend else options[0]
        g.advance(torch.tensor([token]))
        ids.append(token)
    return ids


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_an_utterance_once_begun_always_closes_within_its_budget(speech_pipe, ipipe, layout):
    """Every budget from the smallest utterance's up: taking the longest content the grammar offers closes
    the utterance (strict decoding) without overrunning the budget, and the budget is used to within one
    frame (the grammar offers exactly what fits); random walks over everything allowed (text, images,
    videos, utterances) in small budgets stay well formed too."""
    p = layout_pipe(speech_pipe, ipipe, layout)
    role = [p.vocab.role_id("assistant")]
    for levels in (1, 2, 3, 4):
        for frames, cap in ((None, None), (None, 5), (2, None)):
            least = p.engine.tables.speech_length(levels, frames or 1)
            for budget in range(least, least + 3 * levels + 8):
                ids = walk(p, "speech", levels, frames, budget, "longest", cap=cap)
                assert len(ids) <= budget
                (part,) = p.format.decode(role + ids, strict=True).speech
                assert part.levels == levels
                (start, end), = spans(p, ids)
                assert end is not None and ids[end + 1:] in ([], [p.engine.tables.final_stop])
                if frames is not None:
                    assert part.num_frames == frames
                elif part.num_frames != cap:  # the content filled the budget
                    assert 0 <= budget - (end + 1) < levels
    rng = np.random.default_rng(0)
    for i in range(40):
        levels, frames = 1 + i % 4, (None, None, 1, 3)[i % 4]
        for budget in (3, 8, 17, 40):
            ids = walk(p, ("any", "speech")[i % 2], levels, frames, budget, "random", rng)
            assert len(ids) <= budget
            doc = p.format.decode(role + ids, strict=True)
            assert all(s.levels == levels and (frames is None or s.num_frames == frames) for s in doc.speech)
            assert all(end is not None for _, end in spans(p, ids))


def test_select_and_concat_carry_the_speech_state(ipipe):
    t, v = ipipe.engine.tables, ipipe.vocab
    text = int(v.text_mask.nonzero()[0, 0])
    a = Grammar(t, ["speech", "text"], [None, None], [40, 40], ipipe.engine.device, speech_levels=[3, None],
                speech_frames=[4, None])
    first = v.speech_codes_to_ids(np.array([[5], [6]]))[:, 0].tolist()
    for token in [v.speech_begin] + first:  # the first frame's first two levels
        a.advance(torch.tensor([token, text]))
    b = Grammar(t, ["any"], [None], [40], ipipe.engine.device)
    both = a.concat(b).select(torch.tensor([2, 0]))
    assert both.state.tolist() == [TEXT, SPEECH] and both.sp_level.tolist()[1] == 2 and both.sp_t.tolist()[1] == 1
    assert both.sp_levels.tolist() == [4, 3] and both.sp_fixed.tolist() == [0, 4]
    assert both.max_speeches.tolist()[1] == 1 and torch.equal(both.allowed()[1], a.allowed()[0])
    assert torch.equal(both.allowed()[1], v.speech_level_mask(2))


# -- well formed whatever the weights --------------------------------------------------------------


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_random_weight_fuzz_utterances_always_well_formed(talkers, layout):
    """Hot sampling over many seeds, modes "speech" and "any" (a model that likes to speak), levels 1..4,
    fixed and free frame counts, tight and loose budgets: every answer decodes strictly, each utterance
    closed and of its request's shape."""
    p = talkers[layout]
    rng = np.random.default_rng(1)
    reqs = []
    for i in range(32):
        levels, frames = (None, 1, 2, 3, 4)[i % 5], (None, None, 1, 3)[i % 4]
        mode = ("speech", "any")[i % 2]
        fits = p.engine.tables.speech_length(levels or 4, frames or 1)
        low = fits if mode == "speech" or frames else 2
        reqs.append(GenerationRequest(prompt(p, f"line {i}"), mode=mode, speech_levels=levels, speech_frames=frames,
                                      max_new_tokens=int(rng.integers(low, low + (8, 60)[i % 3 > 0])),
                                      max_speech_frames=(6, 1500)[i % 3 > 0], text=WILD, image=WILD,
                                      speech=WILD, seed=i))
    results = p.engine.generate(reqs)
    for req, res in zip(reqs, results):
        check_well_formed(p, req, res)
    spoken = [len(r.speech_parts) for r in results]
    assert all(spoken[0::2]), "mode 'speech' always speaks"
    assert sum(map(bool, spoken[1::2])) > 4, "mode 'any' should have spoken too"
    assert len({s.num_frames for r in results for s in r.speech_parts}) > 2, "free lengths should vary"


def test_modes_text_and_image_never_speak(talkers):
    """Even with a model that likes speech_begin: modes "text" and "image" never emit it, nor "any" with
    modalities that leave speech out (in a batch beside rows that may); "any" does."""
    fond = talkers["blocks"]
    v = fond.vocab
    quiet = ("text", "image")
    for mode, size, modalities in (("text", None, None), ("image", (2, 2), None), ("any", (2, 2), None),
                                   ("any", (2, 2), quiet), ("any", (2, 2), ("text", "image", "speech"))):
        reqs = [GenerationRequest(prompt(fond, f"x {s}"), mode=mode, image_size=size, max_new_tokens=30, text=WARM,
                                  image=WARM, speech=WARM, seed=s, modalities=modalities) for s in range(4)]
        started = [v.speech_begin in r.ids for r in fond.engine.generate(reqs)]
        assert any(started) if mode == "any" and modalities != quiet else not any(started), (mode, modalities)
    mixed = [GenerationRequest(prompt(fond, f"x {s}"), max_new_tokens=30, text=WARM, speech=WARM, seed=s,
                               modalities=None if s % 2 else quiet) for s in range(8)]
    started = [v.speech_begin in r.ids for r in fond.engine.generate(mixed)]
    assert not any(started[0::2]) and any(started[1::2])


# -- the same tokens as recomputation from scratch ---------------------------------------------------


CASES = {
    "free": {},
    "fixed": dict(speech_frames=5),
    "content only": dict(speech_levels=1, max_speech_frames=12),
    "two levels, fixed": dict(speech_levels=2, speech_frames=4),
    "guided": dict(guidance_scale=3.0),
    # The guidance interval is an image's: an utterance is guided on every code all the same.
    "guided, interval": dict(speech_frames=4, guidance_scale=3.0, guidance_interval=(0.5, 1.0)),
}


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_speech_equals_recomputation(wordy, ipipe, layout, case):
    p = layout_pipe(wordy, ipipe, layout)
    kw = dict(CASES[case])
    if "guidance_scale" in kw:
        kw["uncond_prompt_ids"] = p.unconditional_prompt()
    req = speech_request(p, **kw)
    got = p.engine.generate([req])[0]
    assert got.ids == reference_greedy(p, req)
    check_well_formed(p, req, got)
    # An utterance samples with the speech settings: hot text and image settings change nothing.
    assert p.engine.generate([dataclasses.replace(req, text=WILD, image=WILD, seed=0)])[0].ids == got.ids
    if "guidance_scale" in kw:
        plain = p.engine.generate([dataclasses.replace(req, guidance_scale=1.0)])[0]
        assert plain.ids != got.ids, "guidance at scale 3 should change a random model's greedy speech"
    if case == "free":  # the model ends the utterance (the budget does too, at 9 frames of 4 levels)
        assert got.speech_parts[0].num_frames > 2


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_text_then_speech_equals_recomputation(fond, guidance):
    """Mode "any": text, then an utterance, then on: the cache carries across the switches, and guidance
    restarts at speech_begin."""
    req = guided(fond, speech_request(fond, mode="any", max_new_tokens=45, speech_frames=4), guidance)
    got = fond.engine.generate([req])[0]
    assert got.ids == reference_greedy(fond, req)
    kinds = [type(part) for part in got.document.parts]
    assert kinds[:2] == [TextPart, SpeechPart], kinds
    check_well_formed(fond, req, got)


def test_guidance_rows_restart_at_speech_begin(fond):
    """The step that emits speech_begin moves the unconditional row back to its own context: it then sees
    its prompt and the utterance only."""
    req = guided(fond, speech_request(fond, mode="any", max_new_tokens=30, speech_frames=3))
    batcher = ContinuousBatcher(fond.engine, max_batch=1)
    batcher.add(req)
    uncond_len = len(req.uncond_prompt_ids)
    seen_begin = 0
    while batcher.has_work():
        batcher.step()
        if not batcher.running:
            break
        run = batcher._running[0]
        if fond.vocab.speech_begin in run.output.ids:
            seen_begin += 1
            row = int((batcher._kind == UNCOND).nonzero()[0, 0])
            ids, v = run.output.ids, fond.vocab
            begin = ids.index(v.speech_begin)
            span = (ids.index(v.speech_end, begin) + 1 if v.speech_end in ids[begin:] else len(ids)) - begin
            # It has seen its prompt and the span's tokens (speech_begin to speech_end), no text around them.
            assert int(batcher._next_pos[row]) == uncond_len + span
            assert int(batcher._key_mask_full[row].sum()) == uncond_len + span
    assert seen_begin > 0


# -- sampling ------------------------------------------------------------------------------------


def test_speech_sampling_settings(speech_pipe):
    p = speech_pipe
    assert default_speech_sampling(1024) == SamplingParams(temperature=1.0, top_k=64)
    assert p.sampling("speech") == default_speech_sampling(32)
    p.config.speech_sampling = {"temperature": 0.8}
    try:
        assert p.sampling("speech", top_k=5) == SamplingParams(temperature=0.8, top_k=5)
    finally:
        p.config.speech_sampling = {}
    req = speech_request(p, speech=None, speech_frames=6, seed=5)
    # No speech settings: the defaults for the vocabulary's codebooks.
    assert p.engine.generate([req])[0].ids == p.engine.generate(
        [dataclasses.replace(req, speech=default_speech_sampling(32))])[0].ids
    hot = p.engine.generate([dataclasses.replace(req, speech=WILD)])[0].ids
    assert hot != p.engine.generate([dataclasses.replace(req, speech=GREEDY)])[0].ids


# -- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_batch_of_speech_image_and_text_rows_equals_each_row_alone(speech_pipe, ipipe, fond, sampling):
    s = GREEDY if sampling == "greedy" else WARM
    common = dict(text=s, image=s, speech=s, seed=None if sampling == "greedy" else 4)
    for p in (speech_pipe, ipipe):
        uncond = p.unconditional_prompt()
        reqs = [
            speech_request(p, "one", **common),
            speech_request(p, "two", speech_levels=2, speech_frames=5, guidance_scale=2.0, uncond_prompt_ids=uncond,
                           **common),
            GenerationRequest(prompt(p, "a square"), mode="image", image_size=(3, 3), max_new_tokens=30,
                              guidance_scale=2.0, uncond_prompt_ids=uncond, **common),
            GenerationRequest(prompt(p, "hello"), mode="text", max_new_tokens=15, **common),
            jacobi(GenerationRequest(prompt(p, "a dog"), mode="image", image_size=(3, 3), max_new_tokens=20,
                                     **common), 5),
            speech_request(p, "three", speech_levels=1, max_new_tokens=20, **common),
        ]
        batched = p.engine.generate(reqs)
        for req, res in zip(reqs, batched):
            assert res.ids == p.engine.generate([req])[0].ids
        assert [len(r.speech_parts) for r in batched] == [1, 1, 0, 0, 0, 1]
    # Text, then an utterance, in one guided row of a batch (a model that likes speech) equals it alone too.
    mixed = [guided(fond, speech_request(fond, mode="any", max_new_tokens=40, **common)),
             speech_request(fond, "a dog", speech_frames=3, **common)]
    for req, res in zip(mixed, fond.engine.generate(mixed)):
        assert res.ids == fond.engine.generate([req])[0].ids


def test_speech_joining_a_running_batch_equals_it_alone(ipipe):
    """Continuous batching: an utterance that joins mid-way, while another is being spoken."""
    first = guided(ipipe, speech_request(ipipe, "one", speech_frames=6, speech=WARM, seed=1))
    late = speech_request(ipipe, "two", speech_levels=3, speech=WARM, seed=2)
    batcher = ContinuousBatcher(ipipe.engine, max_batch=2)
    results = {}
    ids = [batcher.add(first)]
    for step in range(200):
        if step == 7:
            ids.append(batcher.add(late))
        for ev in batcher.step():
            if isinstance(ev, Finished):
                results[ev.row] = ev.result
        if not batcher.has_work():
            break
    for rid, req in zip(ids, (first, late)):
        assert results[rid].ids == ipipe.engine.generate([req])[0].ids


# -- speculative decoding stays in images --------------------------------------------------------


def test_speculative_windows_never_run_inside_speech(fond):
    """A speculative request in mode "any" that speaks drafts nothing inside its utterance, and gives the
    plain request's tokens; speculative image rows next to speech rows do too."""
    req = jacobi(speech_request(fond, mode="any", image_size=(2, 2), max_new_tokens=60), 6)
    batcher = ContinuousBatcher(fond.engine, max_batch=1)
    batcher.add(req)
    states, results = set(), []
    while batcher.has_work():
        results += [ev.result for ev in batcher.step() if isinstance(ev, Finished)]
        if batcher.running:
            state = int(batcher._grammar.state[0])
            states.add(state)
            if state in (SPEECH, SPEECH_END):
                assert batcher._running[0].drafts == [] and len(batcher._running[0].feed) == 1
    assert SPEECH in states
    assert results[0].ids == fond.engine.generate([dataclasses.replace(req, speculative=None)])[0].ids
    for s in (GREEDY, WARM):
        reqs = [speech_request(fond, "one", speech=s, image=s, seed=3),
                jacobi(GenerationRequest(prompt(fond, "a cat"), mode="image", image_size=(3, 3), max_new_tokens=20,
                                         image=s, seed=4), 4),
                jacobi(speech_request(fond, "two", speech_frames=4, speech=s, seed=5), 8)]
        (*got,), steps = run_counting(fond.engine, reqs)
        (*want,), plain_steps = run_counting(fond.engine, [dataclasses.replace(r, speculative=None) for r in reqs])
        # Sampled speculative images follow plain decoding's distribution, not its tokens; speech rows (a
        # speculative one too: it never drafts) and greedy images give exactly the plain tokens.
        same = [0, 1, 2] if s is GREEDY else [0, 2]
        assert [got[i].ids for i in same] == [want[i].ids for i in same]
        if s is GREEDY:
            assert steps <= plain_steps


# -- streaming -----------------------------------------------------------------------------------


def replay(events, p, audio=True):
    """Rebuild the answer from its events, checking them: an utterance streams SpeechStarted(levels), chunks
    whose frames follow each other from 0 (their audio, concatenated, as long as the utterance), SpeechDone
    whose codes are the chunks' and whose audio is the whole utterance decoded. Returns the parts and the
    Finished result."""
    parts, text, speech, final = [], "", None, None
    spf = p.speech_tokenizer.config.samples_per_frame
    for ev in events:
        assert final is None, "nothing comes after Finished"
        if isinstance(ev, TextDelta):
            assert speech is None
            text += ev.text
        elif isinstance(ev, SpeechStarted):
            assert speech is None
            parts += [TextPart(text)] if text else []
            text, speech = "", {"levels": ev.levels, "chunks": [], "samples": 0}
        elif isinstance(ev, SpeechChunk):
            done = sum(c.shape[1] for c in speech["chunks"])
            assert ev.start_frame == done and ev.codes.shape[0] == speech["levels"]
            assert ev.codes.shape[1] >= 1 or speech["chunks"]  # a frameless chunk flushes what others held back
            if audio:
                assert ev.audio.dtype == np.float32 and ev.audio.ndim == 1 and ev.audio.size % spf == 0
                speech["samples"] += ev.audio.size
            else:
                assert ev.audio is None
            speech["chunks"].append(ev.codes)
        elif isinstance(ev, SpeechDone):
            assert np.array_equal(ev.speech.codes, np.concatenate(speech["chunks"], axis=1))
            if audio:
                want = p.speech_tokenizer.decode(ev.speech.codes)
                assert np.array_equal(ev.speech.audio, want)
                assert speech["samples"] == ev.speech.num_frames * spf  # the chunks' audio: the utterance's length
            else:
                assert ev.speech.audio is None
            parts.append(ev.speech)
            speech = None
        elif isinstance(ev, (ImageDone, VideoDone)):
            parts += [TextPart(text)] if text else []
            text = ""
            parts.append(ImagePart(ev.codes) if isinstance(ev, ImageDone) else ev.video)
        elif isinstance(ev, Finished):
            final = ev.result
    assert speech is None and final is not None
    parts += [TextPart(text)] if text else []
    assert Document.from_parts(parts, role="assistant") == final.document
    return parts, final


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_stream_events_of_an_utterance(speech_pipe, ipipe, layout):
    """Chunks of 3 frames (the last of the rest) as frames complete: in the blocks layout while the last block
    is written, in the interleaved one as frames end."""
    p = layout_pipe(speech_pipe, ipipe, layout)
    req = speech_request(p, speech_frames=7, speech_chunk_frames=3, speech=WARM, seed=0)
    batcher = ContinuousBatcher(p.engine, max_batch=1)
    batcher.add(req)
    events, at = [], []
    step = 0
    while batcher.has_work():
        for ev in batcher.step():
            events.append(ev)
            at.append(step)
        step += 1
    kinds = [type(ev) for ev in events]
    assert kinds == [SpeechStarted] + [SpeechChunk] * 3 + [SpeechDone, TurnEnd, Finished]
    assert events[0].levels == 4
    chunks = [ev for ev in events if isinstance(ev, SpeechChunk)]
    assert [(c.start_frame, c.codes.shape[1]) for c in chunks] == [(0, 3), (3, 3), (6, 1)]
    # Step 0 emits speech_begin; code k of the body comes at step k + 1; speech_end at step 29.
    steps = [a for a, ev in zip(at, events) if isinstance(ev, SpeechChunk)]
    if layout == "blocks":  # frame f is complete at the last block's code f: step 3 * 7 + f + 1
        assert steps == [24, 27, 29]
    else:  # frame f is complete at its last level: step 4 * f + 4
        assert steps == [12, 24, 29]
    _, result = replay(events, p)
    assert result.speech_parts[0].codes.shape == (4, 7)
    assert np.array_equal(result.speech_audio[0], events[-3].speech.audio)


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_stream_events_of_interleaved_answers(talkers, layout):
    """Hot answers in mode "any" (text, images, videos, utterances) and their speculative versions rebuild
    into their documents."""
    p, n = talkers[layout], 0
    for seed in range(4):
        req = speech_request(p, f"line {seed}", mode="any", image_size=(2, 2), max_new_tokens=50,
                             speech_chunk_frames=1 + seed % 4,
                             text=WILD, image=WILD, speech=WILD, seed=seed)
        for r in (req, jacobi(req)):
            parts, _ = replay(p.engine.stream([r]), p)
            n += sum(isinstance(q, SpeechPart) for q in parts)
    assert n > 0


def test_without_a_speech_tokenizer_codes_come_and_audio_does_not(speech_pipe):
    p = speech_pipe
    mute = Pipeline(p.model, p.vocab, p.text_tokenizer, p.image_tokenizer, p.config)
    assert mute.speech_tokenizer is None and mute.engine.speech_tokenizer is None
    req = speech_request(p, speech_frames=5, speech_chunk_frames=2, speech=WARM, seed=1)
    with_audio = p.engine.generate([req])[0]
    _, without = replay(mute.engine.stream([req]), p, audio=False)
    assert without.ids == with_audio.ids and without.speech_parts == with_audio.speech_parts
    assert without.speech_audio == [None] and with_audio.speech_audio[0] is not None
    check_well_formed(p, req, without, audio=False)


# -- bad requests --------------------------------------------------------------------------------


def test_bad_speech_requests_are_refused(speech_pipe, pipe):
    eng = speech_pipe.engine
    assert eng.tables.has_speech and not pipe.engine.tables.has_speech
    with pytest.raises(ValueError, match=r"request 0: mode 'speech' needs a model whose vocabulary has speech tokens"):
        pipe.engine.generate([speech_request(pipe)])
    with pytest.raises(ValueError, match=r"request 1: speech_levels needs a model whose vocabulary has speech"):
        pipe.engine.generate([speech_request(pipe, mode="text"), speech_request(pipe, mode="any", speech_levels=1)])
    with pytest.raises(ValueError, match="speech_frames needs"):
        pipe.engine.generate([speech_request(pipe, mode="any", speech_frames=3)])
    with pytest.raises(ValueError, match="mode 'speech' needs"):
        Grammar(pipe.engine.tables, ["speech"], [None], [50], pipe.engine.device)
    for levels in (0, 5, 2.5, True):
        with pytest.raises(ValueError, match="speech_levels"):
            eng.generate([speech_request(speech_pipe, speech_levels=levels)])
    for frames in (0, -1, 1501, 2.5, "3"):
        with pytest.raises(ValueError, match="speech_frames"):
            eng.generate([speech_request(speech_pipe, speech_frames=frames)])
    for name, value in (("max_speech_frames", 0), ("max_speech_frames", 1501), ("speech_chunk_frames", 0)):
        with pytest.raises(ValueError, match=name):
            eng.generate([speech_request(speech_pipe, **{name: value})])
    for mode in ("image", "text", "video"):
        with pytest.raises(ValueError, match="speech_frames is for modes 'speech' and 'any'"):
            eng.generate([speech_request(speech_pipe, mode=mode, image_size=(2, 2), speech_frames=2)])
    with pytest.raises(ValueError, match=r"an utterance of 3 frames at 4 levels needs 14 tokens, more than "
                                         r"max_new_tokens=13"):
        eng.generate([speech_request(speech_pipe, speech_frames=3, max_new_tokens=13)])
    with pytest.raises(ValueError, match=r"an utterance of one frame at 2 levels needs 4 tokens"):
        eng.generate([speech_request(speech_pipe, speech_levels=2, max_new_tokens=3)])
    quiet = ("text", "image")
    with pytest.raises(ValueError, match=r"request 0: mode 'speech' asks for speech, which modalities="
                                         r"\['text', 'image'\] leaves out"):
        eng.generate([speech_request(speech_pipe, modalities=quiet)])
    with pytest.raises(ValueError, match="speech_frames asks for speech, which modalities"):
        eng.generate([speech_request(speech_pipe, mode="any", speech_frames=2, modalities=quiet)])
    with pytest.raises(ValueError, match="modalities must be a list of names"):
        eng.generate([speech_request(speech_pipe, mode="any", modalities="text")])
    with pytest.raises(ValueError, match=r"unknown modalities \['audio'\]"):
        eng.generate([speech_request(speech_pipe, mode="any", modalities=("text", "audio"))])
    # Without speech tokens mode "any" never speaks (there is nothing to speak with).
    res = pipe.engine.generate([speech_request(pipe, mode="any", text=WILD, seed=s) for s in range(3)])
    assert not any(r.speech_parts for r in res)
