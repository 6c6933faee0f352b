"""Modality experts (ModelConfig.experts, CogVLM's visual expert): the tokens inside video and speech spans
run through a second set of projections, all others through the first. Checked: which tokens are routed,
that a cached forward routes as a whole one does (windows that open and close spans, rows at their own
slots), that copies of the base's projections change nothing, that every token outside the spans computes
exactly what the base model computes, that the engine's videos and utterances equal recomputation from
scratch and batches equal their rows alone, and that an experts run trains only the experts and the new rows."""

import copy
import dataclasses
import json

import pytest
import test_engine_speech as es
import test_engine_video as ev
import torch

from tokenloom.document import Document
from tokenloom.engine import ContinuousBatcher, Finished, GenerationRequest
from tokenloom.modalities import add_modality, new_token_rows
from tokenloom.model import ModelConfig, Transformer, span_routes
from tokenloom.pipeline import Pipeline
from tokenloom.train.trainer import train_experts_only

BEGIN, END, BOS = 5, 6, 4


def test_span_routes_mark_spans_markers_included():
    ids = torch.tensor([[1, 5, 2, 7, 6, 3, 9, 5, 4],
                        [6, 2, 5, 6, 5, 6, 2, 2, 5]])
    inside, open_after = span_routes(ids, torch.tensor([BEGIN]), torch.tensor([END]))
    assert inside.int().tolist() == [[0, 1, 1, 1, 1, 0, 0, 1, 1],
                                     [1, 0, 1, 1, 1, 1, 0, 0, 1]]  # a stray end is routed, and closes nothing
    assert open_after.int().tolist() == [[0, 1, 1, 1, 0, 0, 0, 1, 1],
                                         [0, 0, 1, 0, 1, 0, 0, 0, 1]]
    # A window continues the state before it.
    inside, _ = span_routes(torch.tensor([[2, 6, 2]]), torch.tensor([BEGIN]), torch.tensor([END]),
                            open_before=torch.tensor([True]))
    assert inside.int().tolist() == [[1, 1, 0]]
    # A document's first token closes a span before itself (a packed row's next document starts outside).
    inside, open_after = span_routes(torch.tensor([[5, 2, 4, 2, 5, 2]]), torch.tensor([BEGIN]), torch.tensor([END]),
                                     open_before=torch.tensor([True]), reset_ids=torch.tensor([BOS]))
    assert inside.int().tolist() == [[1, 1, 0, 0, 1, 1]] and open_after.int().tolist() == [[1, 1, 0, 0, 1, 1]]


def experts_model(seed=0, same=False, scope="span"):
    config = ModelConfig(vocab_size=24, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True,
                         experts=["video"], expert_scope=scope)
    model = Transformer.random(config, seed=seed).eval()
    model.set_expert_spans([BEGIN], [END], [BOS])
    if same:
        model.copy_to_experts()
    return model


def base_of(model):
    base = Transformer(dataclasses.replace(model.config, experts=[])).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if ".expert." not in k})
    return base


def test_tokens_outside_spans_compute_what_the_base_computes():
    model = experts_model()
    base = base_of(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 24, (3, 20), generator=g)
    ids[1, 8], ids[1, 13] = BEGIN, END
    ids[2, 15] = BEGIN
    with torch.no_grad():
        got, want = model(ids), base(ids)
    assert torch.equal(got[0], want[0])  # no span: bit-identical
    assert torch.equal(got[1, :8], want[1, :8]) and torch.equal(got[2, :15], want[2, :15])  # before a span
    assert not torch.allclose(got[1, 8:14], want[1, 8:14])  # the span runs through the (random) experts
    assert not torch.allclose(got[1, 14:], want[1, 14:])  # and what follows reads its keys
    # Experts that copy the base: the same model on every token.
    same = experts_model(same=True)
    with torch.no_grad():
        assert torch.equal(same(ids), base_of(same)(ids))
    # The state dict names the experts beside what they shadow; a model without experts has none of them.
    names = set(model.state_dict())
    assert "layers.0.attention.expert.wq.weight" in names and "layers.1.feed_forward.expert.w2.weight" in names
    assert not any(".expert." in n for n in base.state_dict())
    assert "experts" not in base.config.to_dict() and model.config.to_dict()["experts"] == ["video"]


