"""The generation engine on random weights: grammar, cache, guidance, batching, streaming, bad input."""

import numpy as np
import pytest
import torch

from tokenloom.document import Document, ImagePart, TextPart
from tokenloom.engine import (Finished, GenerationRequest, ImageDone, ImageRow, ImageStarted,
                              SamplingParams, TextDelta, TurnEnd, VideoDone, VideoStarted)
from tokenloom.engine.grammar import Grammar

GREEDY = SamplingParams(temperature=0.0)
HOT = SamplingParams(temperature=1.5)


def prompt(pipe, text="a red circle"):
    return pipe.format.encode(Document.chat([("user", [text])]), generation_role="assistant").ids


def reference_greedy(pipe, request: GenerationRequest) -> list[int]:
    """Recompute everything from scratch at every step: no cache, guidance by separate forwards."""
    model, eng = pipe.model, pipe.engine
    grammar = Grammar(eng.tables, [request.mode], [request.image_size], [request.max_new_tokens], eng.device)
    out: list[int] = []
    image_start = None
    with torch.no_grad():
        for _ in range(request.max_new_tokens):
            cond = model(torch.tensor([request.prompt_ids + out]))[0, -1]
            if request.guidance_scale != 1.0 and bool(grammar.in_codes()[0]):
                u_ids = request.uncond_prompt_ids + out[image_start:]
                u = model(torch.tensor([u_ids]))[0, -1]
                cond = u + request.guidance_scale * (cond - u)
            logits = cond.masked_fill(~grammar.allowed()[0], float("-inf"))
            token = int(logits.argmax())
            flags = grammar.advance(torch.tensor([token]))
            if bool(flags["started"][0]):
                image_start = len(out)
            out.append(token)
            if bool(grammar.done()[0]):
                break
    return out


def test_cached_decoding_equals_recomputation(pipe):
    req = GenerationRequest(prompt(pipe), mode="any", image_size=(4, 4), max_new_tokens=40, text=GREEDY, image=GREEDY)
    got = pipe.engine.generate([req])[0].ids
    assert got == reference_greedy(pipe, req)


def test_guided_image_equals_separate_forwards(pipe):
    req = GenerationRequest(prompt(pipe), mode="image", image_size=(4, 4), max_new_tokens=30, image=GREEDY,
                            guidance_scale=3.0, uncond_prompt_ids=pipe.unconditional_prompt())
    got = pipe.engine.generate([req])[0].ids
    assert got == reference_greedy(pipe, req)
    unguided = pipe.engine.generate([GenerationRequest(**{**req.__dict__, "guidance_scale": 1.0})])[0].ids
    assert got != unguided, "guidance at scale 3 should change a random model's greedy image"


def test_guidance_scale_one_equals_unguided(pipe):
    base = dict(prompt_ids=prompt(pipe), mode="image", image_size=(4, 4), max_new_tokens=30, image=HOT, seed=5)
    plain = pipe.engine.generate([GenerationRequest(**base)])[0]
    scaled = pipe.engine.generate([GenerationRequest(**base, guidance_scale=1.0,
                                                     uncond_prompt_ids=pipe.unconditional_prompt())])[0]
    assert plain.ids == scaled.ids


@pytest.mark.parametrize("layout", ["unirep", "flat"])
def test_random_weight_fuzz_images_always_well_formed(pipe, flat_pipe, layout):
    p = pipe if layout == "unirep" else flat_pipe
    wild = SamplingParams(temperature=3.0)
    # Free sizes (unirep), tight budgets, high temperature: the grammar alone keeps images whole.
    # A random model rarely picks image begin by itself, so half the rows must draw ("image" mode).
    reqs = [GenerationRequest(prompt(p, f"scene {i}"), mode=("any", "image")[i % 2], image_size=None,
                              max_new_tokens=int(n), text=wild, image=wild, seed=i)
            for i, n in enumerate(np.random.default_rng(0).integers(20, 90, size=24))]
    results = p.engine.generate(reqs)
    n_images = 0
    for req, res in zip(reqs, results):
        assert len(res.ids) <= req.max_new_tokens
        decoded = p.format.decode(req.prompt_ids + res.ids, strict=True)  # raises on any malformed image
        images = [q for q in res.document.parts if isinstance(q, ImagePart)]
        assert decoded.turns[-1].parts == res.document.normalized().turns[0].parts
        for im in images:
            if layout == "flat":
                assert im.codes.shape == p.config.flat_grid
            assert im.pixels is not None and im.pixels.size == (im.width * p.factor, im.height * p.factor)
        n_images += len(images)
    assert n_images > 0, "the fuzz should have produced some images"


