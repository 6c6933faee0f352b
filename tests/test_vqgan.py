
import pytest
import torch
import torch.nn.functional as F

from tokenloom.vqgan import (
    VQGAN,
    AttnBlock,
    Downsample,
    Upsample,
    VectorQuantizer,
    VQGANConfig,
    load_vqgan_checkpoint,
)

# factor 2, attention at 8x8 (encoder level 1, decoder level 1); codebook 64
TINY = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
            resolution=16, z_channels=8, embed_dim=8, codebook_size=64)
# factor 4, no attention outside the mid blocks
TINY_F4 = dict(base_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(),
               resolution=16, z_channels=4, embed_dim=4, codebook_size=64)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(**{**TINY, **kw})).eval()


@pytest.fixture(scope="module")
def tiny():
    return make()


# ----------------------------------------------------------------------------- config


def test_config_defaults_are_chameleon():
    cfg = VQGANConfig()
    assert (cfg.base_channels, cfg.channel_mult, cfg.z_channels, cfg.embed_dim) == (128, (1, 1, 2, 2, 4), 256, 256)
    assert cfg.codebook_size == 8192 and cfg.resolution == 512 and cfg.attn_resolutions == ()
    assert cfg.downsample_factor == 16
    assert VQGANConfig(**TINY).downsample_factor == 2
    assert VQGANConfig(**TINY_F4).downsample_factor == 4


def test_config_dict_round_trip_and_unknown_keys():
    cfg = VQGANConfig(**TINY)
    d = cfg.to_dict()
    assert d["channel_mult"] == [1, 2]  # JSON friendly
    assert VQGANConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus_key"):
        VQGANConfig.from_dict({**d, "bogus_key": 1})


def test_config_rejects_channels_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="multiple of 32"):
        VQGANConfig(base_channels=48, channel_mult=(1, 2))