def test_scope_rest_routes_from_the_first_begin_to_the_end():
    """expert_scope "rest": an end marker closes nothing, so the answer after a span is the experts' too;
    what comes before the first begin is still the base's, bit for bit."""
    model, span = experts_model(scope="rest"), experts_model()
    base = base_of(model)
    ids = torch.randint(7, 24, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[1, [4, 8]] = torch.tensor([BEGIN, END])
    ids[0, [2, 5]] = torch.tensor([BEGIN, BOS])  # two documents packed in one row: the second starts outside
    with torch.no_grad():
        got, want, spans = model(ids), base(ids), span(ids)
        routes = span_routes(ids, model.span_begin_ids, model.span_end_ids, reset_ids=model.span_reset_ids)[0]
    assert routes.int().tolist() == [[0, 0, 1, 1, 1] + [0] * 11, [0] * 4 + [1] * 12]
    assert torch.equal(got[0, :2], want[0, :2]) and torch.equal(got[1, :4], want[1, :4])
    assert torch.equal(got[1, :9], spans[1, :9])  # the same weights as the span model, through the end marker
    assert not torch.allclose(got[1, 9:], spans[1, 9:])  # after it the experts go on computing
    assert model.config.to_dict()["expert_scope"] == "rest" and "expert_scope" not in base.config.to_dict()
    with pytest.raises(ValueError, match="expert_scope must be one of"):
        ModelConfig(vocab_size=24, hidden_size=32, num_layers=1, num_heads=4, experts=["video"], expert_scope="all")


@pytest.mark.parametrize("scope", ["span", "rest"])
def test_a_cached_forward_routes_as_a_whole_forward(scope):
    """Windows of every size over a row whose spans open and close inside them; rows at their own slots."""
    model = experts_model(scope=scope)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 24, (2, 24), generator=g)
    ids[0, [3, 9, 14, 18]] = torch.tensor([BEGIN, END, BEGIN, BOS])
    ids[1, [0, 20]] = torch.tensor([BEGIN, END])
    with torch.no_grad():
        whole = model(ids)
        for cuts in ([5, 1, 1, 7, 10], [1] * 24, [12, 12], [3, 4, 2, 8, 7]):
            cache, start, out = model.allocate_cache(2, 32), 0, []
            for n in cuts:
                out.append(model(ids[:, start:start + n], kv_cache=cache, cache_positions=torch.arange(start, start + n)))
                start += n
            torch.testing.assert_close(torch.cat(out, 1), whole, rtol=1e-5, atol=1e-5)
        # Rows writing at their own slots (continuous batching, speculative windows): row 1 rewinds to slot 7
        # (as after rejected drafts) while row 0 goes on from slot 10.
        cache = model.allocate_cache(2, 32)
        model(ids[:, :10], kv_cache=cache, cache_positions=torch.arange(10))
        window = torch.stack([torch.arange(10, 14), torch.arange(7, 11)])
        got = model(torch.stack([ids[0, 10:14], ids[1, 7:11]]), kv_cache=cache, cache_positions=window)
    torch.testing.assert_close(got[0], whole[0, 10:14], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], whole[1, 7:11], rtol=1e-5, atol=1e-5)


def test_a_model_with_experts_needs_its_span_tokens():
    config = ModelConfig(vocab_size=24, hidden_size=32, num_layers=1, num_heads=4, experts=["video"])
    with pytest.raises(ValueError, match="set_expert_spans"):
        Transformer.random(config)(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="distinct modality names"):
        ModelConfig(vocab_size=24, experts=["video", "video"])


# -- the engine ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xpipe(speech_pipe):
    """The speech pipeline (video markers and speech codes) with experts for both, drawn at random (not the
    copies add_modality starts from), so that routing shows in every output."""
    model = copy.deepcopy(speech_pipe.model)
    grown = Transformer.random(dataclasses.replace(model.config, experts=["video", "speech"]), seed=9)
    grown.load_state_dict({**grown.state_dict(), **model.state_dict()})
    with torch.no_grad():
        for name, p in grown.named_parameters():
            if ".expert." in name:
                p.mul_(3.0)  # a random model's small projections: make the experts' difference plain
    p = speech_pipe
    return Pipeline(grown.eval(), p.vocab, p.text_tokenizer, p.image_tokenizer, p.config, p.speech_tokenizer)


@pytest.mark.parametrize("case", ["video", "guided video", "speech", "guided speech"])
def test_greedy_spans_through_experts_equal_recomputation(xpipe, speech_pipe, case):
    if "video" in case:
        req = ev.video_request(xpipe, image_size=(2, 2), video_frames=3)
        reference = ev.reference_greedy
    else:
        req = es.speech_request(xpipe, speech_frames=5)
        reference = es.reference_greedy
    if case.startswith("guided"):
        req = dataclasses.replace(req, guidance_scale=3.0, uncond_prompt_ids=xpipe.unconditional_prompt())
    got = xpipe.engine.generate([req])[0]
    assert got.ids == reference(xpipe, req)
    assert got.ids != speech_pipe.engine.generate([req])[0].ids, "the experts should change a random model's span"


