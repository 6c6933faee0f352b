"""Image <-> VQGAN code conversion with Chameleon's preprocessing.

preprocess: whiten transparency -> RGB -> resize to cover the target box (LANCZOS)
            -> centre crop -> [-1,1] float32 [3,H,W]
postprocess: clamp [-1,1] -> uint8 (rounded) RGB image
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .vqgan import VQGAN, VQGANConfig

WEIGHTS_NAME = "vq.safetensors"
CONFIG_NAME = "vq_config.json"


class ImageLoadError(ValueError):
    pass


def decoded(img: Image.Image) -> Image.Image:
    """An opened image decoded now (truncated or corrupt data fails here, not later), turned the way
    viewers show it (EXIF orientation), as RGB, or RGBA when it has transparency."""
    img.load()
    img = ImageOps.exif_transpose(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    return img.convert("RGBA" if has_alpha else "RGB")


def load_image(path: str | os.PathLike, max_pixels: int = 64_000_000) -> Image.Image:
    """Open and fully decode an image; returns RGB, or RGBA when it has transparency.

    ``max_pixels`` bounds memory before decoding (the header gives the size).
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"cannot load image {path}: file not found")
    if not path.is_file():
        raise ImageLoadError(f"cannot load image {path}: not a regular file")
    try:
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ImageLoadError(
                    f"cannot load image {path}: {img.width}x{img.height} exceeds {max_pixels} pixels"
                )
            return decoded(img)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot load image {path}: {type(e).__name__}: {e}") from e


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_image_size(width: int, height: int, factor: int, max_side: int = 1024) -> None:
    """Validate a requested image size for a VQGAN with downsampling ``factor``."""
    _check_positive_int("factor", factor)
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    if width % factor or height % factor:
        raise ValueError(f"image size {width}x{height} (WxH) must be a multiple of {factor}")
    if width > max_side or height > max_side:
        raise ValueError(f"image size {width}x{height} (WxH) exceeds the maximum side {max_side}")