def test_padding_rows_past_the_vocabulary_are_never_sampled(pipe):
    # Checkpoints often pad the embedding to a multiple of 64/128: those rows have logits but no
    # meaning. Make them the most likely tokens; the engine must still only emit vocabulary ids.
    from tokenloom.model import Transformer
    from tokenloom.pipeline import Pipeline

    cfg = pipe.model.config
    padded = Transformer.random(type(cfg)(**{**cfg.__dict__, "vocab_size": pipe.vocab.size + 7}), seed=0).eval()
    req = GenerationRequest(prompt(pipe), mode="any", image_size=(4, 4), max_new_tokens=30, text=HOT, image=HOT,
                            seed=3)
    with torch.no_grad():
        favourite = int(pipe.model(torch.tensor([req.prompt_ids]))[0, -1].argmax())
    state = dict(pipe.model.state_dict())
    for k, v in padded.state_dict().items():
        if v.shape != state[k].shape:  # embedding / head: the real rows, then 10x the favourite's row
            state[k] = torch.cat([state[k], 10 * state[k][favourite].expand(7, -1)])
    padded.load_state_dict(state)
    p = Pipeline(padded, pipe.vocab, pipe.text_tokenizer, pipe.image_tokenizer, pipe.config)
    ids = p.engine.generate([req])[0].ids
    assert ids and max(ids) < pipe.vocab.size
    with torch.no_grad():  # the padding rows do dominate the raw logits
        assert p.model(torch.tensor([req.prompt_ids]))[0, -1].argmax() >= pipe.vocab.size


def test_mixed_batch_rows_equal_solo_runs(pipe):
    common = dict(text=GREEDY, image=GREEDY)
    reqs = [
        GenerationRequest(prompt(pipe, "hello"), mode="text", max_new_tokens=12, **common),
        GenerationRequest(prompt(pipe, "a big red square please"), mode="image", image_size=(4, 4),
                          max_new_tokens=30, guidance_scale=2.0, uncond_prompt_ids=pipe.unconditional_prompt(),
                          **common),
        GenerationRequest(prompt(pipe, "tell a story"), mode="any", image_size=(2, 4), max_new_tokens=50, **common),
        GenerationRequest(prompt(pipe, "x"), mode="any", image_size=None, max_new_tokens=20,
                          text=SamplingParams(temperature=1.0), image=SamplingParams(temperature=1.0), seed=3),
    ]
    batched = pipe.engine.generate(reqs)
    for req, res in zip(reqs, batched):
        solo = pipe.engine.generate([req])[0]
        assert res.ids == solo.ids


def test_stream_events_reassemble_into_document(pipe):
    req = GenerationRequest(prompt(pipe), mode="any", image_size=(2, 4), max_new_tokens=60,
                            text=SamplingParams(temperature=1.2), image=SamplingParams(temperature=1.2), seed=11)
    for seed in range(6):
        req.seed = seed
        parts, text, rows, final = [], "", [], None
        for ev in pipe.engine.stream([req]):
            if isinstance(ev, TextDelta):
                text += ev.text
            elif isinstance(ev, ImageStarted):
                if text:
                    parts.append(TextPart(text))
                text, rows, size = "", [], (ev.height, ev.width)
            elif isinstance(ev, VideoStarted):  # the random pipeline's vocabulary has video tokens
                if text:
                    parts.append(TextPart(text))
                text = ""
            elif isinstance(ev, VideoDone):  # its frames' events: tests/test_engine_video.py
                parts.append(ev.video)
            elif isinstance(ev, ImageRow):
                assert ev.index == len(rows)
                rows.append(ev.codes)
            elif isinstance(ev, ImageDone):
                assert np.array_equal(np.stack(rows), ev.codes) and ev.codes.shape == size
                parts.append(ImagePart(ev.codes))
            elif isinstance(ev, Finished):
                final = ev.result
        if text:
            parts.append(TextPart(text))
        assert final is not None
        assert Document.from_parts(parts, role="assistant") == final.document
        decoded = pipe.format.decode(req.prompt_ids + final.ids, strict=final.finish_reason == "stop")
        assert final.document.normalized().turns[0].parts == decoded.normalized().turns[-1].parts


def test_turn_end_event_and_stop(pipe):
    req = GenerationRequest(prompt(pipe), mode="image", image_size=(2, 2), max_new_tokens=20, image=HOT, seed=0)
    events = list(pipe.engine.stream([req]))
    assert isinstance(events[-2], TurnEnd) and isinstance(events[-1], Finished)
    assert events[-1].result.finish_reason == "stop"
    assert events[-1].result.ids[-1] == pipe.vocab.turn_end


