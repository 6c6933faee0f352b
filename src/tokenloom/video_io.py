"""Reading and writing videos as frames, through Pillow.

A video on disk is an animated GIF or WebP file, or a folder of PNG/JPEG frames (taken in natural
name order: frame-2 before frame-10). Every frame is read as RGB, transparency blended onto white
as for still images; all frames of a video have one size.

GIF and WebP writers store a run of identical frames once, shown for longer, so a video that holds
still would come back shorter. `write_video` therefore records its frame rate in the file (a GIF
comment, a WebP EXIF description) and `read_video` splits such a frame back into its repeats; a file
from elsewhere, without that record, is read one frame per stored frame.

Exactness: a WebP is written lossless, so its frames read back as written. A GIF holds at most 256
colours per frame: frames with few flat colours (those of the shapes world) come back exactly,
frames with more (photos, decoded model output) are quantised. Use WebP or a folder when the pixels
must survive.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .document import MAX_FRAMES
from .image_processing import decoded, load_image, whiten_transparency

VIDEO_FORMATS = {"GIF": ".gif", "WEBP": ".webp"}  # Pillow's format name -> the suffix written
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_FPS = 50  # GIF durations are whole hundredths of a second: above this, repeats could be miscounted
MIN_FPS = 0.1  # a GIF delay is at most 655 s: a still run of 64 frames must fit in one
MAX_PIXELS = 64_000_000  # per frame, as for still images: bounds memory before decoding
_FPS_TAG = "tokenloom video fps="
_EXIF_DESCRIPTION = 0x010E  # the EXIF ImageDescription tag, where a WebP keeps the frame rate


def _natural_key(path: Path) -> list:
    # Digit runs compare as numbers; the split alternates text and digits, so lists compare like with like.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)] + [path.name]


def _check_count(path: Path, count: int, min_frames: int, max_frames: int) -> None:
    if count > max_frames:
        raise ValueError(f"cannot read video {path}: it has {count} frames, more than the {max_frames} a video may "
                         f"have (cut it into shorter clips, or keep every n-th frame)")
    if count < min_frames:
        raise ValueError(f"cannot read video {path}: it has {count} frame{'s' if count != 1 else ''}, "
                         f"at least {min_frames} are needed")


def frame_files(folder: str | os.PathLike, *, max_frames: int = MAX_FRAMES) -> list[Path]:
    """The frame files of a video folder in natural name order; ValueError when it holds none, more
    than `max_frames`, or anything but PNG/JPEG files (hidden files aside)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"cannot read video {folder}: not a folder")
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    # A stray file may be a frame in another format: refusing it beats silently leaving a gap.
    others = sorted(p.name for p in entries if not p.is_file() or p.suffix.lower() not in FRAME_SUFFIXES)
    if others:
        raise ValueError(f"cannot read video {folder}: {others[0]!r} is not a PNG or JPEG frame (a video folder holds "
                         f"only its frames)")
    if not entries:
        raise ValueError(f"cannot read video {folder}: the folder holds no PNG or JPEG frames")
    _check_count(folder, len(entries), 1, max_frames)
    return sorted(entries, key=_natural_key)


def read_frames(paths: Sequence[str | os.PathLike]) -> list[Image.Image]:
    """Load image files as the frames of one video (RGB); ValueError naming the file for an unreadable
    one or frames of different sizes."""
    frames, first = [], None
    for path in paths:
        frame = whiten_transparency(load_image(path, max_pixels=MAX_PIXELS))
        if first is None:
            first = (path, frame.size)
        elif frame.size != first[1]:
            raise ValueError(f"video frame {path} is {frame.width}x{frame.height} but {first[0]} is "
                             f"{first[1][0]}x{first[1][1]}: a video's frames must all be one size")
        frames.append(frame)
    return frames


