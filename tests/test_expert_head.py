"""The experts' own head (ModelConfig.expert_head): the tokens that run through the experts get their own final
norm and output head. Checked: a model gaining it (a copy) computes what it computed, every logit; the head
then acts on the experts' tokens alone; a plain forward, a cached one and return_hidden + project agree; an
experts run trains the whole expert head while the shared head keeps every old row; add-modality gives it."""

import copy
import dataclasses
import json

import pytest
import torch
from test_experts import BEGIN, BOS, END

from tokenloom.document import Document
from tokenloom.modalities import add_modality, new_token_rows
from tokenloom.model import ModelConfig, Transformer, span_routes
from tokenloom.train.trainer import train_experts_only


def headed_model(seed=0, scope="rest"):
    config = ModelConfig(vocab_size=24, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True,
                         experts=["video"], expert_scope=scope, expert_head=True)
    model = Transformer.random(config, seed=seed).eval()
    model.set_expert_spans([BEGIN], [END], [BOS])
    with torch.no_grad():  # random init leaves both norms at one: make the expert norm differ too
        model.expert_norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(seed))
    return model


def rows_with_spans():
    ids = torch.randint(7, 24, (3, 18), generator=torch.Generator().manual_seed(2))
    ids[1, [5, 9]] = torch.tensor([BEGIN, END])
    ids[2, [3, 11]] = torch.tensor([BEGIN, BOS])  # a packed row: the second document starts outside
    return ids


def test_the_expert_head_acts_on_the_experts_tokens_alone():
    model = headed_model()
    shared = Transformer(dataclasses.replace(model.config, expert_head=False)).eval()
    shared.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("expert_")})
    shared.set_expert_spans([BEGIN], [END], [BOS])
    ids = rows_with_spans()
    inside = span_routes(ids, model.span_begin_ids, model.span_end_ids, reset_ids=model.span_reset_ids)[0]
    assert torch.equal(model.routed(ids), inside) and inside[1, 5:].all() and not inside[2, 11:].any()
    with torch.no_grad():
        got, want = model(ids), shared(ids)
        hidden = model(ids, return_hidden=True)
    assert torch.equal(got[~inside], want[~inside])  # outside the experts: the shared norm and head, bit for bit
    assert not torch.allclose(got[inside], want[inside])
    torch.testing.assert_close(model.project(hidden, model.routed(ids)), got, rtol=0, atol=0)
    # What an expert token's logits are: the expert head of the expert norm of the last block's output.
    pre = model.expert_norm.weight.clone()
    with torch.no_grad():
        model.expert_norm.weight.fill_(1.0)
        model.norm.weight.fill_(1.0)
        plain = model(ids, return_hidden=True)
        model.expert_norm.weight.copy_(pre)
    torch.testing.assert_close(hidden[inside], plain[inside] * pre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[inside], hidden[inside] @ model.expert_output.weight.T, rtol=1e-5, atol=1e-5)
    # The state dict names the head; a config without it records nothing of it.
    assert {"expert_norm.weight", "expert_output.weight"} <= set(model.state_dict())
    assert model.config.to_dict()["expert_head"] is True and "expert_head" not in shared.config.to_dict()
    with pytest.raises(ValueError, match="expert_head needs experts"):
        ModelConfig(vocab_size=24, hidden_size=32, num_layers=1, num_heads=4, expert_head=True)


@pytest.mark.parametrize("scope", ["span", "rest"])
def test_a_cached_forward_through_the_expert_head_equals_a_whole_one(scope):
    model = headed_model(seed=1, scope=scope)
    ids = rows_with_spans()
    with torch.no_grad():
        whole = model(ids)
        for cuts in ([1] * 18, [4, 3, 11], [6, 6, 6]):
            cache, start, out = model.allocate_cache(3, 24), 0, []
            for n in cuts:
                out.append(model(ids[:, start:start + n], kv_cache=cache, cache_positions=torch.arange(start, start + n)))
                start += n
            torch.testing.assert_close(torch.cat(out, 1), whole, rtol=1e-5, atol=1e-5)


def test_gaining_the_head_changes_nothing_and_an_experts_run_trains_all_of_it(old_pipe):
    video = add_modality(old_pipe, "video", experts=True, expert_scope="rest")
    headed = add_modality(video, "video", experts=True, expert_head=True)  # the tokens and experts are there
    assert headed.model.config.expert_head and headed.model.config.expert_scope == "rest"
    assert not video.model.config.expert_head  # the given pipeline is left as it was
    doc = Document.chat([("user", ["a ball"])])
    ids = torch.tensor([headed.format.encode(doc, add_eos=False).ids
                        + [headed.vocab.video_begin, 3, 4, headed.vocab.video_end, 9, 10]])
    with torch.no_grad():  # a copy: every logit as before, the experts' tokens' too
        assert torch.equal(headed.model(ids), video.model(ids))
    with pytest.raises(Exception, match="already has the video tokens"):
        add_modality(headed, "video", experts=True, expert_head=True)
    with pytest.raises(ValueError, match="for experts=True"):
        add_modality(old_pipe, "video", expert_head=True)

    model = headed.model.train()
    before = copy.deepcopy(model.state_dict())
    rows = new_token_rows(headed.vocab, model.config.experts)
    train_experts_only(model, rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        model(ids).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if ".expert." in name or name.startswith("expert_"):
            assert changed, name
        elif name in ("tok_embeddings.weight", "output.weight"):
            assert torch.equal(value[~rows], after[name][~rows]), name
        else:
            assert not changed, name
    assert not torch.equal(before["expert_output.weight"][~rows], after["expert_output.weight"][~rows])
    prompt = ids[:, :-6]
    with torch.no_grad():  # a document without video still computes what the base computes
        model.eval()
        assert torch.equal(model(prompt)[..., :old_pipe.vocab.size], old_pipe.model(prompt))


def test_the_add_modality_command_gives_the_experts_a_head(old_pipe, tmp_path, capsys):
    from tokenloom.cli import main as cli

    old_pipe.save_pretrained(tmp_path / "old")
    assert cli(["add-modality", str(tmp_path / "old"), str(tmp_path / "new"), "--modality", "video", "--experts",
                "--expert-head"]) == 0
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["model"]["expert_head"] is True and config["added_modality"]["expert_head"] is True
    capsys.readouterr()
    assert cli(["add-modality", str(tmp_path / "old"), str(tmp_path / "bad"), "--modality", "video",
                "--expert-head"]) == 2
    assert "--expert-head is for --experts" in capsys.readouterr().err and not (tmp_path / "bad").exists()
