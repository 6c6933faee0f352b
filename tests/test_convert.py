"""Converters, proven on tiny random models built here with the real libraries.

References are independent of tokenloom's code: transformers' ChameleonForConditionalGeneration,
LlamaForCausalLM and Qwen2ForCausalLM; Meta's checkpoint layout and its adjacent-pair RoPE written
out below; a compact functional taming VQGAN (encoder/decoder) written from the published
architecture. Float32 throughout; tolerances are stated where the comparisons are made.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokenloom.convert import ConversionError, ConversionWarning, convert, expand, expand_pipeline, export  # noqa: E402
from tokenloom.convert.chameleon_meta import half_to_interleaved  # noqa: E402
from tokenloom.image_processing import ImageTokenizer  # noqa: E402
from tokenloom.model import apply_rope, rope_cos_sin  # noqa: E402
from tokenloom.pipeline import Pipeline, random_pipeline  # noqa: E402
from tokenloom.text_tokenizer import TextTokenizer  # noqa: E402
from tokenloom.vqgan import VQGANConfig  # noqa: E402

CORPUS = ["a red square on a blue field", "two cats and a dog", "hello world", "draw a small green circle"] * 4
CODES = 64
LUMINA_SIZES = 8
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, THETA = 32, 2, 4, 2, 48, 100.0
HEAD_DIM = HIDDEN // HEADS
# Logits are O(10) with these weights; SDPA vs eager attention and op order differ at ~1e-5.
TOL = dict(rtol=1e-4, atol=1e-4)

# A tiny taming VQGAN: f2, attention at 8x8 (encoder down.1, decoder up.1), 64 codes.
VQ = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], resolution=16, z_channels=8,
          embed_dim=8, n_embed=CODES)


def image_token_name(code: int) -> str:
    # Chameleon's names: code digits spelled with letters A..J, then one trailing letter.
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z"


# =========================================================================== taming reference


def taming_shapes(v=VQ) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of taming's VQModel (taming/modules/diffusionmodules/model.py)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    ch, mult, nrb, attn_res = v["ch"], v["ch_mult"], v["num_res_blocks"], v["attn_resolutions"]
    conv("encoder.conv_in", 3, ch, 3)
    res, in_mult = v["resolution"], (1, *mult)
    for i, m in enumerate(mult):
        block_in = ch * in_mult[i]
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
            if res in attn_res:
                attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    resnet("encoder.mid.block_1", block_in, block_in), attn("encoder.mid.attn_1", block_in)
    resnet("encoder.mid.block_2", block_in, block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, v["z_channels"], 3)

    block_in, res = ch * mult[-1], v["resolution"] // 2 ** (len(mult) - 1)
    conv("decoder.conv_in", v["z_channels"], block_in, 3)
    resnet("decoder.mid.block_1", block_in, block_in), attn("decoder.mid.attn_1", block_in)
    resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
            if res in attn_res:
                attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    shapes["quantize.embedding.weight"] = (v["n_embed"], v["embed_dim"])
    conv("quant_conv", v["z_channels"], v["embed_dim"], 1), conv("post_quant_conv", v["embed_dim"], v["z_channels"], 1)
    return shapes


def random_taming_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in taming_shapes().items():
        if len(shape) == 4:  # conv: fan-in scaled, so activations stay O(1) through the network
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1] * shape[2] * shape[3])
        elif name.endswith("norm.weight") or ".norm" in name and name.endswith(".weight"):
            t = 1 + 0.2 * torch.randn(shape, generator=g)
        elif name == "quantize.embedding.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        sd[name] = t
    return sd


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(sd, p, x, padding=0, stride=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], stride=stride, padding=padding)


def _resnet(sd, p, x):
    h = _conv(sd, f"{p}.conv1", F.silu(_gn(sd, f"{p}.norm1", x)), padding=1)
    h = _conv(sd, f"{p}.conv2", F.silu(_gn(sd, f"{p}.norm2", h)), padding=1)
    if f"{p}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{p}.nin_shortcut", x)
    return x + h


def _attn(sd, p, x):
    h = _gn(sd, f"{p}.norm", x)
    q, k, v = (_conv(sd, f"{p}.{n}", h) for n in "qkv")
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c ** -0.5
    w = torch.softmax(w, dim=2)
    out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{p}.proj_out", out)


def ref_decode(sd, codes: torch.Tensor, v=VQ) -> torch.Tensor:
    """taming's VQModel.decode(quantize.embedding(codes)), written out."""
    z = sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z), padding=1)
    h = _resnet(sd, "decoder.mid.block_2", _attn(sd, "decoder.mid.attn_1", _resnet(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(len(v["ch_mult"]))):
        for j in range(v["num_res_blocks"] + 1):
            h = _resnet(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"), 1)
    return _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)), padding=1)


