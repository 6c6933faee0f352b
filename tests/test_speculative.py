"""Speculative Jacobi decoding: lossless (the exact distribution of a small model's images, and greedy
decoding unchanged), the cache after rollback, per-row acceptance in a batch, interleaved output."""

import dataclasses
import itertools

import pytest
import torch

import tokenloom
from tokenloom.engine import ContinuousBatcher, Finished, GenerationRequest, SamplingParams
from tokenloom.engine.continuous import COND
from tokenloom.engine.sampling import probabilities
from tokenloom.pipeline import random_pipeline

GREEDY = SamplingParams(temperature=0.0)
WARM = SamplingParams(temperature=1.0, top_k=20)


def prompt(pipe, text="a red circle"):
    return pipe.chat_request(pipe.user_document(text)).prompt_ids


def image_request(pipe, image=GREEDY, **kw):
    kw.setdefault("guidance_scale", 3.0)
    return GenerationRequest(prompt(pipe, kw.pop("text", "a red circle")), mode="image", image_size=(4, 4),
                             max_new_tokens=pipe.format.image_length(4, 4) + 1, image=image,
                             uncond_prompt_ids=pipe.unconditional_prompt(), **kw)


def jacobi(request, window=4, init="random"):
    return dataclasses.replace(request, speculative="jacobi", speculative_window=window, speculative_init=init)


def run_counting(engine, requests):
    """Results of one batch and the number of forwards (steps) it took."""
    batcher = ContinuousBatcher(engine, max_batch=len(requests))
    ids = [batcher.add(r) for r in requests]
    results, steps = {}, 0
    while batcher.has_work():
        for event in batcher.step():
            if isinstance(event, Finished):
                results[event.row] = event.result
        steps += 1
    return [results[i] for i in ids], steps


@pytest.mark.parametrize("layout", ["unirep", "flat"])
@pytest.mark.parametrize("init", ["random", "above"])
@pytest.mark.parametrize("window", [1, 3, 16])
def test_greedy_speculative_decoding_gives_the_plain_codes(pipe, flat_pipe, layout, init, window):
    p = pipe if layout == "unirep" else flat_pipe
    for scale in (1.0, 3.0):
        plain = image_request(p, guidance_scale=scale)
        (want,), plain_steps = run_counting(p.engine, [plain])
        (got,), steps = run_counting(p.engine, [jacobi(plain, window, init)])
        assert got.ids == want.ids
        assert (got.image_parts[0].codes == want.image_parts[0].codes).all()
        assert steps <= plain_steps


def _exact_image_distribution(p, request, codes):
    """P(image) for every 2x2 grid over `codes` (the codebook has len(codes) entries), computed by
    full forwards of every sequence (no cache, no engine): guided logits u + s (c - u) at each code,
    the grammar's mask (codes only), then the image sampling's temperature and top-k."""
    t = p.engine.tables
    size = t.size_ids.tolist()
    head = [t.image_begin, size[1], size[1]]  # height 2, width 2 (size unit 1)
    grids = list(itertools.product(range(len(codes)), repeat=4))
    seqs, code_at = [], [3, 4, 6, 7]  # positions of the codes after head: c c eol c c eol
    for g in grids:
        c = [int(codes[i]) for i in g]
        seqs.append(head + [c[0], c[1], t.end_of_line, c[2], c[3], t.end_of_line])
    seqs = torch.tensor(seqs)
    with torch.no_grad():
        cond_in = torch.cat([torch.tensor(request.prompt_ids).expand(len(seqs), -1), seqs], 1)
        uncond_in = torch.cat([torch.tensor(request.uncond_prompt_ids).expand(len(seqs), -1), seqs], 1)
        c_logits = p.model(cond_in)[:, len(request.prompt_ids) - 1:-1].float()
        u_logits = p.model(uncond_in)[:, len(request.uncond_prompt_ids) - 1:-1].float()
    s = request.guidance_scale
    logp = torch.zeros(len(grids))
    for n, pos in enumerate(code_at):
        guided = u_logits[:, pos] + s * (c_logits[:, pos] - u_logits[:, pos])
        guided = guided.masked_fill(~t.code_mask, float("-inf"))
        k = request.image.top_k or 0
        probs = probabilities(guided, torch.full((len(grids),), request.image.temperature),
                              torch.full((len(grids),), k), torch.ones(len(grids)))
        target = torch.tensor([int(codes[g[n]]) for g in grids])
        logp += probs.gather(1, target[:, None]).squeeze(1).log()
    return {g: float(v) for g, v in zip(grids, logp.exp())}


