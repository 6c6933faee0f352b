"""Continuous batching: requests that join a running batch at different steps give what they give alone,
finished and cancelled requests free their rows, and a full batch makes new requests wait."""

import pytest
import torch

from tokenloom.engine import ContinuousBatcher, Finished, GenerationRequest, SamplingParams

WARM = SamplingParams(temperature=1.0, top_k=20)


def _requests(pipe):
    """A mix: greedy text, sampled text, a guided image, an interleaved answer, three-way guidance."""
    def prompt(text):
        return pipe.chat_request(pipe.user_document(text)).prompt_ids

    image_len = pipe.format.image_length(4, 4) + 1
    uncond = pipe.unconditional_prompt()
    return [
        GenerationRequest(prompt("hello"), mode="text", max_new_tokens=12, text=SamplingParams(temperature=0)),
        GenerationRequest(prompt("a story"), mode="text", max_new_tokens=30, text=WARM, seed=4),
        GenerationRequest(prompt("a red circle"), mode="image", image_size=(4, 4), max_new_tokens=image_len,
                          image=WARM, guidance_scale=3.0, uncond_prompt_ids=uncond, seed=1),
        GenerationRequest(prompt("tell and draw"), mode="any", image_size=(4, 4), max_new_tokens=60, text=WARM,
                          image=WARM, guidance_scale=2.0, uncond_prompt_ids=uncond, seed=9),
        GenerationRequest(prompt("edit it"), mode="image", image_size=(4, 4), max_new_tokens=image_len,
                          image=WARM, guidance_scale=1.5, uncond_prompt_ids=uncond, image_guidance_scale=1.2,
                          image_cond_prompt_ids=prompt("x"), seed=2),
    ]


def _solo(pipe, request):
    (result,) = pipe.engine.generate([request])
    return result


def _run(batcher, joins):
    """Step the batcher, adding joins[step] (a list of requests) before that step; returns results by id
    and the step at which each id finished."""
    results, finished_at, ids, step = {}, {}, {}, 0
    while step in joins or batcher.has_work() or any(s > step for s in joins):
        for request in joins.get(step, []):
            ids[batcher.add(request)] = request
        for event in batcher.step():
            if isinstance(event, Finished):
                results[event.row] = event.result
                finished_at[event.row] = step
        step += 1
        assert step < 1000
    return results, finished_at


def test_requests_joining_at_different_steps_equal_their_solo_runs(pipe):
    requests = _requests(pipe)
    solo = [_solo(pipe, r) for r in requests]
    batcher = ContinuousBatcher(pipe.engine, max_batch=8)
    results, _ = _run(batcher, {0: [requests[1], requests[2]], 3: [requests[0]], 7: [requests[3]],
                                11: [requests[4]]})
    order = [1, 2, 0, 3, 4]  # ids in order of joining
    for rid, i in enumerate(order):
        assert results[rid].ids == solo[i].ids, f"request {i} (id {rid}) differs from its solo run"
        if requests[i].seed is not None:
            assert results[rid].seed == solo[i].seed == requests[i].seed
    assert batcher.running == 0 and batcher.running_rows == 0


def test_a_short_request_finishes_while_a_long_one_runs(pipe):
    requests = _requests(pipe)
    batcher = ContinuousBatcher(pipe.engine, max_batch=4)
    _, finished_at = _run(batcher, {0: [requests[3]], 2: [requests[0]]})
    assert finished_at[1] < finished_at[0]  # the caption-length answer did not wait for the long one


def test_a_full_batch_makes_new_requests_wait_and_finished_rows_are_reused(pipe):
    requests = _requests(pipe)
    batcher = ContinuousBatcher(pipe.engine, max_batch=2)
    for r in (requests[1], requests[2], requests[0]):
        batcher.add(r)
    batcher.step()
    assert batcher.running == 2 and batcher.waiting == 1
    results, finished_at = _run(batcher, {})
    assert sorted(results) == [0, 1, 2]
    assert finished_at[2] > min(finished_at[0], finished_at[1])  # it joined when one of them had left
    assert results[2].ids == _solo(pipe, requests[0]).ids
    assert batcher.running == 0 and batcher.waiting == 0


def test_a_cancelled_request_frees_its_rows_and_emits_nothing_more(pipe):
    requests = _requests(pipe)
    solo = _solo(pipe, requests[1])
    batcher = ContinuousBatcher(pipe.engine, max_batch=1)
    long = batcher.add(requests[3])
    for _ in range(3):
        batcher.step()
    assert batcher.running == 1 and batcher.running_rows == 2  # its own row and its guidance row
    short = batcher.add(requests[1])
    batcher.cancel(long)
    events = []
    while batcher.has_work():
        events += batcher.step()
    assert {e.row for e in events} == {short}
    (done,) = [e.result for e in events if isinstance(e, Finished)]
    assert done.ids == solo.ids  # it ran in the slot the cancelled request freed
    assert batcher.running_rows == 0


def test_cache_grows_when_a_longer_request_joins(pipe):
    requests = _requests(pipe)
    batcher = ContinuousBatcher(pipe.engine, max_batch=4)
    batcher.add(requests[0])
    batcher.step()
    small = batcher._cache.max_length
    assert batcher._cache.batch_size == 1  # memory follows the rows in use, not max_rows
    long_prompt = GenerationRequest(requests[1].prompt_ids * 8, mode="text", max_new_tokens=120, text=WARM, seed=3)
    solo = _solo(pipe, long_prompt)
    rid = batcher.add(long_prompt)
    results, _ = _run(batcher, {})
    assert batcher._cache.max_length > small
    assert results[rid].ids == solo.ids
    many = [GenerationRequest(r.prompt_ids, mode="text", max_new_tokens=8, text=WARM, seed=s)
            for s, r in enumerate(requests[:3] * 2)]
    solos = [_solo(pipe, r).ids for r in many]
    ids = [batcher.add(r) for r in many]
    results, _ = _run(batcher, {})
    assert 1 < batcher._cache.batch_size <= batcher.max_rows  # grew in rows as requests joined
    assert [results[i].ids for i in ids] == solos


def test_bad_requests_are_refused_when_added(pipe):
    batcher = ContinuousBatcher(pipe.engine, max_batch=2)
    with pytest.raises(ValueError, match="empty prompt"):
        batcher.add(GenerationRequest([], max_new_tokens=3))
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        ContinuousBatcher(pipe.engine, max_batch=0)
    assert not batcher.has_work()


def test_step_positions_match_a_full_forward(pipe):
    """The per-row cache slots give the same logits as one full forward over the same tokens."""
    model = pipe.model
    ids = torch.randint(0, pipe.vocab.size, (1, 9), generator=torch.Generator().manual_seed(0))
    full = model(ids)[0, -1]
    cache = model.allocate_cache(2, 32)
    key_mask = torch.zeros(2, 32, dtype=torch.bool)
    key_mask[:, :8] = True
    model(ids[:, :8].expand(2, 8), kv_cache=cache, cache_positions=torch.arange(8), key_mask=key_mask, kv_length=8)
    # Row 0 writes its 9th token at slot 8, row 1 at slot 20 (after a gap it never sees).
    slots = torch.tensor([[8], [20]])
    key_mask[0, 8] = key_mask[1, 20] = True
    out = model(ids[:, 8:].expand(2, 1), positions=torch.tensor([[8], [8]]), kv_cache=cache,
                cache_positions=slots, key_mask=key_mask, kv_length=21)[:, -1]
    torch.testing.assert_close(out[0], full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], full, rtol=1e-4, atol=1e-4)