def test_per_row_seeds(pipe):
    base = dict(prompt_ids=prompt(pipe), mode="text", max_new_tokens=10, text=SamplingParams(temperature=1.0))
    a, b, c = pipe.engine.generate([GenerationRequest(**base, seed=1), GenerationRequest(**base, seed=2),
                                    GenerationRequest(**base, seed=1)])
    assert a.ids == c.ids and a.ids != b.ids


def test_text_mode_never_draws_and_image_mode_only_draws(pipe):
    wild = SamplingParams(temperature=3.0)
    text = pipe.engine.generate([GenerationRequest(prompt(pipe), mode="text", max_new_tokens=40, text=wild,
                                                   seed=s) for s in range(8)])
    assert all(not r.document.images for r in text)
    img = pipe.engine.generate([GenerationRequest(prompt(pipe), mode="image", image_size=(2, 2), max_new_tokens=20,
                                                  image=wild, seed=s) for s in range(4)])
    for r in img:
        assert len(r.document.images) == 1 and r.document.text == ""


def test_three_way_guidance_runs_and_differs(pipe):
    img = pipe.encode_image(pipe.generate_images("x", seed=0)[0])
    full = pipe.format.encode(Document.chat([("user", [img, "make it blue"])]), generation_role="assistant").ids
    image_only = pipe.format.encode(Document.chat([("user", [img])]), generation_role="assistant").ids
    base = dict(prompt_ids=full, mode="image", image_size=(4, 4), max_new_tokens=30, image=GREEDY)
    plain = pipe.engine.generate([GenerationRequest(**base)])[0]
    three = pipe.engine.generate([GenerationRequest(**base, guidance_scale=2.0, image_guidance_scale=1.5,
                                                    image_cond_prompt_ids=image_only,
                                                    uncond_prompt_ids=pipe.unconditional_prompt())])[0]
    assert len(three.document.images) == 1 and three.ids != plain.ids


def test_bad_input_errors(pipe, tmp_path):
    eng = pipe.engine
    with pytest.raises(ValueError, match="exceeds the model's context"):
        eng.generate([GenerationRequest([pipe.vocab.bos] * 5000, max_new_tokens=10)])
    with pytest.raises(ValueError, match="empty prompt"):
        eng.generate([GenerationRequest([], max_new_tokens=10)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([GenerationRequest([10**6], max_new_tokens=10)])
    with pytest.raises(ValueError, match="unknown generation mode"):
        eng.generate([GenerationRequest(prompt(pipe), mode="audio", max_new_tokens=10)])
    with pytest.raises(ValueError, match="multiple"):
        pipe.generate_images("x", width=36, height=32)
    with pytest.raises(ValueError):
        pipe.generate_images("x", width=100000, height=32)
    with pytest.raises(ValueError, match="needs"):
        eng.generate([GenerationRequest(prompt(pipe), mode="image", image_size=(4, 4), max_new_tokens=5)])
    for scale in (0.5, 21.0, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be in"):
            eng.generate([GenerationRequest(prompt(pipe), mode="image", image_size=(2, 2), max_new_tokens=20,
                                            guidance_scale=scale, uncond_prompt_ids=pipe.unconditional_prompt())])
    with pytest.raises(ValueError, match="guidance_scale must be in"):
        pipe.generate_images("x", width=32, height=32, guidance_scale=1000.0)
    with pytest.raises(ValueError, match="missing.png"):
        pipe.chat("what is this?", images=[tmp_path / "missing.png"])
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.png"):
        pipe.caption(bad)


def _naive_filter(row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """One row, the textbook way: keep the k largest, then the smallest prefix with mass >= p."""
    out = row.clone()
    if k > 0:
        out[row < torch.sort(row, descending=True).values[k - 1]] = float("-inf")
    if p < 1.0:
        order = torch.sort(out, descending=True)
        probs = torch.softmax(order.values, -1)
        n = int(((probs.cumsum(-1) - probs) < p).sum().clamp(min=1))
        out[out < order.values[n - 1]] = float("-inf")
    return out


@pytest.mark.parametrize("ks, ps", [([5, 5, 5], [1.0] * 3), ([3, 0, 9], [1.0] * 3), ([4, 0, 7], [0.5, 0.9, 1.0])],
                         ids=["same-k", "mixed-k", "top-p"])
def test_filter_logits_matches_a_per_row_reference(ks, ps):
    from tokenloom.engine.sampling import filter_logits

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    logits[1, :10] = float("-inf")  # disallowed tokens, as the grammar leaves them
    got = filter_logits(logits, torch.tensor(ks), torch.tensor(ps))
    for i, (k, p) in enumerate(zip(ks, ps)):
        assert torch.equal(got[i], _naive_filter(logits[i], k, p)), i