def _open_animation(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read video {path}: not an image or video file ({type(e).__name__})") from None
    if image.format not in VIDEO_FORMATS:
        image.close()
        raise ValueError(f"cannot read video {path}: a {image.format} image is not a video (a video is an animated "
                         f"GIF or WebP file, or a folder of PNG/JPEG frames)")
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise ValueError(f"cannot read video {path}: {image.width}x{image.height} frames exceed {MAX_PIXELS} pixels")
    return image


def stored_frames(path: str | os.PathLike, *, max_frames: int = MAX_FRAMES) -> int:
    """Frames a GIF/WebP file stores (read from its headers, nothing decoded), or a folder's frame
    files; ValueError when it is neither or stores more than `max_frames`. A file written by
    `write_video` may read back as more (repeated frames are stored once)."""
    path = Path(path)
    if path.is_dir():
        return len(frame_files(path, max_frames=max_frames))
    if not path.is_file():
        raise ValueError(f"cannot read video {path}: no such file or folder")
    with _open_animation(path) as image:
        count = getattr(image, "n_frames", 1)
    _check_count(path, count, 1, max_frames)
    return count


def _recorded_fps(image: Image.Image) -> float | None:
    """The frame rate `write_video` recorded in the file, if it was written so."""
    tag = image.info.get("comment", b"") if image.format == "GIF" else image.getexif().get(_EXIF_DESCRIPTION, "")
    if isinstance(tag, bytes):
        tag = tag.decode("utf-8", "replace")
    if not isinstance(tag, str) or not tag.startswith(_FPS_TAG):
        return None
    try:
        fps = float(tag[len(_FPS_TAG):])
    except ValueError:
        return None
    return fps if MIN_FPS <= fps <= MAX_FPS else None


def read_video(path: str | os.PathLike, *, min_frames: int = 1, max_frames: int = MAX_FRAMES) -> list[Image.Image]:
    """The frames of an animated GIF/WebP file or a folder of PNG/JPEG frames, as RGB images of one size.

    ValueError naming the file for: no such path, not an image or video file, a still image, frames of
    different sizes, an empty folder, fewer than `min_frames` or more than `max_frames` frames.
    """
    path = Path(path)
    if path.is_dir():
        frames = read_frames(frame_files(path, max_frames=max_frames))
        _check_count(path, len(frames), min_frames, max_frames)
        return frames
    if not path.is_file():
        raise ValueError(f"cannot read video {path}: no such file or folder")
    with _open_animation(path) as image:
        return animation_frames(image, path, min_frames=min_frames, max_frames=max_frames)


def animation_frames(image: Image.Image, where, *, min_frames: int = 1,
                     max_frames: int = MAX_FRAMES) -> list[Image.Image]:
    """The frames of an open animated GIF/WebP image (RGB, transparency on white), each repeated as the
    frame rate `write_video` recorded says; ValueError naming `where` as `read_video` does."""
    stored = getattr(image, "n_frames", 1)
    _check_count(where, stored, 1, max_frames)  # before decoding anything: repeats only add frames
    fps = _recorded_fps(image)
    frames: list[Image.Image] = []
    try:
        for index in range(stored):
            image.seek(index)
            frame = whiten_transparency(decoded(image))
            repeats = 1 if fps is None else max(1, round(image.info.get("duration", 0) * fps / 1000))
            frames += [frame] * repeats  # one image object per repeat is enough: frames are not mutated
            if len(frames) > max_frames:
                break
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ValueError(f"cannot read video {where}: frame {len(frames)}: {type(e).__name__}: {e}") from None
    _check_count(where, len(frames), min_frames, max_frames)
    return frames


def write_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 4) -> Path:
    """Write frames as an animated GIF (``.gif``), a lossless WebP (``.webp``), or, for a path without
    a suffix or an existing folder, a folder of ``frame-000.png``... (replacing the folder's older
    ``frame-*.png``). Returns the path. A GIF quantises frames of more than 256 colours (see the
    module docstring); a folder keeps no frame rate."""
    path = Path(path)
    frames = _checked(frames, fps, f"cannot write video {path}")
    suffix = path.suffix.lower()
    if suffix in (".gif", ".webp"):
        path.write_bytes(animation_bytes(frames, suffix[1:], fps))
        return path
    if suffix and not path.is_dir():
        raise ValueError(f"cannot write video {path}: unknown video suffix {path.suffix!r} (write .gif, .webp, or "
                         f"a folder of frames: a path without a suffix)")
    path.mkdir(parents=True, exist_ok=True)
    # Older frames past the new last one would be read back as part of this video.
    for old in path.glob("frame-*.png"):
        old.unlink()
    digits = max(3, len(str(len(frames) - 1)))
    for i, frame in enumerate(frames):
        frame.save(path / f"frame-{i:0{digits}d}.png")
    return path


def animation_bytes(frames: Sequence[Image.Image], format: str = "gif", fps: float = 4) -> bytes:
    """The frames as an animated GIF or lossless WebP file's bytes (`format` "gif" or "webp"), the frame
    rate recorded so that `read_video` gives repeated frames back."""
    if format not in ("gif", "webp"):
        raise ValueError(f"format must be 'gif' or 'webp', got {format!r}")
    frames = _checked(frames, fps, f"cannot encode a {format.upper()} video")
    tag = f"{_FPS_TAG}{float(fps)!r}"
    options: dict = {"comment": tag.encode()} if format == "gif" else {"lossless": True, "exif": _exif(tag)}
    buf = io.BytesIO()
    frames[0].save(buf, format=format.upper(), save_all=True, append_images=frames[1:], duration=1000 / fps,
                   loop=0, **options)
    return buf.getvalue()


def _checked(frames: Sequence[Image.Image], fps: float, what: str) -> list[Image.Image]:
    """The frames, transparency whitened, or ValueError / TypeError starting with `what`."""
    frames = list(frames)
    if not frames:
        raise ValueError(f"{what}: no frames")
    bad = next((i for i, f in enumerate(frames) if not isinstance(f, Image.Image)), None)
    if bad is not None:
        raise TypeError(f"{what}: frame {bad} is a {type(frames[bad]).__name__}, not a PIL image")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{what}: frames of different sizes {sorted(sizes)}; a video's frames must all be one size")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"{what}: fps must be a number from {MIN_FPS} to {MAX_FPS}, got {fps!r}")
    return [whiten_transparency(f) for f in frames]


def _exif(description: str) -> bytes:
    exif = Image.Exif()
    exif[_EXIF_DESCRIPTION] = description
    return exif.tobytes()
