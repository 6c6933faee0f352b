import math

import pytest
import torch
import torch.nn.functional as F

from tokenloom.model import KVCache, ModelConfig, Transformer, apply_rope, document_positions, rope_cos_sin

V = 61  # odd vocab so vocab/hidden shape mix-ups fail loudly

CONFIGS = {
    "rmsnorm": dict(),
    "layernorm_qknorm_gqa": dict(norm_type="layernorm", qk_norm=True, num_kv_heads=2, attention_bias=True, mlp_bias=True),
    "swin_tied_mqa": dict(swin_norm=True, qk_norm=True, num_kv_heads=1, tie_word_embeddings=True),
}


def tiny(**overrides) -> ModelConfig:
    kw = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, rope_theta=100.0)
    kw.update(overrides)
    return ModelConfig(**kw)


def make_model(name="rmsnorm", seed=0, **overrides) -> Transformer:
    # std 0.02 makes attention nearly uniform; larger weights make masking and RoPE errors visible.
    model = Transformer.random(tiny(**CONFIGS[name], **overrides), seed=seed).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "norm" not in n:
                p.mul_(10.0)
    return model


def ids(*shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def fill_garbage(cache: KVCache) -> None:
    # Unused slots must never be read; finite garbage (not zeros) makes a masking bug visible.
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 50)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_round_trip():
    c = ModelConfig(vocab_size=100, num_heads=8, num_kv_heads=2, qk_norm=True, norm_type="layernorm")
    assert c.head_dim == 32
    assert c.intermediate_size % 64 == 0 and abs(c.intermediate_size - 8 * 256 / 3) < 64
    assert ModelConfig(vocab_size=10, num_heads=4).num_kv_heads == 4
    d = c.to_dict()
    assert d["num_kv_heads"] == 2 and d["intermediate_size"] == c.intermediate_size
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_dict(tiny().to_dict()) == tiny()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden_size=30, num_heads=4), "num_heads"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(norm_type="batchnorm"), "norm_type"),
        (dict(hidden_size=24, num_heads=8), "head_dim"),  # odd head_dim cannot be rotated
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{"vocab_size": 10, **kwargs})