def test_rows_without_spans_generate_what_the_base_generates(xpipe, speech_pipe):
    uncond = xpipe.unconditional_prompt()
    reqs = [GenerationRequest(ev.prompt(xpipe, "a square"), mode="image", image_size=(3, 3), max_new_tokens=30,
                              guidance_scale=2.0, uncond_prompt_ids=uncond, text=ev.WARM, image=ev.WARM, seed=3),
            GenerationRequest(ev.prompt(xpipe, "hello"), mode="text", max_new_tokens=15, text=ev.GREEDY)]
    assert [r.ids for r in xpipe.engine.generate(reqs)] == [r.ids for r in speech_pipe.engine.generate(reqs)]


def test_a_mixed_batch_through_experts_equals_each_row_alone(xpipe):
    common = dict(text=ev.WARM, image=ev.WARM, speech=ev.WARM, seed=5)
    uncond = xpipe.unconditional_prompt()
    reqs = [
        ev.video_request(xpipe, "a ball", image_size=(2, 2), video_frames=3, **common),
        ev.jacobi(ev.video_request(xpipe, "a dog", image_size=(3, 3), video_frames=2, **common), 5),
        es.speech_request(xpipe, "two", speech_levels=2, speech_frames=5, guidance_scale=2.0,
                          uncond_prompt_ids=uncond, **common),
        GenerationRequest(ev.prompt(xpipe, "a square"), mode="image", image_size=(3, 3), max_new_tokens=30, **common),
        GenerationRequest(ev.prompt(xpipe, "hello"), mode="text", max_new_tokens=15, **common),
    ]
    for req, res in zip(reqs, xpipe.engine.generate(reqs)):
        assert res.ids == xpipe.engine.generate([req])[0].ids


def test_a_span_joining_a_running_batch_through_experts_equals_it_alone(xpipe):
    first = ev.guided(xpipe, ev.video_request(xpipe, "a ball", image_size=(2, 2), video_frames=4, image=ev.WARM,
                                              seed=1))
    late = es.speech_request(xpipe, "two", speech_levels=3, speech=ev.WARM, seed=2)
    batcher = ContinuousBatcher(xpipe.engine, max_batch=2)
    results, ids = {}, [batcher.add(first)]
    for step in range(300):
        if step == 9:
            ids.append(batcher.add(late))
        for event in batcher.step():
            if isinstance(event, Finished):
                results[event.row] = event.result
        if not batcher.has_work():
            break
    for rid, req in zip(ids, (first, late)):
        assert results[rid].ids == xpipe.engine.generate([req])[0].ids


# -- growing and training ------------------------------------------------------------------------------


