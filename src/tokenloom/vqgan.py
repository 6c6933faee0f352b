"""VQGAN image tokenizer with the taming-transformers / Chameleon module layout.

Module and parameter names follow taming's ``VQModel`` exactly, so the state dict of
Chameleon's ``vqgan.ckpt`` (and other taming VQGANs) loads without renaming.

    pixels [B,3,H,W] -> encoder -> quant_conv -> quantize -> codes [B,H/f,W/f]
    codes -> embedding -> post_quant_conv -> decoder -> pixels
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VQGANConfig:
    # Defaults are Chameleon's vqgan.yaml (f16, 8192 codes of dim 256, 512px training).
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 512  # only decides where attention blocks go, not the input size
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 8192
    dropout: float = 0.0
    commitment_beta: float = 0.25
    # Not in taming: an encoder with no image-wide operation (per-position channel norms instead of
    # GroupNorm, no mid attention), so a code depends only on the pixels its convolutions reach and
    # an edit leaves far cells' codes as they were. Same state-dict keys; the attention weights go
    # unused.
    local_encoder: bool = False

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level")
        for m in self.channel_mult:
            # every GroupNorm in the encoder/decoder has 32 groups
            if m <= 0 or (self.base_channels * m) % 32 != 0:
                raise ValueError(
                    f"base_channels * channel_mult must be a positive multiple of 32 "
                    f"(GroupNorm(32)); got base_channels={self.base_channels}, mult={m}"
                )
        if self.local_encoder and self.attn_resolutions:
            raise ValueError("local_encoder has no attention: attn_resolutions must be empty")
        for name in ("in_channels", "out_channels", "num_res_blocks", "resolution",
                     "z_channels", "embed_dim", "codebook_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VQGANConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys: {unknown} (known: {sorted(known)})")
        return cls(**d)

    @classmethod
    def from_taming_yaml(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> VQGANConfig:
        """Read a taming / Chameleon ``vqgan.yaml`` (model.params.{ddconfig,n_embed,embed_dim})."""
        if isinstance(path_or_dict, Mapping):
            cfg = path_or_dict
        else:
            import yaml

            with open(path_or_dict, encoding="utf-8") as f:
                cfg = yaml.safe_load(f)
        # accept the full file, its model section, or just model.params
        params = cfg
        if isinstance(params, Mapping) and "model" in params:
            params = params["model"]
        if isinstance(params, Mapping) and "params" in params:
            params = params["params"]
        if not isinstance(params, Mapping) or "ddconfig" not in params:
            raise ValueError("not a taming VQGAN config: expected model.params.ddconfig")
        dd = params["ddconfig"]
        if dd.get("double_z", False):
            # double_z is for KL autoencoders; a VQ model with it cannot feed quant_conv
            raise ValueError("double_z=true is not a VQGAN config (it is used by KL autoencoders)")
        return cls(
            in_channels=dd.get("in_channels", 3),
            out_channels=dd.get("out_ch", 3),
            base_channels=dd["ch"],
            channel_mult=tuple(dd["ch_mult"]),
            num_res_blocks=dd["num_res_blocks"],
            attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
            resolution=dd["resolution"],
            z_channels=dd["z_channels"],
            embed_dim=params["embed_dim"],
            codebook_size=params["n_embed"],
            dropout=float(dd.get("dropout", 0.0)),
        )


# ----------------------------------------------------------------------------- building blocks


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels at each position, with GroupNorm's parameter names and shapes."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # taming only creates the 1x1 shortcut when the width changes
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B,C,H,W] -> [B,1,HW,C]: one head of width C; SDPA's default scale is C**-0.5 as in taming
        q, k, v = (p(hn).reshape(b, 1, c, h * w).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # taming pads right/bottom only; pretrained weights depend on this alignment
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Holder giving taming's ``down.{i}.block.{j}`` / ``.attn.{j}`` / ``.downsample`` names."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)
        self.attend = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block_1(x)
        return self.block_2(self.attn_1(h) if self.attend else h)


def _run_level(level: _Level, h: torch.Tensor) -> torch.Tensor:
    has_attn = len(level.attn) > 0  # attention is either after every block of a level or none
    for i, block in enumerate(level.block):
        h = block(h)
        if has_attn:
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, res = ch, cfg.resolution
        for i, m in enumerate(mult):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * m, cfg.dropout))
                block_in = ch * m
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, cfg.dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)
        if cfg.local_encoder:
            self.mid.attend = False
            for module in list(self.modules()):
                for name, child in module.named_children():
                    if isinstance(child, nn.GroupNorm):
                        setattr(module, name, ChannelNorm(child.num_channels, child.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_mult
        block_in = ch * mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, cfg.dropout)
        # built lowest resolution first (taming's order, so attention placement matches),
        # then stored so that up[i] is level i
        levels: list[_Level] = []
        for i in reversed(range(len(mult))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * mult[i], cfg.dropout))
                block_in = ch * mult[i]
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup (taming's VectorQuantizer2, without index remapping)."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D,h,w] -> codes [B,h,w] of the closest codebook vector in L2."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        # Upcast so near-ties in low precision do not flip the argmin.
        flat, emb = flat.float(), self.embedding.weight.float()
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e  (the ||z||^2 term is constant per row)
        dist = emb.pow(2).sum(1)[None, :] - 2 * flat @ emb.t()
        return dist.argmin(dim=1).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,h,w] -> z_q [B,D,h,w]."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor, beta: float):
        codes = self.nearest(z)
        z_q = self.lookup(codes)
        # VQ-VAE losses: the codebook moves to the encoder output; the encoder commits to its code
        codebook_loss = F.mse_loss(z_q, z.detach())
        commitment_loss = beta * F.mse_loss(z, z_q.detach())
        # straight-through estimator: forward uses z_q, backward copies the gradient to z
        z_q = z + (z_q - z).detach()
        return z_q, codes, codebook_loss, commitment_loss


class VQOutput(NamedTuple):
    reconstruction: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor  # already multiplied by beta
    codes: torch.Tensor


class VQGAN(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected pixels [B,{self.config.in_channels},H,W], got {tuple(pixels.shape)}"
            )
        f = self.downsample_factor
        h, w = pixels.shape[-2:]
        if h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"image size {h}x{w} (HxW) must be a positive multiple of {f}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.ndim != 3:
            raise ValueError(f"expected codes [B,h,w], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        n = self.config.codebook_size
        if codes.numel() and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"codes must be in [0, {n}); got range "
                             f"[{int(codes.min())}, {int(codes.max())}]")

    def _latents(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check_pixels(pixels)
        return self.quant_conv(self.encoder(pixels))

    @torch.no_grad()  # codes are discrete: no gradient can flow, so keep no activations
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [-1,1] -> codes [B,H/f,W/f] (int64)."""
        return self.quantize.nearest(self._latents(pixels))

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,h,w] -> quantized latents [B,embed_dim,h,w]."""
        self._check_codes(codes)
        return self.quantize.lookup(codes.long())

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B,h,w] -> pixels [B,3,h*f,w*f] (roughly in [-1,1], not clamped)."""
        return self.decode_latents(self.embed_codes(codes))

    def forward(self, pixels: torch.Tensor, beta: float | None = None) -> VQOutput:
        beta = self.config.commitment_beta if beta is None else beta
        z_q, codes, codebook_loss, commitment_loss = self.quantize(self._latents(pixels), beta)
        return VQOutput(self.decode_latents(z_q), codebook_loss, commitment_loss, codes)

    def load_taming_state_dict(self, obj: Mapping[str, Any]) -> VQGAN:
        """Load a taming/Chameleon state dict (plain, or Lightning's {"state_dict": ...}).

        ``loss.*`` entries (LPIPS and discriminator weights) are dropped; everything else
        must match exactly, otherwise a ValueError describes the difference.
        """
        sd = _extract_state_dict(obj)
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        mismatched = [
            f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(sd) & set(own))
            if sd[k].shape != own[k].shape
        ]
        if missing or unexpected or mismatched:
            parts = []
            for name, items in (("missing", missing), ("unexpected", unexpected),
                                ("shape mismatch", mismatched)):
                if items:
                    more = f" ... (+{len(items) - 5} more)" if len(items) > 5 else ""
                    parts.append(f"{len(items)} {name}: {items[:5]}{more}")
            raise ValueError("VQGAN state dict does not match the config; " + "; ".join(parts))
        self.load_state_dict(sd, strict=True)
        return self


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # Lightning checkpoint
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("loss."))}
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state dict entries must be name -> tensor; bad entries: {bad[:5]}")
    return sd


def _load_failure_reason(e: Exception) -> str:
    # torch's weights_only message is long; keep just the unpickler's reason
    msg = str(e)
    marker = "WeightsUnpickler error:"
    if marker in msg:
        reason = msg.split(marker, 1)[1].strip().split("\n\n")[0]
        return reason.split(". Please")[0].strip()
    first = msg.strip().splitlines()[0] if msg.strip() else "empty or truncated file"
    return f"{type(e).__name__}: {first}"


def load_vqgan_checkpoint(path: str | os.PathLike, config: VQGANConfig) -> VQGAN:
    """Build a VQGAN and load a taming/Chameleon ``.ckpt``/``.pt`` checkpoint on CPU.

    Uses ``weights_only=True``: checkpoints that pickle arbitrary Python objects are refused
    rather than executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError,
            AttributeError, ImportError) as e:
        raise ValueError(
            f"{path} is not a plain tensor checkpoint loadable with weights_only=True "
            f"(it may contain pickled Python objects, or be corrupt): {_load_failure_reason(e)}. "
            f"Convert it to a plain state dict (e.g. safetensors) in a trusted environment."
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    model = VQGAN(config)
    try:
        model.load_taming_state_dict(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return model.eval()