CHAMELEON_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 8192
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 512
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 1, 2, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 0, codebook_weight: 1.0}
"""


def test_from_taming_yaml(tmp_path):
    p = tmp_path / "vqgan.yaml"
    p.write_text(CHAMELEON_YAML)
    assert VQGANConfig.from_taming_yaml(p) == VQGANConfig()
    import yaml

    d = yaml.safe_load(CHAMELEON_YAML)
    d["model"]["params"]["ddconfig"].update(ch=64, ch_mult=[1, 2], attn_resolutions=[16], out_ch=1)
    d["model"]["params"]["n_embed"] = 1024
    cfg = VQGANConfig.from_taming_yaml(d)
    assert (cfg.base_channels, cfg.channel_mult, cfg.attn_resolutions) == (64, (1, 2), (16,))
    assert (cfg.out_channels, cfg.codebook_size) == (1, 1024)
    d["model"]["params"]["ddconfig"]["double_z"] = True
    with pytest.raises(ValueError, match="double_z"):
        VQGANConfig.from_taming_yaml(d)
    with pytest.raises(ValueError, match="ddconfig"):
        VQGANConfig.from_taming_yaml({"model": {"params": {}}})


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kw", [TINY, TINY_F4], ids=["f2", "f4"])
@pytest.mark.parametrize("hw", [(16, 16), (32, 16), (16, 48)])
def test_encode_decode_shapes(kw, hw):
    model = make(**kw)
    f = model.downsample_factor
    H, W = hw
    x = torch.rand(2, 3, H, W) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, H // f, W // f) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < model.config.codebook_size
    assert model.embed_codes(codes).shape == (2, model.config.embed_dim, H // f, W // f)
    assert model.decode(codes).shape == (2, 3, H, W)
    assert model(x).reconstruction.shape == (2, 3, H, W)


def test_bad_sizes_raise(tiny):
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny(torch.zeros(1, 3, 16, 17))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        tiny.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="codes must be in"):
        tiny.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match="integer"):
        tiny.decode(torch.zeros(1, 2, 2))


# ----------------------------------------------------------------------------- taming key names


def _conv(p):  # also fits GroupNorm: weight + bias
    return {f"{p}.weight", f"{p}.bias"}


def _resnet(p, shortcut=False):
    keys = _conv(f"{p}.norm1") | _conv(f"{p}.conv1") | _conv(f"{p}.norm2") | _conv(f"{p}.conv2")
    return keys | (_conv(f"{p}.nin_shortcut") if shortcut else set())


def _attn(p):
    return set().union(*(_conv(f"{p}.{n}") for n in ("norm", "q", "k", "v", "proj_out")))


# Written out from taming's Encoder/Decoder for TINY: ch 32, ch_mult (1,2), 1 res block,
# attention at resolution 8 (encoder level 1; decoder level 1, which has 2 blocks).
TINY_TAMING_KEYS = (
    _conv("encoder.conv_in")
    | _resnet("encoder.down.0.block.0")
    | _conv("encoder.down.0.downsample.conv")
    | _resnet("encoder.down.1.block.0", shortcut=True)  # 32 -> 64
    | _attn("encoder.down.1.attn.0")
    | _resnet("encoder.mid.block_1") | _attn("encoder.mid.attn_1") | _resnet("encoder.mid.block_2")
    | _conv("encoder.norm_out") | _conv("encoder.conv_out")
    | _conv("decoder.conv_in")
    | _resnet("decoder.mid.block_1") | _attn("decoder.mid.attn_1") | _resnet("decoder.mid.block_2")
    | _resnet("decoder.up.1.block.0") | _resnet("decoder.up.1.block.1")
    | _attn("decoder.up.1.attn.0") | _attn("decoder.up.1.attn.1")
    | _conv("decoder.up.1.upsample.conv")
    | _resnet("decoder.up.0.block.0", shortcut=True)  # 64 -> 32
    | _resnet("decoder.up.0.block.1")
    | _conv("decoder.norm_out") | _conv("decoder.conv_out")
    | {"quantize.embedding.weight"} | _conv("quant_conv") | _conv("post_quant_conv")
)


def test_state_dict_keys_equal_taming(tiny):
    assert set(tiny.state_dict()) == TINY_TAMING_KEYS


def test_chameleon_config_shapes():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig())
    sd = model.state_dict()
    expect = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (8192, 256),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "encoder.down.4.downsample.conv.weight" not in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert not any(".attn." in k for k in sd)  # attn_resolutions is empty
    assert len([k for k in sd if k.startswith("decoder.up.0.block.")]) == 3 * 8


def _taming_checkpoint(model, seed=1):
    """A Lightning-style checkpoint with taming names, random values and loss.* extras."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sd = {k: torch.randn(shapes[k], generator=g) for k in sorted(TINY_TAMING_KEYS)}
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4, generator=g)
    sd["loss.perceptual_loss.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1, generator=g)
    return {"state_dict": sd, "epoch": 3, "global_step": 1000}


def test_load_taming_state_dict(tiny):
    model = make(seed=5)
    ckpt = _taming_checkpoint(model)
    model.load_taming_state_dict(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k


def test_load_taming_state_dict_errors():
    model = make()
    sd = dict(_taming_checkpoint(model)["state_dict"])
    bad = {**sd, "quant_conv.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(ValueError, match=r"shape mismatch.*quant_conv\.weight.*\(8, 8, 3, 3\)"):
        model.load_taming_state_dict(bad)
    missing = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
    with pytest.raises(ValueError, match=r"missing.*decoder\.conv_out\.bias"):
        model.load_taming_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.extra\.weight"):
        model.load_taming_state_dict({**sd, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="name -> tensor"):
        model.load_taming_state_dict({**sd, "quant_conv.bias": [0.0] * 8})


# ----------------------------------------------------------------------------- quantizer


def test_quantizer_picks_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8)
    torch.nn.init.normal_(vq.embedding.weight)  # spread out so the choice is non-trivial
    z = torch.randn(2, 8, 3, 5)
    codes = vq.nearest(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    dist = ((flat[:, None, :] - vq.embedding.weight[None]) ** 2).sum(-1)  # brute force [N,64]
    chosen = dist.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.allclose(chosen, dist.min(1).values, atol=1e-5)
    assert torch.equal(codes.reshape(-1), dist.argmin(1))
    assert codes.unique().numel() > 5
    assert torch.equal(vq.lookup(codes), vq.embedding.weight[codes].permute(0, 3, 1, 2))


def test_forward_codes_match_encode_and_losses(tiny):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = tiny(x)
    assert torch.equal(out.codes, tiny.encode(x))
    z = tiny.quant_conv(tiny.encoder(x))
    z_q = tiny.embed_codes(out.codes)
    mse = F.mse_loss(z, z_q)
    assert torch.allclose(out.codebook_loss, mse)
    assert torch.allclose(out.commitment_loss, 0.25 * mse)
    assert torch.allclose(tiny(x, beta=1.0).commitment_loss, mse)
    # straight-through output equals the quantized latents, so forward == decode(codes)
    assert torch.allclose(out.reconstruction, tiny.decode(out.codes), atol=1e-5)


def test_decode_is_deterministic(tiny):
    codes = torch.randint(0, 64, (2, 4, 6), generator=torch.Generator().manual_seed(0))
    a, b = tiny.decode(codes), tiny.decode(codes)
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # different codes -> different pixels


def test_straight_through_gradients():
    model = make(seed=2).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        g = lambda p: 0.0 if p.grad is None else p.grad.abs().sum().item()  # noqa: E731
        return g(model.encoder.conv_in.weight), g(model.quantize.embedding.weight), g(model.decoder.conv_in.weight)

    enc, emb, dec = grads(lambda o: o.reconstruction.square().mean())
    assert enc > 0 and dec > 0, "reconstruction gradient must pass the quantizer to the encoder"
    assert emb == 0  # the codebook only learns from the codebook loss
    enc, emb, dec = grads(lambda o: o.codebook_loss)
    assert enc == 0 and emb > 0 and dec == 0
    enc, emb, dec = grads(lambda o: o.commitment_loss)
    assert enc > 0 and emb == 0 and dec == 0


# ----------------------------------------------------------------------------- building blocks


def test_downsample_pads_right_and_bottom():
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap
        down.conv.bias.zero_()
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    # with (0,1,0,1) padding the top-left tap of output (i,j) sits on input (2i,2j)
    assert torch.equal(down(x), x[..., ::2, ::2])


def test_upsample_is_nearest_then_conv():
    up = Upsample(1)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity kernel
        up.conv.bias.zero_()
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    assert torch.equal(up(x), x.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_attn_block_matches_taming_formula():
    torch.manual_seed(0)
    blk = AttnBlock(32)
    x = torch.randn(2, 32, 3, 5)
    hn = blk.norm(x)
    q, k, v = (p(hn).reshape(2, 32, 15) for p in (blk.q, blk.k, blk.v))
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 32 ** -0.5, dim=2)  # [b, q, k]
    ref = x + blk.proj_out(torch.bmm(v, w.transpose(1, 2)).reshape(2, 32, 3, 5))
    assert torch.allclose(blk(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoint files

EXECUTED = []


def _side_effect():
    EXECUTED.append(True)
    return "boom"


class Malicious:
    def __reduce__(self):  # unpickling would call _side_effect
        return (_side_effect, ())


def test_load_vqgan_checkpoint_plain_and_lightning(tmp_path):
    cfg = VQGANConfig(**TINY)
    src = make(seed=3)
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    loaded = load_vqgan_checkpoint(tmp_path / "plain.pt", cfg)
    assert not loaded.training
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ckpt = _taming_checkpoint(src)
    torch.save(ckpt, tmp_path / "vqgan.ckpt")
    loaded = load_vqgan_checkpoint(tmp_path / "vqgan.ckpt", cfg)
    assert torch.equal(loaded.quantize.embedding.weight, ckpt["state_dict"]["quantize.embedding.weight"])


def test_load_vqgan_checkpoint_rejects_pickled_objects(tmp_path):
    sd = make().state_dict()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "callback": Malicious()}, path)
    with pytest.raises(ValueError, match="weights_only") as e:
        load_vqgan_checkpoint(path, VQGANConfig(**TINY))
    assert str(path) in str(e.value)
    assert EXECUTED == []


def test_load_vqgan_checkpoint_errors(tmp_path):
    cfg = VQGANConfig(**TINY)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_vqgan_checkpoint(tmp_path / "nope.ckpt", cfg)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        load_vqgan_checkpoint(tmp_path / "list.pt", cfg)
    (tmp_path / "junk.ckpt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_vqgan_checkpoint(tmp_path / "junk.ckpt", cfg)
    wrong = make(codebook_size=128).state_dict()
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"wrong\.pt.*quantize\.embedding\.weight"):
        load_vqgan_checkpoint(tmp_path / "wrong.pt", cfg)


def test_local_encoder_leaves_far_latents_alone_with_the_same_weights():
    plain = make(**TINY_F4)
    local = make(**TINY_F4, local_encoder=True)
    assert set(local.state_dict()) == set(plain.state_dict())  # taming's keys: weights move across
    local.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    y = x.clone()
    y[..., :8, :8] = 1.0  # repaint the top-left corner
    for model, far_moves in ((plain, True), (local, False)):
        moved = (model._latents(y) - model._latents(x)).abs().amax(1)[0] > 0
        assert bool(moved[0, 0])
        assert bool(moved[-8:, -8:].any()) is far_moves  # GroupNorm and attention reach every cell
    with pytest.raises(ValueError, match="local_encoder has no attention"):
        VQGANConfig(**{**TINY, "local_encoder": True})