def write_taming(directory: Path, sd) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    extras = {"loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4), "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": {**sd, **extras}, "global_step": 1000, "epoch": 3}, directory / "vqgan.ckpt")
    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": VQ["embed_dim"], "n_embed": VQ["n_embed"], "ckpt_path": "/nonexistent/last.ckpt",
        "ddconfig": {"double_z": False, "z_channels": VQ["z_channels"], "resolution": VQ["resolution"],
                     "in_channels": 3, "out_ch": 3, "ch": VQ["ch"], "ch_mult": VQ["ch_mult"],
                     "num_res_blocks": VQ["num_res_blocks"], "attn_resolutions": VQ["attn_resolutions"],
                     "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0}}}}}
    (directory / "vqgan.yaml").write_text(yaml.safe_dump(cfg))
    return directory


# =========================================================================== Chameleon fixtures


def make_chameleon_tokenizer(path: Path, *, codes=CODES, image_tokens=True, placeholder="<image>") -> TextTokenizer:
    """Tiny byte-level BPE + shuffled IMGIMG, Chameleon special and Lumina reserved tokens."""
    tok = TextTokenizer.train(CORPUS, 300, ["<s>", "<pad>", "</s>", "<unk>"])
    extra = [image_token_name(c) for c in range(codes)] if image_tokens else []
    extra += ["<racm3:break>", "<eoss>", "<reserved08706>", placeholder, "<reserved08799>"]
    extra += [f"<reserved{8800 + n:05d}>" for n in range(1, LUMINA_SIZES + 1)]
    random.Random(0).shuffle(extra)
    tok.add_special_tokens(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(path))
    return TextTokenizer.from_file(path)


def randomize_(module: torch.nn.Module, seed: int, skip: str = "vqmodel") -> None:
    """Weights large enough that a wrong mapping or permutation changes the logits visibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip in name:
                continue
            if "norm" in name or "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def taming(work):
    sd = random_taming_state(seed=1)
    return write_taming(work / "taming", sd), sd


@pytest.fixture(scope="module")
def cham(work, taming):
    """A tiny random HF Chameleon saved with save_pretrained, its tokenizer and VQ encoder."""
    taming_dir, taming_sd = taming
    tok_path = work / "cham_tokenizer.json"
    tok = make_chameleon_tokenizer(tok_path)
    rows = tok.vocab_size + 2 + (tok.vocab_size % 2)  # padding rows past the tokenizer; even for 2-way splits
    cfg = ChameleonConfig(
        vocab_size=rows, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=THETA, rms_norm_eps=1e-5,
        max_position_embeddings=256, vocabulary_map=tok.get_vocab(),
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), attn_implementation="eager",
        vq_config=dict(embed_dim=VQ["embed_dim"], num_embeddings=CODES, latent_channels=VQ["z_channels"],
                       resolution=VQ["resolution"], base_channels=VQ["ch"], channel_multiplier=VQ["ch_mult"],
                       num_res_blocks=VQ["num_res_blocks"], attn_resolutions=VQ["attn_resolutions"]))
    torch.manual_seed(0)
    hf = ChameleonForConditionalGeneration(cfg).eval()
    randomize_(hf, seed=2)
    # HF's VQ encoder takes the taming weights under the same names (strict: proves the names agree).
    hf.model.vqmodel.load_state_dict({k: v for k, v in taming_sd.items() if not k.startswith("decoder.")}, strict=True)
    src = work / "hf_chameleon"
    hf.save_pretrained(src)
    tok.save_pretrained(src)
    return dict(hf=hf, tok=tok, src=src, rows=rows)


@pytest.fixture(scope="module")
def converted(cham, taming, work):
    dst = convert("chameleon-hf", cham["src"], work / "tl_chameleon", vqgan=taming[0])
    return Pipeline.from_pretrained(dst)


def sample_ids(tok: TextTokenizer, vocab, with_image: bool, seed=0) -> torch.Tensor:
    ids = [tok.token_to_id("<s>")] + tok.encode("a red square on a blue field")
    if with_image:
        g = np.random.default_rng(seed)
        codes = g.integers(0, CODES, size=9)
        ids += [vocab.image_begin, *vocab.codes_to_ids(codes).tolist(), vocab.image_end]
        ids += tok.encode("two cats")
    return torch.tensor([ids])


def hf_logits_unmasked(hf, x) -> torch.Tensor:
    # HF's forward sets every image-token logit to the dtype's minimum; the head on its hidden states does not.
    with torch.no_grad():
        return hf.lm_head(hf.model(input_ids=x).last_hidden_state)


# =========================================================================== HF layout


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image_tokens"])
def test_hf_chameleon_logits_match_transformers(cham, converted, with_image):
    hf, tok = cham["hf"], cham["tok"]
    x = sample_ids(tok, converted.vocab, with_image)
    with torch.no_grad():
        ours = converted.model(x)
        masked = hf(input_ids=x).logits
    full = hf_logits_unmasked(hf, x)
    assert ours.shape == full.shape == (1, x.shape[1], cham["rows"])
    assert full.abs().max() > 5  # large enough that a wrong mapping could not hide in the tolerance
    torch.testing.assert_close(ours, full, **TOL)
    # The same on the columns HF does not mask, and HF does mask exactly the image tokens.
    image_cols = torch.tensor(converted.vocab.code_ids)
    keep = torch.ones(cham["rows"], dtype=torch.bool)
    keep[image_cols] = False
    torch.testing.assert_close(ours[..., keep], masked[..., keep], **TOL)
    assert torch.all(masked[..., image_cols] == torch.finfo(masked.dtype).min)


def test_hf_chameleon_vocabulary_and_profile(cham, converted):
    # Chameleon's guidance rows start [bos, image_begin] (Meta's inference code)
    assert converted.unconditional_prompt() == [cham["tok"].token_to_id("<s>")]
    tok, v = cham["tok"], converted.vocab
    assert v.size == cham["rows"]  # padding rows past the tokenizer stay addressable
    assert v.codebook_size == CODES
    assert v.code_ids.tolist() == [tok.token_to_id(image_token_name(c)) for c in range(CODES)]
    assert (v.bos, v.eos, v.image_begin, v.image_end, v.turn_end) == tuple(
        tok.token_to_id(n) for n in ("<s>", "</s>", "<racm3:break>", "<eoss>", "<reserved08706>"))
    c = converted.config
    assert (c.profile, c.layout, c.flat_grid, c.resolution_prompt) == ("chameleon", "flat", (32, 32), False)
    assert (c.image_width, c.guidance_scale) == (32 * 2, 3.0)  # 32 codes x the tiny VQ's factor 2
    assert converted.sampling("text").temperature == 0.7 and converted.sampling("text").repetition_penalty == 1.2
    assert converted.sampling("image").top_p == 0.9 and converted.sampling("image").top_k is None



def test_conversion_record(converted, work, taming):
    record = json.loads((work / "tl_chameleon" / "config.json").read_text())["conversion"]
    assert record["source_kind"] == "chameleon-hf" and record["vq_decoder"] is True
    assert record["vqgan"] == str(taming[0]) and record["dtype"] == "float32" and record["warnings"] == []


def test_vq_encoder_matches_hf_and_decoder_matches_taming_reference(cham, converted, taming):
    _, sd = taming
    vq = converted.image_tokenizer.vqgan
    # No missing or unexpected keys against the published taming layout (loss.* extras dropped).
    assert set(vq.state_dict()) == set(taming_shapes())
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ours = converted.vocab.codes_to_ids(vq.encode(pixels)).reshape(2, -1)
        theirs = cham["hf"].model.get_image_tokens(pixels)
    assert len(set(ours.flatten().tolist())) > 3  # varied codes, not one code everywhere
    assert torch.equal(ours, theirs.long())
    codes = torch.randint(0, CODES, (2, 8, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(vq.decode(codes), ref_decode(sd, codes), rtol=1e-4, atol=1e-5)


def test_hf_without_vqgan_reads_images_but_warns_it_cannot_draw(cham, converted, work):
    with pytest.warns(ConversionWarning, match="can read images but NOT draw"):
        dst = convert("chameleon-hf", cham["src"], work / "tl_no_decoder", dtype="bfloat16")
    pipe = Pipeline.from_pretrained(dst)
    record = json.loads((dst / "config.json").read_text())["conversion"]
    assert record["vq_decoder"] is False and any("NOT draw" in w for w in record["warnings"])
    assert pipe.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert load_file(str(dst / "model.safetensors"))["output.weight"].dtype == torch.bfloat16
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():  # the encoder came from model.vqmodel.*: same codes as the full VQGAN
        assert torch.equal(pipe.image_tokenizer.vqgan.encode(pixels), converted.image_tokenizer.vqgan.encode(pixels))
        flat = pipe.image_tokenizer.vqgan.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    assert torch.all(flat == 0)  # zero-filled decoder: flat grey, never a plausible picture
    x = sample_ids(cham["tok"], pipe.vocab, True)
    with torch.no_grad():  # bf16 weights: same logits within bf16 precision
        torch.testing.assert_close(pipe.model(x).float(), converted.model(x), rtol=0.05, atol=0.5)
    # drawing is refused with a fix, not answered with grey squares; a full conversion can draw
    assert not pipe.image_tokenizer.can_decode and converted.image_tokenizer.can_decode
    with pytest.raises(ValueError, match="cannot draw.*--vqgan"):
        pipe.generate_images("a cat")


# =========================================================================== Meta layout


def to_meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF (rotate_half) -> Meta (adjacent pairs): HF row j*hd/2 + i of a head was Meta row 2i + j."""
    hd = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(hd // 2):
            for j in range(2):
                out[h * hd + 2 * i + j] = w[h * hd + j * hd // 2 + i]
    return out


def hf_variant(hf, mp: int):
    """Copy of `hf` whose q/k norm affines are shared by the heads of each of `mp` ranks (Meta's layout)."""
    v = copy.deepcopy(hf)
    with torch.no_grad():
        for layer in v.model.layers:
            for norm, heads in ((layer.self_attn.q_norm, HEADS), (layer.self_attn.k_norm, KV_HEADS)):
                for p in (norm.weight, norm.bias):
                    per_rank = p.view(mp, heads // mp, HEAD_DIM)[:, :1]
                    p.copy_(per_rank.expand(mp, heads // mp, HEAD_DIM).reshape(heads, HEAD_DIM))
    return v


def write_meta(hf, root: Path, tok_path: Path, taming_dir: Path, mp: int, fused: bool = False) -> Path:
    """Meta's release layout: models/7b/{params.json, consolidated*.pth}, tokenizer/{...}."""
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items() if "vqmodel" not in k}
    model_dir = root / "models" / "7b"
    model_dir.mkdir(parents=True)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir()
    shutil.copy(tok_path, tok_dir / "text_tokenizer.json")
    shutil.copy(taming_dir / "vqgan.ckpt", tok_dir / "vqgan.ckpt")
    shutil.copy(taming_dir / "vqgan.yaml", tok_dir / "vqgan.yaml")
    rows = sd["model.embed_tokens.weight"].shape[0]
    params = {"model": {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV_HEADS,
                        "vocab_size": rows, "norm_eps": 1e-5, "rope_theta": THETA, "qk_normalization": True,
                        "swin_norm": False, "multiple_of": 16, "ffn_dim_multiplier": 0.5},  # -> 48
              "model_parallel_size": mp, "seed": 0}
    (model_dir / "params.json").write_text(json.dumps(params))

    def split(t, dim, r):
        return t.chunk(mp, dim=dim)[r].clone()

    for r in range(mp):
        shard = {"rope.freqs": torch.randn(HEAD_DIM // 2),  # a buffer Meta's checkpoints carry
                 "tok_embeddings.weight": split(sd["model.embed_tokens.weight"], 1, r),
                 "norm.weight": sd["model.norm.weight"], "output.weight": split(sd["lm_head.weight"], 0, r)}
        for i in range(LAYERS):
            p, m = f"model.layers.{i}.", f"layers.{i}."
            wq = split(to_meta_rows(sd[f"{p}self_attn.q_proj.weight"], HEADS), 0, r)
            wk = split(to_meta_rows(sd[f"{p}self_attn.k_proj.weight"], KV_HEADS), 0, r)
            wv = split(sd[f"{p}self_attn.v_proj.weight"], 0, r)
            w1, w3 = split(sd[f"{p}mlp.gate_proj.weight"], 0, r), split(sd[f"{p}mlp.up_proj.weight"], 0, r)
            if fused:
                shard[f"{m}attention.wqkv.weight"] = torch.cat([wq, wk, wv])
                shard[f"{m}feed_forward.w13.weight"] = torch.cat([w1, w3])
            else:
                shard.update({f"{m}attention.wq.weight": wq, f"{m}attention.wk.weight": wk,
                              f"{m}attention.wv.weight": wv, f"{m}feed_forward.w1.weight": w1,
                              f"{m}feed_forward.w3.weight": w3})
            shard[f"{m}attention.wo.weight"] = split(sd[f"{p}self_attn.o_proj.weight"], 1, r)
            shard[f"{m}feed_forward.w2.weight"] = split(sd[f"{p}mlp.down_proj.weight"], 1, r)
            shard[f"{m}attention_norm.weight"] = sd[f"{p}input_layernorm.weight"]
            shard[f"{m}ffn_norm.weight"] = sd[f"{p}post_attention_layernorm.weight"]
            for ours, theirs, heads in (("q_normalization", "q_norm", HEADS), ("k_normalization", "k_norm", KV_HEADS)):
                for w in ("weight", "bias"):
                    vec = sd[f"{p}self_attn.{theirs}.{w}"][r * (heads // mp)]  # this rank's shared affine
                    shard[f"{m}attention.{ours}.{w}"] = to_meta_rows(vec[:, None], 1)[:, 0].clone()
        name = "consolidated.pth" if mp == 1 else f"consolidated.{r:02d}.pth"
        torch.save(shard, model_dir / name)
    return model_dir


HF_TO_TOKENLOOM = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
                   "model.layers": "layers", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                   "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                   "self_attn.q_norm": "attention.q_norm", "self_attn.k_norm": "attention.k_norm",
                   "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                   "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
                   "post_attention_layernorm": "ffn_norm"}


def hf_state_in_tokenloom_names(hf) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in hf.state_dict().items():
        if "vqmodel" in k:
            continue
        for old, new in HF_TO_TOKENLOOM.items():
            k = k.replace(old, new)
        out[k] = v
    return out


@pytest.mark.parametrize("mp, fused", [(1, False), (2, False), (1, True)], ids=["single", "mp2", "fused"])
def test_meta_layout_matches_hf_weights_and_logits(cham, taming, work, mp, fused):
    variant = hf_variant(cham["hf"], mp)
    root = work / f"meta_{mp}_{fused}"
    model_dir = write_meta(variant, root, work / "cham_tokenizer.json", taming[0], mp, fused)
    dst = convert("chameleon-meta", model_dir, root / "out", profile="anole")
    pipe = Pipeline.from_pretrained(dst)
    # Exactly the weights of the HF path: the permutation is exact, so equality, not closeness.
    ours = pipe.model.state_dict()
    reference = hf_state_in_tokenloom_names(variant)
    assert set(ours) == set(reference)
    for k in reference:
        assert torch.equal(ours[k], reference[k]), k
    x = sample_ids(cham["tok"], pipe.vocab, True)
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x), hf_logits_unmasked(variant, x), **TOL)
    assert pipe.config.profile == "anole" and pipe.sampling("text").temperature == 1.0
    assert pipe.image_tokenizer is not None  # tokenizer/vqgan.ckpt: the full VQGAN, decoder included
    assert json.loads((dst / "config.json").read_text())["conversion"]["model_parallel_shards"] == mp


def test_meta_permutation_implements_adjacent_pair_rope(cham, taming, work):
    """Independent of HF: Meta's q.k scores with RoPE on adjacent pairs (complex multiplication, as in
    Meta's reference code) equal tokenloom's rotate_half scores on the converted weights."""
    variant = hf_variant(cham["hf"], 1)
    model_dir = write_meta(variant, work / "meta_rope", work / "cham_tokenizer.json", taming[0], 1)
    meta = torch.load(model_dir / "consolidated.pth", weights_only=True)
    pipe = Pipeline.from_pretrained(convert("chameleon-meta", model_dir, work / "meta_rope_out"))
    x = torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(6))
    pos = torch.arange(6)
    freqs = THETA ** (-torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    rot = torch.polar(torch.ones(6, HEAD_DIM // 2), pos[:, None].float() * freqs)

    def meta_rope(v):  # [T, hd] -> pairs (2i, 2i+1) as complex numbers, rotated
        return torch.view_as_real(torch.view_as_complex(v.reshape(6, -1, 2).contiguous()) * rot).reshape(6, -1)

    attn = pipe.model.layers[0].attention
    # The library's inverse permutation agrees with the test's own, written out element by element.
    assert torch.equal(half_to_interleaved(attn.wq.weight, HEADS), meta["layers.0.attention.wq.weight"])
    assert torch.equal(half_to_interleaved(attn.wk.weight, KV_HEADS), meta["layers.0.attention.wk.weight"])
    cos, sin = rope_cos_sin(pos[None], HEAD_DIM, THETA)
    for h in range(HEADS):
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        kv_rows = slice((h // 2) * HEAD_DIM, (h // 2 + 1) * HEAD_DIM)
        q_m = meta_rope(x @ meta["layers.0.attention.wq.weight"][rows].T)
        k_m = meta_rope(x @ meta["layers.0.attention.wk.weight"][kv_rows].T)
        q_t = apply_rope((x @ attn.wq.weight[rows].T)[None, None], cos, sin)[0, 0]
        k_t = apply_rope((x @ attn.wk.weight[kv_rows].T)[None, None], cos, sin)[0, 0]
        torch.testing.assert_close(q_t @ k_t.T, q_m @ k_m.T, rtol=1e-4, atol=1e-4)


# =========================================================================== Lumina-mGPT


def test_lumina_mgpt_layout_defaults_and_generation(cham, taming, work):
    dst = convert("lumina-mgpt", cham["src"], work / "tl_lumina", vqgan=taming[0], resolution=16)
    pipe = Pipeline.from_pretrained(dst)
    tok, v, c = cham["tok"], pipe.vocab, pipe.config
    assert (c.profile, c.layout, c.resolution_prompt, c.guidance_scale) == ("lumina-mgpt", "unirep", True, 3.0)
    assert (c.image_width, c.image_height, c.max_image_side) == (16, 16, 32)
    img = pipe.sampling("image")
    assert (img.temperature, img.top_k, img.top_p) == (1.0, 2000, None)
    assert pipe.sampling("text").top_k == 10
    assert v.end_of_line == tok.token_to_id("<reserved08799>") and v.size_unit == 2
    assert v.size_token_ids.tolist() == [tok.token_to_id(f"<reserved{8800 + n:05d}>") for n in range(1, 9)]
    assert pipe.unconditional_prompt() == []  # Lumina guides with the image's own start only
    x = sample_ids(tok, v, False)
    with torch.no_grad():  # same weights as chameleon-hf
        torch.testing.assert_close(pipe.model(x), hf_logits_unmasked(cham["hf"], x), **TOL)
    ids = pipe.format.encode(pipe.image_prompt("a red square", 16, 16), generation_role="assistant").ids
    assert tok.decode(ids).count("Generate an image of 16x16 according to the following prompt:\na red square") == 1
    images = pipe.generate_images("a red square", seed=0)
    assert len(images) == 1 and images[0].size == (16, 16)


# =========================================================================== Liquid expansion


def make_llm(root: Path, family: str):
    """A tiny random HF causal LM with its tokenizer files (Llama: untied; Qwen2: tied, padded rows)."""
    tok = TextTokenizer.train(CORPUS, 300, ["<s>", "</s>", "<unk>"] if family == "llama" else ["<|endoftext|>"])
    n = tok.vocab_size
    common = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, rms_norm_eps=1e-6, max_position_embeddings=512)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=n, rope_theta=THETA, bos_token_id=tok.token_to_id("<s>"),
                          eos_token_id=tok.token_to_id("</s>"), **common)
        model = LlamaForCausalLM(cfg)
        tok_cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": None}
    else:
        eot = tok.token_to_id("<|endoftext|>")
        cfg = Qwen2Config(vocab_size=n + 6, rope_theta=THETA, tie_word_embeddings=True, bos_token_id=eot,
                          eos_token_id=eot, **common)
        model = Qwen2ForCausalLM(cfg)
        tok_cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    model.eval()
    randomize_(model, seed=7)
    root.mkdir(parents=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    (root / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return model, tok


@pytest.fixture(scope="module")
def tiny_vq_dir(work):
    cfg = VQGANConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, embed_dim=8,
                      codebook_size=32, resolution=16)
    path = work / "tiny_vq"
    ImageTokenizer.random(cfg, seed=3).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_liquid_expand_keeps_text_logits_and_draws(work, tiny_vq_dir, family):
    hf, tok = make_llm(work / f"base_{family}", family)
    n_text = tok.vocab_size
    if family == "llama":
        dst = expand(work / f"base_{family}", work / f"liquid_{family}", vq=tiny_vq_dir, max_image_side=32)
    else:  # Qwen's bos id is its eos token: tokenloom adds a bos of its own
        with pytest.warns(ConversionWarning, match="no bos token distinct from eos; added <\\|bos\\|>"):
            dst = expand(work / f"base_{family}", work / f"liquid_{family}", vq=tiny_vq_dir, max_image_side=32)
    pipe = Pipeline.from_pretrained(dst)
    v, m = pipe.vocab, pipe.model
    assert v.codebook_size == 32 and v.max_grid_size == 8 and v.size_unit == 1
    assert v.bos == (tok.token_to_id("<s>") if family == "llama" else n_text)  # Qwen: the first new id
    assert v.eos == tok.token_to_id("</s>" if family == "llama" else "<|endoftext|>")
    assert m.config.attention_bias == (family == "qwen2") and m.config.tie_word_embeddings == (family == "qwen2")
    assert m.config.vocab_size == v.size == int(v.code_ids.max()) + 1
    x = torch.tensor([tok.encode("hello world, two cats and a dog")])
    with torch.no_grad():
        ref = hf(input_ids=x).logits
        ours = m(x)
    assert ref.abs().max() > 5
    # Text logits unchanged: every column the base tokenizer can name (the base rows past it may be
    # reused by added tokens); new columns come on top.
    torch.testing.assert_close(ours[..., :n_text], ref[..., :n_text], **TOL)
    new = torch.arange(n_text, v.size)
    base_emb = hf.get_input_embeddings().weight[:n_text]
    expected_row = base_emb.mean(0)
    torch.testing.assert_close(m.tok_embeddings.weight[new], expected_row.expand(len(new), -1), rtol=0, atol=1e-6)
    if family == "llama":
        torch.testing.assert_close(m.output.weight[new], hf.lm_head.weight[:n_text].mean(0).expand(len(new), -1),
                                   rtol=0, atol=1e-6)
    # A well-formed image through the pipeline (random weights, random VQ).
    images = pipe.generate_images("a red square", seed=0)
    assert len(images) == 1 and images[0].size == (16, 16)
    result = pipe.chat("draw a small green circle", mode="image", image_size=(4, 4), seed=1, max_new_tokens=40)
    doc = pipe.format.decode([v.bos, v.role_id("assistant"), *result.ids], strict=True)  # strict: well-formed
    assert [p.codes.shape for p in doc.parts if hasattr(p, "codes")] == [(4, 4)]
    assert len(result.images) == 1 and result.images[0].size == (16, 16)


def test_expand_without_vq_and_codebook_checks(work, tiny_vq_dir):
    base = work / "base_llama"
    if not base.exists():
        make_llm(base, "llama")
    with pytest.warns(ConversionWarning, match="can neither read nor draw images"):
        pipe, record = expand_pipeline(base, codebook_size=16, max_grid_size=4)
    assert pipe.image_tokenizer is None and pipe.vocab.codebook_size == 16 and pipe.vocab.max_grid_size == 4
    assert record["vq_decoder"] is False and record["new_rows"][0] == record["base_tokenizer_ids"]
    with pytest.raises(ConversionError, match="codebook_size=16 but the VQ at .* has 32 codes"):
        expand_pipeline(base, codebook_size=16, vq=tiny_vq_dir)
    with pytest.raises(ConversionError, match="codebook_size is required"):
        expand_pipeline(base)


def test_expand_rejects_what_the_model_cannot_express(work):
    gemma = work / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps({"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh"}))
    with pytest.raises(ConversionError, match="GELU.*1 \\+ weight"):
        expand(gemma, work / "gemma_out", codebook_size=16)
    phi = work / "phi"
    phi.mkdir()
    (phi / "config.json").write_text(json.dumps({"model_type": "phi"}))
    with pytest.raises(ConversionError, match="not supported; supported: llama, mistral, qwen2"):
        expand(phi, work / "phi_out", codebook_size=16)


def test_expand_rejects_rope_scaling(work):
    root = work / "llama31"
    cfg = LlamaConfig(vocab_size=300, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=1,
                      num_attention_heads=HEADS, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 10000.0})
    root.mkdir()
    cfg.save_pretrained(root)
    with pytest.raises(ConversionError, match="RoPE scaling 'linear'"):
        expand(root, work / "llama31_out", codebook_size=16)


# =========================================================================== export


def test_export_round_trip_through_transformers(cham, converted, work):
    dst = export(converted, work / "export_hf")
    hf = ChameleonForConditionalGeneration.from_pretrained(dst).eval()
    x = sample_ids(cham["tok"], converted.vocab, True)
    with torch.no_grad():
        ours = converted.model(x)
        torch.testing.assert_close(hf_logits_unmasked(hf, x), ours, **TOL)
        pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
        ids = converted.vocab.codes_to_ids(converted.image_tokenizer.vqgan.encode(pixels)).reshape(1, -1)
        assert torch.equal(hf.model.get_image_tokens(pixels).long(), ids)
    auto = transformers.AutoTokenizer.from_pretrained(dst)
    text = "two cats and a dog"
    assert auto(text, add_special_tokens=False)["input_ids"] == cham["tok"].encode(text)
    # Back again: identical weights, vocabulary and full VQGAN (the decoder travels in vqgan.ckpt).
    again = Pipeline.from_pretrained(convert("chameleon-hf", dst, work / "export_back", vqgan=dst))
    for k, t in converted.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], t), k
    for k, t in converted.image_tokenizer.vqgan.state_dict().items():
        assert torch.equal(again.image_tokenizer.vqgan.state_dict()[k], t), k
    assert again.vocab == converted.vocab


def test_export_renames_metas_image_placeholder_like_transformers(converted, work):
    # Meta's tokenizer has <reserved08707> where HF's has <image> (same id): the export renames it.
    tok = make_chameleon_tokenizer(work / "meta_style_tokenizer.json", placeholder="<reserved08707>")
    pipe = Pipeline(converted.model, converted.vocab, tok, converted.image_tokenizer, converted.config)
    dst = export(pipe, work / "export_meta_style")
    exported = TextTokenizer.from_file(dst / "tokenizer.json")
    image_id = tok.token_to_id("<reserved08707>")
    assert exported.token_to_id("<image>") == image_id and exported.token_to_id("<reserved08707>") is None
    config = json.loads((dst / "config.json").read_text())
    assert config["image_token_id"] == image_id and config["vocabulary_map"]["<image>"] == image_id
    assert ChameleonForConditionalGeneration.from_pretrained(dst).model.vocabulary_mapping.image_token_id == image_id


def test_export_native_vocabulary_says_what_is_not_exported(work):
    pipe = random_pipeline(seed=2, hidden_size=32, codebook_size=32, image_size=32)
    with pytest.warns(ConversionWarning, match="not a Chameleon tokenizer's.*NOT usable from HF"):
        dst = export(pipe, work / "export_native")
    hf = ChameleonForConditionalGeneration.from_pretrained(dst).eval()
    x = torch.tensor([[pipe.vocab.bos, *pipe.text_tokenizer.encode("a small red circle"), pipe.vocab.image_begin,
                       *pipe.vocab.code_ids[:5].tolist()]])
    with torch.no_grad():
        torch.testing.assert_close(hf_logits_unmasked(hf, x), pipe.model(x), **TOL)
    # HF's image-token mapping sees the codes through the IMGIMG names given to their ids.
    mapping = hf.model.vocabulary_mapping
    assert [mapping.img2bpe[c] for c in range(32)] == pipe.vocab.code_ids.tolist()
    tok = json.loads((dst / "tokenizer.json").read_text())
    names = {t["id"]: t["content"] for t in tok["added_tokens"]}
    assert names[int(pipe.vocab.code_ids[7])] == image_token_name(7)


def test_export_refuses_a_model_without_qk_norm(work, tiny_vq_dir):
    base = work / "base_llama"
    if not base.exists():
        make_llm(base, "llama")
    pipe, _ = expand_pipeline(base, vq=tiny_vq_dir, max_image_side=32)
    with pytest.raises(ConversionError, match="qk_norm=False"):
        export(pipe, work / "export_llama")


# =========================================================================== bad input


def test_missing_files_are_named(work, cham, taming):
    empty = work / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty / "config.json")):
        convert("chameleon-hf", empty, work / "o1")
    with pytest.raises(FileNotFoundError, match=str(empty / "params.json")):
        convert("chameleon-meta", empty, work / "o2")
    no_tok = work / "hf_no_tokenizer"
    shutil.copytree(cham["src"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(no_tok / "tokenizer.json")):
        convert("chameleon-hf", no_tok, work / "o3")
    no_weights = work / "meta_no_weights"
    no_weights.mkdir()
    (no_weights / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 10}))
    with pytest.raises(FileNotFoundError, match="consolidated.pth"):
        convert("chameleon-meta", no_weights, work / "o4")
    with pytest.raises(FileNotFoundError, match=str(work / "nowhere" / "vqgan.ckpt")):
        convert("chameleon-hf", cham["src"], work / "o5", vqgan=work / "nowhere" / "vqgan.ckpt")
    lonely = work / "ckpt_without_yaml"
    lonely.mkdir()
    shutil.copy(taming[0] / "vqgan.ckpt", lonely / "vqgan.ckpt")
    with pytest.raises(FileNotFoundError, match=str(lonely / "vqgan.yaml")):
        convert("chameleon-hf", cham["src"], work / "o5", vqgan=lonely)
    with pytest.raises(ValueError, match="unknown checkpoint kind 'llava'"):
        convert("llava", cham["src"], work / "o6")


@pytest.mark.filterwarnings("ignore::tokenloom.convert.ConversionWarning")  # "no VQGAN decoder": not the point here
def test_wrong_shape_names_the_key(work, cham):
    bad = work / "hf_bad_shape"
    shutil.copytree(cham["src"], bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.self_attn.k_proj.weight"] = sd["model.layers.1.self_attn.k_proj.weight"][:-1].contiguous()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(15, 32\), "
                                              r"expected \(16, 32\)"):
        convert("chameleon-hf", bad, work / "o7")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    sd["model.layers.1.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="does not know: \\['model.layers.1.self_attn.extra.weight'\\]"):
        convert("chameleon-hf", bad, work / "o8")


def test_vocabulary_without_image_tokens(work, cham):
    bad = work / "hf_no_image_tokens"
    shutil.copytree(cham["src"], bad)
    make_chameleon_tokenizer(bad / "tokenizer.json", image_tokens=False)
    with pytest.raises(ConversionError, match="no IMGIMG\\* image tokens"):
        convert("chameleon-hf", bad, work / "o9", vqgan=None)


class Exploit:
    """Unpickling this would create a directory: the proof that nothing ran is that it does not exist."""

    marker = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_objects_is_refused_and_not_executed(work, taming):
    root = work / "meta_evil"
    model_dir = root / "models" / "7b"
    model_dir.mkdir(parents=True)
    (model_dir / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 4, "vocab_size": 400}))
    write_taming(root / "tokenizer", taming[1])
    make_chameleon_tokenizer(root / "tokenizer" / "text_tokenizer.json")
    marker = work / "pwned"
    Exploit.marker = str(marker)
    torch.save({"tok_embeddings.weight": torch.zeros(8, 32), "payload": Exploit()}, model_dir / "consolidated.pth")
    refused = "not a plain state dict.*refused.*posix.mkdir.*Nothing in it was executed"
    with pytest.raises(ConversionError, match=refused):
        convert("chameleon-meta", model_dir, work / "o10")
    assert not marker.exists()
    # Loadable by the restricted unpickler, but not name -> tensor: refused too, naming the entry.
    torch.save({"tok_embeddings.weight": torch.zeros(8, 32), "step": [1, 2]}, model_dir / "consolidated.pth")
    with pytest.raises(ConversionError, match="not a plain state dict.*'step' \\(list\\)"):
        convert("chameleon-meta", model_dir, work / "o11")


def test_destination_must_not_be_the_source_or_non_empty(work, cham):
    with pytest.raises(ConversionError, match="is the source directory"):
        convert("chameleon-hf", cham["src"], cham["src"])
    full = work / "not_empty"
    full.mkdir()
    (full / "something").write_text("x")
    with pytest.raises(ConversionError, match="not empty; pass overwrite=True"):
        convert("chameleon-hf", cham["src"], full)


# =========================================================================== command line


def test_cli_convert_export_and_bad_input(cham, converted, taming, work, capsys):
    from tokenloom.cli import main

    dst = work / "cli_convert"
    assert main(["convert", "--from", "chameleon-hf", str(cham["src"]), str(dst), "--vqgan", str(taming[0])]) == 0
    pipe = Pipeline.from_pretrained(dst)
    for k, t in converted.model.state_dict().items():
        assert torch.equal(pipe.model.state_dict()[k], t), k
    # a non-empty destination is refused unless --overwrite
    assert main(["convert", "--from", "chameleon-hf", str(cham["src"]), str(dst)]) == 2
    assert "cli_convert" in capsys.readouterr().err
    assert main(["export", str(dst), str(work / "cli_export")]) == 0
    assert (work / "cli_export" / "config.json").exists()
    assert main(["convert", "--from", "lumina-mgpt", str(work / "missing"), str(work / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_expand(work, tiny_vq_dir):
    from tokenloom.cli import main

    base = work / "cli_llm_base"
    make_llm(base, "llama")
    dst = work / "cli_expanded"
    assert main(["expand", str(base), str(dst), "--vq", str(tiny_vq_dir)]) == 0
    pipe = Pipeline.from_pretrained(dst)
    assert pipe.vocab.codebook_size == pipe.image_tokenizer.config.codebook_size
    assert main(["expand", str(base), str(work / "cli_expanded2")]) == 2  # neither --codebook-size nor --vq
    assert not (work / "cli_expanded2").exists()