def _chi_square_p_value(counts: dict, expected: dict, n: int) -> float:
    """Pearson's test of counts against the exact distribution, bins with under 5 expected pooled."""
    stat, dof, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for key, prob in expected.items():
        e, o = n * prob, counts.get(key, 0)
        if e < 5:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        dof += 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def test_speculative_sampling_follows_the_exact_distribution():
    """A 3-code model whose 2x2 images have 81 outcomes: 1500 draws with speculative decoding (windows
    of 2 and 6, both draft initialisations, so drafts are often rejected and the residual is drawn
    from) and 1500 plain draws each pass Pearson's test against the enumerated distribution at
    p > 1e-3. Power: the same test rejects the plain sampler at temperature 1.0 instead of 0.8 (below);
    a sampler that kept every draft, or drew after a rejection from p instead of the residual, is
    further off still."""
    p = random_pipeline(seed=3, hidden_size=32, num_layers=2, codebook_size=3, image_size=16)
    with torch.no_grad():
        p.model.output.weight.mul_(10.0)  # peaked distributions: a random model's are nearly uniform
    t = p.engine.tables
    base = GenerationRequest(prompt(p), mode="image", image_size=(2, 2), max_new_tokens=p.format.image_length(2, 2) + 1,
                             image=SamplingParams(temperature=0.8, top_k=2), guidance_scale=2.0,
                             uncond_prompt_ids=p.unconditional_prompt())
    exact = _exact_image_distribution(p, base, t.code_ids)
    assert max(exact.values()) < 0.5 and abs(sum(exact.values()) - 1) < 1e-4
    n = 1500

    def counts_of(make):
        results = p.engine.generate([make(dataclasses.replace(base, seed=i)) for i in range(n)])
        counts = {}
        for r in results:
            key = tuple(int(c) for c in r.image_parts[0].codes.reshape(-1))
            counts[key] = counts.get(key, 0) + 1
        return counts

    plain = counts_of(lambda r: r)
    assert _chi_square_p_value(plain, exact, n) > 1e-3
    for window, init in ((2, "random"), (6, "above")):
        spec = counts_of(lambda r: jacobi(r, window, init))
        assert _chi_square_p_value(spec, exact, n) > 1e-3, (window, init)
    # The test can fail: the plain sampler at another temperature is rejected.
    hot = GenerationRequest(**{**base.__dict__, "image": SamplingParams(temperature=1.0, top_k=2)})
    wrong = p.engine.generate([dataclasses.replace(hot, seed=i) for i in range(n)])
    wrong_counts = {}
    for r in wrong:
        key = tuple(int(c) for c in r.image_parts[0].codes.reshape(-1))
        wrong_counts[key] = wrong_counts.get(key, 0) + 1
    assert _chi_square_p_value(wrong_counts, exact, n) < 1e-3