def whiten_transparency(image: Image.Image) -> Image.Image:
    """Alpha-blend onto white and return RGB (Chameleon's handling of transparency)."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    if (alpha == 1.0).all():
        return image.convert("RGB")
    rgb = alpha * rgba[..., :3] + (1.0 - alpha) * 255.0
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def preprocess(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL image -> float32 [3,height,width] in [-1,1], resized to cover then centre-cropped."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    _check_positive_int("width", width)
    _check_positive_int("height", height)
    img = whiten_transparency(image)
    # smallest scale at which the image covers the box; for a square box: short side -> size
    scale = max(width / img.width, height / img.height)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, Image.Resampling.LANCZOS)
    x0, y0 = (img.width - width) // 2, (img.height - height) // 2
    img = img.crop((x0, y0, x0 + width, y0 + height))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def postprocess(tensor: torch.Tensor) -> Image.Image | list[Image.Image]:
    """[3,H,W] (or [B,3,H,W]) in [-1,1] -> RGB image (or list of images)."""
    if tensor.ndim == 4:
        return [postprocess(t) for t in tensor]
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected [3,H,W] or [B,3,H,W], got {tuple(tensor.shape)}")
    # numpy has no bfloat16, so convert to float32 on the way out
    x = tensor.detach().float().clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy(), "RGB")


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


class ImageTokenizer:
    """A VQGAN plus Chameleon-style image processing: images <-> grids of codes."""

    def __init__(self, vqgan: VQGAN, config: VQGANConfig | None = None, max_side: int = 1024,
                 batch_size: int = 8):
        if config is not None and config != vqgan.config:
            raise ValueError("config does not match vqgan.config")
        self.vqgan = vqgan
        self.config = vqgan.config
        self.max_side = max_side
        self.batch_size = batch_size
        # False for a VQGAN whose decoder was never loaded (HF Chameleon checkpoints drop it):
        # it reads images, and drawing with it is refused rather than returning grey squares.
        self.can_decode = True

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, images: Image.Image | Sequence[Image.Image], width: int = 512,
               height: int = 512) -> list[np.ndarray]:
        """Images -> list of int64 code grids [height/f, width/f]."""
        check_image_size(width, height, self.factor, self.max_side)
        if isinstance(images, Image.Image):
            images = [images]
        device, dtype = _module_device_dtype(self.vqgan)
        out: list[np.ndarray] = []
        for i in range(0, len(images), self.batch_size):
            batch = torch.stack([preprocess(im, width, height) for im in images[i:i + self.batch_size]])
            with torch.no_grad():
                codes = self.vqgan.encode(batch.to(device=device, dtype=dtype))
            out.extend(c.numpy() for c in codes.cpu().long())
        return out

    def decode(self, codes) -> list[Image.Image]:
        """Code grid(s) [h,w] (numpy or tensor; one or a list) -> list of RGB images."""
        if isinstance(codes, (np.ndarray, torch.Tensor)) and codes.ndim == 2:
            codes = [codes]
        grids = [torch.as_tensor(np.asarray(c) if not isinstance(c, torch.Tensor) else c) for c in codes]
        for g in grids:
            if g.ndim != 2:
                raise ValueError(f"each code grid must be 2-D [h,w], got shape {tuple(g.shape)}")
            if g.shape[0] * self.factor > self.max_side or g.shape[1] * self.factor > self.max_side:
                raise ValueError(f"code grid {tuple(g.shape)} decodes beyond max_side {self.max_side}")
        device, _ = _module_device_dtype(self.vqgan)
        # group by shape so equal-sized grids share a batch; keep the caller's order
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_shape.setdefault(tuple(g.shape), []).append(i)
        images: list[Image.Image | None] = [None] * len(grids)
        for idx in by_shape.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                batch = torch.stack([grids[i] for i in chunk]).to(device)
                with torch.no_grad():
                    pixels = self.vqgan.decode(batch)
                for i, im in zip(chunk, postprocess(pixels)):
                    images[i] = im
        return images  # type: ignore[return-value]

    def save_pretrained(self, directory: str | os.PathLike, *, allow_non_finite: bool = False) -> None:
        """Write vq.safetensors, then vq_config.json, each under a temporary name renamed over the
        final one; weights holding NaN or inf raise NonFiniteError before anything is written
        (allow_non_finite=True: a warning, and they are written).

        Each file is replaced atomically, the pair is not: an interrupted save leaves every file
        whole, either the previous save's or this one's, so the directory holds the previous pair,
        or (interrupted between the two renames) the new vq.safetensors beside the previous
        vq_config.json, or the new pair. In the mixed case a changed config makes loading fail on
        mismatched shapes, or pairs the new weights with the old settings: save again. An exception
        or KeyboardInterrupt removes the temporary file; a killed process (SIGKILL, power loss) can
        leave a hidden `.vq.safetensors.*.tmp` or `.vq_config.json.*.tmp` behind."""
        from .checkpoint import atomic_save_safetensors, atomic_write_bytes, check_finite

        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.vqgan.state_dict().items()}
        check_finite(tensors, directory / WEIGHTS_NAME, allow_non_finite)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(self.config.to_dict(), indent=2) + "\n").encode())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> ImageTokenizer:
        """Read what save_pretrained wrote; warns (naming the file and tensor) about weights
        holding NaN or inf, as `checkpoint.load_weights` does."""
        from .checkpoint import load_tensors

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"image tokenizer file not found: {directory / name}")
        config = VQGANConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        vqgan = VQGAN(config)
        vqgan.load_taming_state_dict(load_tensors(directory / WEIGHTS_NAME))
        vqgan.to(device=device, dtype=dtype).eval()
        return cls(vqgan)

    @classmethod
    def random(cls, config: VQGANConfig, seed: int = 0) -> ImageTokenizer:
        """Randomly initialised tokenizer (for tests); does not disturb the global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vqgan = VQGAN(config)
        return cls(vqgan.eval())