def test_add_modality_with_experts_starts_as_the_base_and_trains_only_experts_and_new_rows(old_pipe, tmp_path):
    video = add_modality(old_pipe, "video", experts=True)
    assert video.model.config.experts == ["video"]
    ids = torch.tensor([video.format.encode(Document.chat([("user", ["a ball"])]), add_eos=False).ids])
    span = torch.tensor([[video.vocab.video_begin, 3, 4, video.vocab.video_end]])
    with torch.no_grad():  # the copies compute what the base did, old tokens and new alike
        torch.testing.assert_close(video.model(ids)[..., :old_pipe.vocab.size], old_pipe.model(ids), rtol=0, atol=0)
    saved = video.save_pretrained(tmp_path / "grown")
    assert json.loads((saved / "config.json").read_text())["model"]["experts"] == ["video"]

    model = video.model.train()
    before = copy.deepcopy(model.state_dict())
    rows = new_token_rows(video.vocab, model.config.experts)
    assert rows.sum() == 2 and rows[video.vocab.video_begin] and rows[video.vocab.video_end]
    train_experts_only(model, rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        logits = model(torch.cat([ids, span.expand(1, -1)], 1))
        logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if ".expert." in name:
            assert changed, name
        elif name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(value[~rows], after[name][~rows]) and changed, name
        else:
            assert not changed, name
    with torch.no_grad():  # what is outside the spans is still the base's, bit for bit
        model.eval()
        assert torch.equal(model(ids)[..., :old_pipe.vocab.size], old_pipe.model(ids))


def test_a_row_moved_into_a_finished_rows_place_keeps_its_span_state(xpipe):
    """Continuous batching compacts its cache when a row finishes: a video row moved mid-span into the place
    of a short utterance that ended must carry its open span along (or its next tokens would leave the
    experts)."""
    short = es.speech_request(xpipe, "one", speech_levels=1, speech_frames=2, speech=ev.WARM, seed=3)
    long = ev.video_request(xpipe, "a ball", image_size=(2, 2), video_frames=4, image=ev.WARM, seed=4)
    batcher = ContinuousBatcher(xpipe.engine, max_batch=2)
    ids = [batcher.add(short), batcher.add(long)]
    results, order = {}, []
    for _ in range(300):
        for event in batcher.step():
            if isinstance(event, Finished):
                results[event.row] = event.result
                order.append(event.row)
        if not batcher.has_work():
            break
    assert order == ids, "the utterance should finish first, while the video is in its frames"
    for rid, req in zip(ids, (short, long)):
        assert results[rid].ids == xpipe.engine.generate([req])[0].ids


def test_an_experts_run_trains_the_experts_and_the_new_rows_and_nothing_else(pipe, tmp_path):
    """`train.trainable: experts` on a model that has the video tokens and gains only their experts
    (add_modality on a vocabulary that has them), trained on videos: the base's weights and its old rows
    stay bit-identical (weight decay is off whatever the config says), so old documents' logits do."""
    import test_video_data as vd
    from test_train import write_config

    from tokenloom.checkpoint import load_weights
    from tokenloom.data import pretokenize
    from tokenloom.train import ConfigError, Trainer, load_config

    grown = add_modality(pipe, "video", experts=True)
    grown.save_pretrained(tmp_path / "pipe")
    pipe.save_pretrained(tmp_path / "plain")
    _, corpus = vd.video_corpus(tmp_path)
    for split in ("train", "eval"):
        pretokenize(corpus, grown, tmp_path / "shards" / split, progress=False)
    config = write_config(tmp_path, "experts.yaml", train={"max_steps": 4, "eval_every": 2, "save_every": 2,
                                                            "trainable": "experts"})
    Trainer(load_config(config), tmp_path / "out").run()
    before, after = load_weights(tmp_path / "pipe"), load_weights(tmp_path / "out" / "final")
    rows = new_token_rows(grown.vocab, ["video"])
    assert before.keys() == after.keys()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        if ".expert." in name:
            assert changed, name
        elif name in ("tok_embeddings.weight", "output.weight"):
            assert changed and torch.equal(before[name][~rows], after[name][~rows]), name
        else:
            assert not changed, name
    import tokenloom

    trained = tokenloom.load(tmp_path / "out" / "final")
    ids = torch.tensor([trained.format.encode(Document.chat([("user", ["a red square"])]), add_eos=False).ids])
    with torch.no_grad():  # every logit but those of the trained rows (the video markers' own)
        got, want = trained.model(ids), pipe.model(ids)
        assert torch.equal(got[..., ~rows], want[..., ~rows]) and not torch.equal(got, want)

    plain = write_config(tmp_path, "plain.yaml", model={"pipeline": "plain"}, train={"trainable": "experts"})
    with pytest.raises(ConfigError, match="needs a model with experts"):
        Trainer(load_config(plain), tmp_path / "never")


def test_export_to_hf_chameleon_refuses_experts(xpipe, tmp_path):
    from tokenloom.convert import ConversionError, export

    with pytest.raises(ConversionError, match="expert projections"):
        export(xpipe, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_the_add_modality_command_adds_experts(old_pipe, tmp_path, capsys):
    from tokenloom.cli import main as cli

    old_pipe.save_pretrained(tmp_path / "old")
    assert cli(["add-modality", str(tmp_path / "old"), str(tmp_path / "new"), "--modality", "video", "--experts"]) == 0
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["model"]["experts"] == ["video"] and config["added_modality"]["experts"] == ["video"]
    # Again on the grown model: it has the tokens and their experts, so there is nothing to add.
    capsys.readouterr()
    assert cli(["add-modality", str(tmp_path / "new"), str(tmp_path / "again"), "--modality", "video", "--experts"]) == 2
    assert "already has the video tokens" in capsys.readouterr().err and not (tmp_path / "again").exists()
    # --expert-scope rest is recorded; without --experts it is a usage error.
    assert cli(["add-modality", str(tmp_path / "old"), str(tmp_path / "rest"), "--modality", "video", "--experts",
                "--expert-scope", "rest"]) == 0
    config = json.loads((tmp_path / "rest" / "config.json").read_text())
    assert config["model"]["expert_scope"] == "rest" and config["added_modality"]["expert_scope"] == "rest"
    capsys.readouterr()
    assert cli(["add-modality", str(tmp_path / "old"), str(tmp_path / "no"), "--modality", "video",
                "--expert-scope", "rest"]) == 2
    assert "--expert-scope is for --experts" in capsys.readouterr().err and not (tmp_path / "no").exists()