def test_cache_after_rollback_equals_plain_decoding_of_the_accepted_tokens(pipe):
    """Mid-image, after steps that rejected drafts, the slots a row sees hold exactly the keys and values
    of a plain forward over its prompt and accepted tokens; rejected slots are hidden."""
    req = jacobi(image_request(pipe, image=WARM, seed=3, guidance_scale=1.0), window=5, init="random")
    batcher = ContinuousBatcher(pipe.engine, max_batch=1)
    batcher.add(req)
    for _ in range(6):
        batcher.step()
    run = batcher._running[0]
    emitted = run.output.ids
    assert 6 < len(emitted) < req.max_new_tokens, "the image should be under way"
    # The cache holds the prompt and every emitted token but the last (fed in the next forward with its
    # drafts), plus the drafts of the last forward that are not verified yet.
    row = (batcher._kind == COND).nonzero()[0, 0]
    visible = batcher._key_mask_full[row].nonzero().squeeze(1)
    committed = len(req.prompt_ids) + len(emitted)  # the last emitted token was fed with the drafts
    assert len(visible) == committed + len(run.drafts)
    with torch.no_grad():
        ids = torch.tensor([req.prompt_ids + emitted + run.drafts])
        cache = pipe.model.allocate_cache(1, ids.shape[1])
        pipe.model(ids, kv_cache=cache, cache_positions=torch.arange(ids.shape[1]))
    for layer in range(cache.num_layers):
        got = batcher._cache.k[layer][row][:, visible]
        torch.testing.assert_close(got, cache.k[layer][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batcher._cache.v[layer][row][:, visible], cache.v[layer][0], atol=1e-5, rtol=1e-5)


def test_rows_accepting_different_lengths_equal_their_rows_run_alone(pipe):
    """Per-row acceptance: sampled speculative requests of different windows and seeds, a plain image
    and a text-only request in one batch give what each gives alone, and the rows did accept different
    numbers of codes per step (their step counts alone differ)."""
    text = GenerationRequest(prompt(pipe, "hello"), mode="text", max_new_tokens=20, text=WARM, seed=8)
    requests = [jacobi(image_request(pipe, image=WARM, seed=1), 2), jacobi(image_request(pipe, image=WARM, seed=2), 7),
                jacobi(image_request(pipe, image=GREEDY, text="a blue square"), 16, "above"),
                image_request(pipe, image=WARM, seed=5), text]
    alone = [run_counting(pipe.engine, [r]) for r in requests]
    assert len({steps for _, steps in alone[:3]}) > 1
    together, _ = run_counting(pipe.engine, requests)
    for (want,), got in zip((a for a, _ in alone), together):
        assert got.ids == want.ids


def test_speculative_decoding_inside_interleaved_output_keeps_the_text():
    """The shipped model telling a story (text, images, text) greedily: the same tokens with and without
    speculative decoding, in fewer forwards."""
    p = tokenloom.load()
    req = p.chat_request(p.user_document("Tell a story."), mode="any", do_sample=False, image_size=(8, 8))
    req.max_new_tokens = 2 * p.format.image_length(8, 8) + 80
    (plain,), plain_steps = run_counting(p.engine, [req])
    assert len(plain.image_parts) >= 1 and plain.text.strip(), "the story should have text and an image"
    (spec,), steps = run_counting(p.engine, [jacobi(req, 16, "above")])
    assert spec.ids == plain.ids
    assert steps < plain_steps


def test_speculative_draws_stay_well_formed_under_random_weights(pipe, flat_pipe):
    for p in (pipe, flat_pipe):
        reqs = [jacobi(image_request(p, image=SamplingParams(temperature=1.5), seed=s), 1 + s % 9,
                       ("random", "above")[s % 2]) for s in range(12)]
        for r in p.engine.generate(reqs):
            (part,) = r.image_parts
            assert part.codes.shape == (4, 4)
            assert r.finish_reason == "stop"


@pytest.mark.parametrize("field,value", [("speculative", "medusa"), ("speculative_window", 0),
                                         ("speculative_window", 64), ("speculative_window", 2.5),
                                         ("speculative_init", "zeros")])
def test_bad_speculative_settings_are_refused(pipe, field, value):
    req = dataclasses.replace(jacobi(image_request(pipe)), **{field: value})
    with pytest.raises(ValueError, match=field):
        pipe.engine.generate([req])


def test_the_pipeline_config_and_keywords_turn_it_on(pipe):
    """PipelineConfig.speculative reaches every request the pipeline builds; keywords override it; a
    greedy image is the same either way."""
    from tokenloom.pipeline import PipelineConfig

    doc = pipe.user_document("a red circle")
    assert pipe.chat_request(doc).speculative is None
    assert pipe.chat_request(doc, speculative="jacobi", speculative_window=5).speculative_window == 5
    old = (pipe.config.speculative, pipe.config.speculative_window)
    try:
        pipe.config.speculative, pipe.config.speculative_window = "jacobi", 7
        req = pipe.chat_request(doc)
        assert (req.speculative, req.speculative_window) == ("jacobi", 7)
        assert pipe.chat_request(doc, speculative="off").speculative is None
        _, draws = pipe.image_draws("a red circle", (4, 4), 2)
        assert all(r.speculative == "jacobi" for r in draws)
        fast = pipe.generate_images("a red circle", temperature=0, candidates=1)[0]
    finally:
        pipe.config.speculative, pipe.config.speculative_window = old
    plain = pipe.generate_images("a red circle", temperature=0, candidates=1)[0]
    assert list(fast.getdata()) == list(plain.getdata())
    with pytest.raises(ValueError, match="speculative"):
        PipelineConfig.from_dict({"speculative": "yes"})
    with pytest.raises(ValueError, match="speculative_window"):
        pipe.chat_request(doc, speculative="jacobi", speculative_window=0)