def test_config_from_dict_rejects_unknown_and_missing_keys():
    d = tiny().to_dict()
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_dict({**d, "n_layers": 3})
    del d["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_dict(d)


# --------------------------------------------------------------------------- structure


def test_state_dict_keys_and_qk_norm_shapes():
    cfg = tiny(norm_type="layernorm", qk_norm=True, num_kv_heads=2)
    model = Transformer(cfg)
    expected = {"tok_embeddings.weight", "norm.weight", "norm.bias", "output.weight"}
    for i in range(2):
        expected |= {
            f"layers.{i}.attention_norm.weight", f"layers.{i}.attention_norm.bias",
            f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight",
            f"layers.{i}.attention.wv.weight", f"layers.{i}.attention.wo.weight",
            f"layers.{i}.attention.q_norm.weight", f"layers.{i}.attention.q_norm.bias",
            f"layers.{i}.attention.k_norm.weight", f"layers.{i}.attention.k_norm.bias",
            f"layers.{i}.ffn_norm.weight", f"layers.{i}.ffn_norm.bias",
            f"layers.{i}.feed_forward.w1.weight", f"layers.{i}.feed_forward.w2.weight",
            f"layers.{i}.feed_forward.w3.weight",
        }
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["layers.0.attention.q_norm.weight"].shape == (4, 8)
    assert sd["layers.1.attention.k_norm.bias"].shape == (2, 8)
    assert sd["layers.0.attention.wk.weight"].shape == (16, 32)
    assert sd["layers.0.feed_forward.w1.weight"].shape == (48, 32)
    assert sd["layers.0.feed_forward.w2.weight"].shape == (32, 48)
    assert sd["output.weight"].shape == (V, 32)

    plain = set(Transformer(tiny(num_layers=1)).state_dict())
    assert plain == {
        "tok_embeddings.weight", "norm.weight", "output.weight",
        "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight",
        "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
        "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
    }
    biased = set(Transformer(tiny(num_layers=1, attention_bias=True, mlp_bias=True)).state_dict())
    assert biased - plain == {f"layers.0.attention.{w}.bias" for w in ("wq", "wk", "wv", "wo")} | {
        f"layers.0.feed_forward.{w}.bias" for w in ("w1", "w2", "w3")
    }


def test_tied_embeddings_share_storage():
    tied = make_model("swin_tied_mqa")
    untied = Transformer(tiny(**{**CONFIGS["swin_tied_mqa"], "tie_word_embeddings": False}))
    assert "output.weight" not in tied.state_dict()
    assert tied.output_weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == V * 32
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - V * 32
    x = ids(1, 6)
    hidden = tied(x, return_hidden=True)
    torch.testing.assert_close(tied(x), hidden @ tied.tok_embeddings.weight.T, rtol=1e-5, atol=1e-5)
    # A round trip through the state dict (without output.weight) restores the same model.
    clone = Transformer(tied.config)
    clone.load_state_dict(tied.state_dict(), strict=True)
    torch.testing.assert_close(clone.eval()(x), tied(x), rtol=0, atol=0)


def test_init_is_seeded_and_scaled():
    cfg = tiny(num_layers=8, hidden_size=128, intermediate_size=256)
    a, b, c = Transformer.random(cfg, seed=3), Transformer.random(cfg, seed=3), Transformer.random(cfg, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)
    assert abs(a.layers[0].attention.wq.weight.std().item() - 0.02) < 0.002
    for resid in (a.layers[0].feed_forward.w2.weight, a.layers[5].attention.wo.weight):
        assert abs(resid.std().item() - 0.02 / math.sqrt(16)) < 0.0005
    assert torch.all(a.layers[0].attention_norm.weight == 1)


def test_output_dtype_follows_model():
    model = make_model("layernorm_qknorm_gqa").to(torch.float64)
    x = ids(2, 5)
    assert model(x).dtype == torch.float64 and model(x).shape == (2, 5, V)
    assert model(x, return_hidden=True).shape == (2, 5, 32)
    cache = model.allocate_cache(2, 7)
    assert cache.dtype == torch.float64 and cache.k[0].shape == (2, 2, 7, 8)
    assert (cache.batch_size, cache.max_length, cache.num_layers) == (2, 7, 2)


# --------------------------------------------------------------------------- rotary


def test_rope_rotate_half_convention():
    D, theta = 8, 100.0
    x = torch.randn(1, 1, 1, D, dtype=torch.float64)
    pos = torch.tensor([[7]])
    cos, sin = rope_cos_sin(pos, D, theta)
    out = apply_rope(x, cos, sin)[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(D // 2):  # dimension i rotates together with i + D/2
        angle = 7 * theta ** (-2 * i / D)
        a, b = x[i], x[i + D // 2]
        assert math.isclose(out[i].item(), a * math.cos(angle) - b * math.sin(angle), abs_tol=1e-6)
        assert math.isclose(out[i + D // 2].item(), b * math.cos(angle) + a * math.sin(angle), abs_tol=1e-6)


def test_positions_are_relative_and_used():
    model = make_model("layernorm_qknorm_gqa")
    x = ids(2, 9)
    base = model(x)
    shifted = model(x, positions=torch.arange(9).expand(2, 9) + 1000)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)  # RoPE only sees differences
    assert not torch.allclose(model(x, positions=torch.arange(9).flip(0)), base, atol=1e-3)


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    model = make_model(name)
    x = ids(2, 12)
    base = model(x)
    for t in (0, 5, 11):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % V
        out = model(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3


# --------------------------------------------------------------------------- kv cache


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_matches_full_forward(name):
    model = make_model(name)
    x = ids(2, 14)
    full = model(x)
    with torch.no_grad():
        # Prefill 5, then one token at a time; the cache is longer than needed.
        cache = model.allocate_cache(2, 20)
        fill_garbage(cache)
        outs = [model(x[:, :5], kv_cache=cache, cache_positions=torch.arange(5))]
        for t in range(5, 14):
            outs.append(model(x[:, t : t + 1], kv_cache=cache, cache_positions=torch.tensor([t])))
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)

        # Chunked prefill of uneven sizes.
        cache = model.allocate_cache(2, 14)
        fill_garbage(cache)
        outs, start = [], 0
        for size in (3, 6, 1, 4):
            outs.append(model(x[:, start : start + size], kv_cache=cache, cache_positions=torch.arange(start, start + size)))
            start += size
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["rmsnorm", "layernorm_qknorm_gqa"])
def test_left_padded_batch_matches_rows_alone(name):
    model = make_model(name)
    prompts = [ids(4, seed=1), ids(8, seed=2), ids(6, seed=3)]
    new = ids(3, 3, seed=4)  # three decode steps per row
    P, S = 8, 12
    batch = torch.zeros(3, P, dtype=torch.long)
    key_mask = torch.zeros(3, S, dtype=torch.bool)
    positions = torch.zeros(3, P, dtype=torch.long)
    for r, p in enumerate(prompts):
        pad = P - len(p)
        batch[r, pad:] = p
        batch[r, :pad] = 7  # arbitrary pad token: must not matter
        key_mask[r, pad:] = True  # decode slots are marked valid ahead of time
        positions[r, pad:] = torch.arange(len(p))
    with torch.no_grad():
        cache = model.allocate_cache(3, S)
        fill_garbage(cache)
        prefill = model(batch, positions=positions, kv_cache=cache, cache_positions=torch.arange(P), key_mask=key_mask)
        assert torch.isfinite(prefill).all()
        steps = []
        for j in range(3):
            pos = torch.tensor([[len(p) + j] for p in prompts])
            steps.append(model(new[:, j : j + 1], positions=pos, kv_cache=cache,
                               cache_positions=torch.tensor([P + j]), key_mask=key_mask))
        steps = torch.cat(steps, 1)
        for r, p in enumerate(prompts):
            alone = model(torch.cat([p, new[r]])[None])[0]
            torch.testing.assert_close(prefill[r, P - len(p) :], alone[: len(p)], rtol=0, atol=1e-5)
            torch.testing.assert_close(steps[r], alone[len(p) :], rtol=0, atol=1e-5)

        # The same batch without key_mask lets short rows see the padding: logits must differ.
        cache = model.allocate_cache(3, S)
        wrong = model(batch, positions=positions, kv_cache=cache, cache_positions=torch.arange(P))
        assert (wrong[0, -1] - prefill[0, -1]).abs().max() > 1e-3


def test_padded_batch_without_cache_uses_key_mask():
    model = make_model("layernorm_qknorm_gqa")
    p = ids(5, seed=5)
    batch = torch.cat([torch.full((3,), 9), p])[None]
    key_mask = torch.tensor([[False] * 3 + [True] * 5])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    out = model(batch, positions=positions, key_mask=key_mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 3:], model(p[None])[0], rtol=0, atol=1e-5)


def test_padding_queries_always_see_a_key():
    # torch's CPU SDPA returns zeros for fully masked rows, but other backends/versions return NaN,
    # which then leaks through V into later layers; the mask itself must never leave a row empty.
    model = make_model()
    key_mask = torch.tensor([[False, False, True, True, True, True]])
    x = ids(1, 4)
    mask, _ = model._mask_and_positions(x, None, None, model.allocate_cache(1, 6), torch.arange(4), key_mask)
    assert mask.shape == (1, 1, 4, 6) and mask.any(-1).all()
    assert not mask[0, 0, 3, :2].any() and mask[0, 0, 3, 2:4].all() and not mask[0, 0, 3, 4:].any()
    mask, _ = model._mask_and_positions(x, None, None, None, None, key_mask[:, :4])
    assert mask.shape == (1, 1, 4, 4) and mask.any(-1).all()


def test_cache_select_and_reorder():
    model = make_model("layernorm_qknorm_gqa")
    x = ids(2, 10)
    full = model(x)
    with torch.no_grad():
        cache = model.allocate_cache(2, 10)
        model(x[:, :6], kv_cache=cache, cache_positions=torch.arange(6))
        rows = [1, 1, 0]  # duplicate row 1, move row 0 last
        sel = cache.select(rows)
        assert sel.batch_size == 3 and cache.batch_size == 2  # select leaves the original alone
        out = model(x[rows, 6:], kv_cache=sel, cache_positions=torch.arange(6, 10))
        torch.testing.assert_close(out, full[rows, 6:], rtol=0, atol=1e-5)

        assert cache.reorder([1]) is cache and cache.batch_size == 1  # drop finished row 0
        out = model(x[1:, 6:], kv_cache=cache, cache_positions=torch.arange(6, 10))
        torch.testing.assert_close(out, full[1:, 6:], rtol=0, atol=1e-5)


def test_cache_argument_errors():
    model = make_model()
    cache = model.allocate_cache(1, 8)
    x = ids(1, 3)
    with pytest.raises(ValueError, match="cache_positions"):
        model(x, kv_cache=cache)
    with pytest.raises(ValueError, match="document_ids"):
        model(x, kv_cache=cache, cache_positions=torch.arange(3), document_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="key_mask"):
        model(x, kv_cache=cache, cache_positions=torch.arange(3), key_mask=torch.ones(1, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_forward_equals_separate_documents(name):
    model = make_model(name)
    rows = [[4, 7, 3], [9, 1, 4]]  # document lengths; each row padded to 16
    T = 16
    x = ids(2, T, seed=6)
    doc_ids = torch.full((2, T), -1)
    for r, lengths in enumerate(rows):
        start = 0
        for d, n in enumerate(lengths):
            doc_ids[r, start : start + n] = d + 10 * r
            start += n
    packed = model(x, document_ids=doc_ids)
    assert torch.isfinite(packed).all()  # padding rows included
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            alone = model(x[r : r + 1, start : start + n])
            torch.testing.assert_close(packed[r, start : start + n], alone[0], rtol=0, atol=1e-5)
            start += n
    # Padding must not influence real tokens.
    y = x.clone()
    y[doc_ids == -1] = (y[doc_ids == -1] + 3) % V
    torch.testing.assert_close(model(y, document_ids=doc_ids)[doc_ids != -1], packed[doc_ids != -1], rtol=0, atol=0)
    # Sanity: without document_ids the later documents see earlier ones.
    assert (model(x)[0, 4:11] - packed[0, 4:11]).abs().max() > 1e-3


# --------------------------------------------------------------------------- training


def test_gradients_and_dropout():
    model = Transformer.random(tiny(**CONFIGS["layernorm_qknorm_gqa"], dropout=0.2), seed=0)
    x = ids(2, 10)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    assert not torch.allclose(a, model(x))  # dropout active in training
    loss = F.cross_entropy(a[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # Packed training also backpropagates.
    model.zero_grad()
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    model(x, document_ids=doc_ids).sum().backward()
    assert model.tok_embeddings.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- reference


def test_matches_hugging_face_chameleon():
    transformers = pytest.importorskip("transformers")
    from transformers.models.chameleon.modeling_chameleon import ChameleonModel

    torch.manual_seed(0)
    for swin in (False, True):
        hc = transformers.ChameleonConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, swin_norm=swin, rope_theta=100.0,
            vocabulary_map={"<image>": 5}, attn_implementation="eager",
        )
        hf = ChameleonModel(hc).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.3)
        names = {
            "embed_tokens": "tok_embeddings", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
            "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
            "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
            "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
        }
        sd = {}
        for k, v in hf.state_dict().items():
            if k.startswith("vqmodel"):
                continue
            for old, new in names.items():
                k = k.replace(old, new)
            sd[k] = v
        cfg = tiny(num_kv_heads=2, qk_norm=True, swin_norm=swin, tie_word_embeddings=True)
        ours = Transformer(cfg).eval()
        ours.load_state_dict(sd, strict=True)
        x = ids(2, 12)
        x[x == 5] = 6  # keep clear of the image placeholder token
        with torch.no_grad():
            ref = hf(input_ids=x).last_hidden_state
            torch.testing.assert_close(ours(x, return_hidden=True), ref, rtol=1e-5, atol=1e-5)


def test_document_positions_restart_per_document():
    doc_ids = torch.tensor([[3, 3, 3, 8, 8, -1, -1], [0, 1, 1, 1, 1, 1, 2]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 3, 4, 0]]
    # The forward uses them by default: same logits as passing them explicitly.
    model = make_model("rmsnorm")
    x = ids(2, 7)
    explicit = model(x, document_ids=doc_ids, positions=document_positions(doc_ids))
    torch.testing.assert_close(model(x, document_ids=doc_ids), explicit, rtol=0, atol=0)


def test_decode_attention_equals_sdpa_with_grouped_heads():
    from tokenloom.model import decode_attention

    g = torch.Generator().manual_seed(0)
    B, H, KV, S, D = 3, 8, 2, 11, 16
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((B, H, 1, D), (B, KV, S, D), (B, KV, S, D)))
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., 0] = True  # every row sees at least one key
    rep = H // KV
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask)
    torch.testing.assert_close(decode_attention(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
