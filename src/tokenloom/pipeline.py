"""A pipeline: model, vocabulary, text and image tokenizers and the sequence layout, loaded as one.

Directory layout (Hugging Face style):
    config.json             {"model": ModelConfig, "vocab": Vocabulary, "pipeline": PipelineConfig}
    model.safetensors       (or shards + model.safetensors.index.json)
    tokenizer.json          text tokenizer
    vq.safetensors, vq_config.json   image tokenizer (VQGAN), when the model draws or reads images
    speech_codec.safetensors, speech_codec.json   speech tokenizer (RVQ codec), when it speaks or listens

A LoRA adapter (`tokenloom.adapters`: what a `train.trainable: lora` run writes) loads onto its base:
`load(base, adapter=DIR)`, or `load(DIR)`, which finds the base in DIR/tokenloom_adapter.json.
"""

from __future__ import annotations

import itertools
import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from . import __version__
from .adapters import adapter_base, apply_adapter, is_adapter_dir
from .checkpoint import DEFAULT_MAX_SHARD_BYTES, WEIGHTS_NAME, atomic_write_json, iter_weights, save_weights, weight_files
from .document import Document, ImagePart, TextPart, VideoPart, check_text
from .engine import Engine, GenerationRequest, SamplingParams, check_guidance_scale
from .engine.sampling import check_integer, default_image_sampling, default_text_sampling
from .engine.speculative import check_speculative
from .formats import Format, get_format, resolution_prompt
from .image_processing import ImageTokenizer, check_image_size, load_image
from .model import ModelConfig, Transformer
from .speech_pipeline import SpeechMixin
from .text_tokenizer import TextTokenizer
from .vocab import Vocabulary

if TYPE_CHECKING:
    from .speech_codec import SpeechTokenizer

CONFIG_NAME = "config.json"


@dataclass
class PipelineConfig:
    """How a model family lays out and samples its sequences."""

    profile: str = "native"
    layout: str = "unirep"  # "unirep" or "flat"
    flat_grid: tuple[int, int] | None = None  # (height, width) codes, flat layout only
    image_width: int = 64  # default size of generated images, pixels
    image_height: int = 64
    max_image_side: int = 1024  # largest side accepted, pixels
    resolution_prompt: bool = True  # Lumina-mGPT's "Generate an image of WxH ..." wording
    guidance_scale: float = 3.0
    max_new_tokens: int = 256  # for text answers
    text_sampling: dict = field(default_factory=dict)  # SamplingParams fields
    image_sampling: dict = field(default_factory=dict)
    # Special tokens (by role) that open a guidance row, before its image_begin and size tokens.
    # None: bos + uncond where the vocabulary has an uncond token, else nothing (Lumina-mGPT: the
    # unconditional context is the image's own start). Chameleon / Anole: ["bos"].
    unconditional_context: list[str] | None = None
    caption_prompt: str = "Describe the image."  # the question `caption` asks; reranking scores replies to it
    video_caption_prompt: str = "Describe the video."  # what `caption` asks of a video
    video_frames: int = 6  # frames of a generated video unless asked otherwise
    # Text-to-image draws this many candidates per image asked for and keeps the one the model itself
    # rates best for the prompt, both ways (tokenloom.scoring); 1 draws one image and scores nothing.
    image_candidates: int = 1
    candidate_sampling: dict = field(default_factory=dict)  # image_sampling overrides for candidates
    # "jacobi": draw image codes with speculative Jacobi decoding (lossless: the same distribution in
    # fewer forwards; engine.speculative), `speculative_window` drafts a step. None: one code a step.
    speculative: str | None = None
    speculative_window: int = 16
    speech_layout: str = "blocks"  # "blocks" (MIO: content block, then each timbre block) or "interleaved"
    speech_sampling: dict = field(default_factory=dict)  # SamplingParams fields, inside speech spans
    speak_prompt: str = "Say: {text}"  # what `speak` asks ({text}: the text to say)
    transcribe_prompt: str = "Transcribe the speech."  # what `transcribe` asks after the utterance
    max_speech_seconds: float = 10.0  # the longest utterance `speak` draws unless asked otherwise

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown pipeline config keys: {sorted(unknown)}")
        d = dict(d)
        if d.get("flat_grid") is not None:
            d["flat_grid"] = tuple(d["flat_grid"])
        config = cls(**d)
        check_candidates(config.image_candidates, "image_candidates")
        check_speculative(config.speculative, config.speculative_window, "above", "pipeline config")
        return config


MAX_CANDIDATES = 64


def check_candidates(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CANDIDATES:
        raise ValueError(f"{name} must be an integer from 1 to {MAX_CANDIDATES}, got {value!r}")
    return value


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MAX_NUM_IMAGES = 1000  # images per prompt in one call: each is kept until its batch is done


def torch_dtype(dtype, *, int8: bool = False) -> torch.dtype | None:
    """A torch dtype from its name ("bfloat16", "bf16", ...), or None for "as saved". With int8=True the
    name "int8" (dynamic int8 linears for CPU inference: `tokenloom.quantize`) is accepted too, as float32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if int8 and dtype == "int8":
        return torch.float32
    if dtype not in DTYPES:
        extra = ", or int8 (CPU inference)" if int8 else ""
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}{extra}")
    return DTYPES[dtype]


def torch_device(device) -> torch.device:
    """A torch device that this machine has, or ValueError saying why not (default: cpu)."""
    if device is None:
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    backends = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None), "mps": getattr(torch.backends, "mps", None)}
    if device.type in backends:
        backend = backends[device.type]
        if backend is None or not backend.is_available():
            raise ValueError(f"device {str(device)!r} is not available here: this torch build ({torch.__version__}) "
                             f"has no {device.type.upper()} support or sees no such device")
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: {count} {device.type} device(s) visible")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"unsupported device {str(device)!r}; expected cpu, cuda, cuda:N, mps or xpu")
    return device


def _prompt_list(prompts, name: str = "prompts") -> tuple[list, bool]:
    """(prompts as a list, whether one prompt was given rather than a list)."""
    if isinstance(prompts, (str, Document)):
        return [prompts], True
    if isinstance(prompts, (list, tuple)) and prompts:
        return list(prompts), False
    raise ValueError(f"{name} must be a string, a Document or a non-empty list of them, got {prompts!r:.80}")


class Pipeline(SpeechMixin):
    def __init__(self, model: Transformer, vocab: Vocabulary, text_tokenizer: TextTokenizer,
                 image_tokenizer: ImageTokenizer | None, config: PipelineConfig | None = None,
                 speech_tokenizer: "SpeechTokenizer | None" = None):
        self.model, self.vocab, self.text_tokenizer = model, vocab, text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.speech_tokenizer = speech_tokenizer
        self.config = config or PipelineConfig()
        if model.config.vocab_size < vocab.size:
            raise ValueError(f"model vocab_size {model.config.vocab_size} < vocabulary size {vocab.size}")
        if speech_tokenizer is not None and vocab.has_speech:
            codec = speech_tokenizer.config
            if (codec.codebooks, codec.codebook_size) != (vocab.speech_codebooks, vocab.speech_codebook_size):
                raise ValueError(f"the speech codec has {codec.codebooks} codebooks of {codec.codebook_size}, the "
                                 f"vocabulary {vocab.speech_codebooks} of {vocab.speech_codebook_size}")
        if model.config.experts:
            model.set_expert_spans(*vocab.span_markers(model.config.experts), 
                                   reset_ids=[] if vocab.bos is None else [vocab.bos])
        grid = {"grid": self.config.flat_grid} if self.config.layout == "flat" else {}
        self.format: Format = get_format(self.config.layout, vocab, text_tokenizer,
                                         speech_layout=self.config.speech_layout, **grid)
        self._engine: Engine | None = None
        self.compile = False  # torch.compile the decode step (pays on GPUs for long generations)

    # -- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None,
                        adapter: str | Path | None = None) -> "Pipeline":
        """Load a model directory; `adapter`: a LoRA adapter directory made for it, merged into its
        weights (ValueError naming the file when it was made for another base). An adapter directory
        as `path` loads the base its tokenloom_adapter.json names, with it."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no model directory at {path}")
        if adapter is None and is_adapter_dir(path):
            adapter, path = path, adapter_base(path)
        if adapter is not None and not Path(adapter).is_dir():
            raise FileNotFoundError(f"no adapter directory at {adapter}")
        config_path = path / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(f"{config_path} is missing: not a tokenloom model directory")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from None
        for key in ("model", "vocab", "pipeline"):
            if key not in config:
                raise ValueError(f"{config_path} has no {key!r} section")
        device = torch_device(device)
        dtype = torch_dtype(dtype)
        with _reading(path, [p.name for p in weight_files(path)] or [WEIGHTS_NAME]):
            model = load_model(path, ModelConfig.from_dict(config["model"]), device, dtype)
        if adapter is not None:
            model = apply_adapter(model, adapter, path)
        vocab = Vocabulary.from_dict(config["vocab"])
        with _reading(path, ["tokenizer.json"]):
            text_tokenizer = TextTokenizer.from_pretrained(path)
        image_tokenizer = None
        if (path / "vq_config.json").exists():
            with _reading(path, ["vq_config.json", "vq.safetensors"]):
                image_tokenizer = ImageTokenizer.from_pretrained(path, device=device)
            image_tokenizer.can_decode = config.get("conversion", {}).get("vq_decoder", True) is not False
        speech_tokenizer = None
        if (path / "speech_codec.json").exists():
            from .speech_codec import SpeechTokenizer

            with _reading(path, ["speech_codec.json", "speech_codec.safetensors"]):
                speech_tokenizer = SpeechTokenizer.from_pretrained(path)
        return cls(model, vocab, text_tokenizer, image_tokenizer, PipelineConfig.from_dict(config["pipeline"]),
                   speech_tokenizer)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_weights(self.model.state_dict(), path, max_shard_bytes)
        self.text_tokenizer.save_pretrained(path)
        if self.image_tokenizer is not None:
            self.image_tokenizer.save_pretrained(path)
        if self.speech_tokenizer is not None:
            self.speech_tokenizer.save_pretrained(path)
        # config.json last: a directory with a config is a complete one.
        atomic_write_json(path / CONFIG_NAME, {"tokenloom_version": __version__, "model": self.model.config.to_dict(),
                                               "vocab": self.vocab.to_dict(), "pipeline": self.config.to_dict()})
        return path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device=None, dtype=None) -> "Pipeline":
        """Move the model (and the image tokenizer) to a device and/or cast the model's weights, in
        place, like `torch.nn.Module.to`; the VQGAN stays float32 (its codes depend on it)."""
        device = None if device is None else torch_device(device)
        self.model.to(device=device, dtype=torch_dtype(dtype))
        if device is not None and self.image_tokenizer is not None:
            self.image_tokenizer.vqgan.to(device)
        self._engine = None  # the engine's grammar tables live on the old device
        return self

    # -- generation -----------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.vocab, self.text_tokenizer, self.config.layout,
                                  self.config.flat_grid, self.image_tokenizer, compile=self.compile,
                                  speech_tokenizer=self.speech_tokenizer, speech_layout=self.config.speech_layout)
        return self._engine

    @property
    def factor(self) -> int:
        if self.image_tokenizer is None:
            raise ValueError("this model has no image tokenizer (no vq_config.json in its directory)")
        return self.image_tokenizer.factor

    def sampling(self, modality: str, **overrides) -> SamplingParams:
        """Sampling for "text", "image", "speech" (inside utterances: the speech defaults updated by
        speech_sampling), or "candidate" (reranked text-to-image draws: the image settings updated by
        candidate_sampling); overrides that are not None win."""
        if modality == "text":
            base = {**default_text_sampling().to_dict(), **self.config.text_sampling}
        elif modality == "speech":
            from .engine.sampling import default_speech_sampling

            base = {**default_speech_sampling(self.vocab.speech_codebook_size).to_dict(),
                    **self.config.speech_sampling}
        else:
            base = {**default_image_sampling(self.vocab.codebook_size).to_dict(), **self.config.image_sampling}
            if modality == "candidate":
                base.update(self.config.candidate_sampling)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams.from_dict(base)

    def grid_size(self, width: int | None, height: int | None) -> tuple[int, int]:
        """(height, width) in codes for a pixel size (None: the model's default), checked against the
        model's limits."""
        width = self.config.image_width if width is None else check_integer(width, "width", low=1)
        height = self.config.image_height if height is None else check_integer(height, "height", low=1)
        check_image_size(width, height, self.factor, self.config.max_image_side)
        h, w = height // self.factor, width // self.factor
        if self.config.layout == "flat" and (h, w) != tuple(self.config.flat_grid):
            gh, gw = self.config.flat_grid
            raise ValueError(f"this model draws {gw * self.factor}x{gh * self.factor} images only "
                             f"(flat layout), not {width}x{height}")
        unit = self.vocab.size_unit
        if self.config.layout == "unirep" and (h % unit or w % unit or max(h, w) > self.vocab.max_grid_size * unit):
            raise ValueError(f"{width}x{height} is not drawable: sides must be multiples of "
                             f"{unit * self.factor} px and at most {self.vocab.max_grid_size * unit * self.factor} px")
        return h, w

    def encode_image(self, image, width: int | None = None, height: int | None = None) -> ImagePart:
        """A PIL image or a path -> an ImagePart at the model's image size (or the one given)."""
        if self.image_tokenizer is None:
            raise ValueError("this model has no image tokenizer (no vq_config.json in its directory): "
                             "it cannot read images")
        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif not isinstance(image, Image.Image):
            raise ValueError(f"an image must be a PIL image or a path, got {type(image).__name__}")
        if width is None and height is None and self.config.layout == "unirep":
            width, height = self.config.image_width, self.config.image_height
        h, w = self.grid_size(width, height)
        codes = self.image_tokenizer.encode([image], width=w * self.factor, height=h * self.factor)[0]
        return ImagePart(codes, pixels=image)

    def image_prompt(self, prompt: str, width: int, height: int) -> Document:
        text = resolution_prompt(prompt, width, height) if self.config.resolution_prompt else prompt
        return Document.chat([("user", [TextPart(text)])])

    def unconditional_prompt(self) -> list[int]:
        """Context of guidance rows, before image_begin: see `PipelineConfig.unconditional_context`."""
        roles = self.config.unconditional_context
        if roles is None:  # bos (where the vocabulary has one) and uncond; Lumina-style without uncond
            roles = [] if self.vocab.uncond is None else [r for r in ("bos", "uncond")
                                                         if self.vocab.role_id(r) is not None]
        ids = [self.vocab.role_id(r) for r in roles]
        missing = [r for r, i in zip(roles, ids) if i is None]
        if missing:
            raise ValueError(f"unconditional_context names {missing}, which this vocabulary does not have")
        return ids

    def generate_images(self, prompts: str | list[str], **kwargs) -> list:
        """Text to image. Returns PIL images: num_images per prompt, in prompt order (see `iter_images`
        for the arguments)."""
        return [image for _, _, image in self.iter_images(prompts, **kwargs)]

    def iter_images(self, prompts: str | list[str], *, width: int | None = None, height: int | None = None,
                    guidance_scale: float | None = None, seed: int | None = None, num_images: int = 1,
                    temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                    candidates: int | None = None, batch_size: int = 16, progress: bool = False,
                    speculative: str | bool | None = None, speculative_window: int | None = None):
        """Text to image, one image at a time as each is done: yields (prompt index, image index, PIL
        image) in prompt order, so a caller can write each one before the next is drawn.

        Every argument is checked before anything is drawn. `seed` None samples with fresh randomness;
        a seed makes the call reproducible (draw k of prompt i uses seed + i * draws per prompt + k).
        With candidates > 1 (default: the config's image_candidates) each image is the best of that many
        draws, sampled with the config's candidate_sampling, by `tokenloom.scoring.rerank_scores`.
        """
        from tqdm.auto import tqdm

        prompts = [check_text(p, "prompt") for p in _prompt_list(prompts)[0]]
        check_integer(num_images, "num_images", low=1, high=MAX_NUM_IMAGES)
        check_integer(batch_size, "batch_size", low=1)
        if seed is not None:
            check_integer(seed, "seed", low=0)
        n_candidates = check_candidates(self.config.image_candidates if candidates is None else candidates,
                                        "candidates")
        if self.image_tokenizer is None or not self.image_tokenizer.can_decode:
            raise ValueError("this model cannot draw: its VQGAN has no decoder (Hugging Face Chameleon "
                             "checkpoints drop it); convert again with --vqgan pointing at Meta's "
                             "vqgan.ckpt + vqgan.yaml")
        grid = self.grid_size(width, height)
        per_prompt = num_images * n_candidates
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.speculation(speculative, speculative_window)  # checked now: the draws are built as batches need them
        # Prompt i's draws are built when the batches reach them; its document is kept for reranking.
        docs: list[Document] = []

        def draws():
            for i, prompt in enumerate(prompts):
                doc, requests = self.image_draws(prompt, grid, per_prompt,
                                                 seed=None if seed is None else seed + i * per_prompt,
                                                 guidance_scale=guidance_scale, candidates=n_candidates, **sampling,
                                                 speculative=speculative, speculative_window=speculative_window)
                docs.append(doc)
                yield from requests

        pending = draws()
        total = len(prompts) * per_prompt
        drawn: list[ImagePart | None] = []  # draws of groups not yet complete
        done = 0  # draws before drawn[0]
        with tqdm(total=total, desc="drawing", unit="image", disable=not progress) as bar:
            for _ in range(0, total, batch_size):
                batch = list(itertools.islice(pending, batch_size))
                drawn += [(result.image_parts or [None])[0] for result in self.engine.generate(batch)]
                bar.update(len(batch))
                while len(drawn) >= n_candidates:
                    group, drawn = drawn[:n_candidates], drawn[n_candidates:]
                    i, k = divmod(done // n_candidates, num_images)
                    done += n_candidates
                    yield i, k, self.best_drawn(prompts[i], docs[i].text, group)

    def image_draws(self, prompt: str, grid: tuple[int, int], draws: int, *, seed: int | None = None,
                    guidance_scale: float | None = None, candidates: int = 1, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, speculative: str | bool | None = None,
                    speculative_window: int | None = None) -> tuple[Document, list[GenerationRequest]]:
        """The engine requests of `draws` text-to-image draws of one prompt at a (height, width) code grid
        (draw j seeded seed + j), and the prompt document reranking scores against. With candidates > 1
        the draws are sampled with candidate_sampling and keep their codes only: `best_drawn` decodes the
        one kept."""
        h, w = grid
        doc = self.image_prompt(prompt, w * self.factor, h * self.factor)
        ids = self.format.encode(doc, generation_role="assistant").ids
        params = self.sampling("candidate" if candidates > 1 else "image", temperature=temperature, top_k=top_k,
                               top_p=top_p)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance_scale(scale)
        uncond, max_new = self.unconditional_prompt(), self.format.image_length(h, w) + 1
        fast = self.speculation(speculative, speculative_window)
        return doc, [GenerationRequest(ids, mode="image", image_size=grid, max_new_tokens=max_new, image=params,
                                       guidance_scale=scale, uncond_prompt_ids=uncond,
                                       seed=None if seed is None else seed + j, decode_images=candidates == 1, **fast)
                     for j in range(draws)]

    def best_drawn(self, prompt: str, prompt_text: str, parts: list[ImagePart | None]):
        """The PIL image of the draw the model rates best for the prompt (`tokenloom.scoring`; the only one
        when there is one), decoded now if its draw kept codes only; None when no image was drawn."""
        from .scoring import best_candidate

        best = parts[0] if len(parts) == 1 else parts[best_candidate(self, prompt, prompt_text, parts)]
        if best is None:
            return None
        return best.pixels if best.pixels is not None else self.engine.decode_image(best.codes)

    def chat_request(self, document: Document, *, mode: str = "any", max_new_tokens: int | None = None,
                     guidance_scale: float | None = None, seed: int | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     do_sample: bool | None = None, repetition_penalty: float | None = None,
                     image_temperature: float | None = None, image_top_k: int | None = None,
                     image_top_p: float | None = None, width: int | None = None, height: int | None = None,
                     text_sampling: dict | None = None, image_sampling: dict | None = None,
                     image_size: tuple[int, int] | None = None, speculative: str | bool | None = None,
                     speculative_window: int | None = None, video_frames: int | None = None,
                     speech_sampling: dict | None = None,
                     modalities: tuple[str, ...] | None = None) -> GenerationRequest:
        """One engine request for a document, with Hugging Face `generate` keyword names: `temperature`,
        `top_k`, `top_p`, `repetition_penalty` for text, `image_temperature`, `image_top_k`,
        `image_top_p` for images, `do_sample=False` for greedy decoding of both; `width` and `height`
        (pixels) or `image_size` ((height, width) codes) fix the size of drawn images. `text_sampling`
        and `image_sampling` take the same settings as dicts (the keywords win). `speculative`
        ("jacobi" or "off") and `speculative_window` override the config's speculative decoding.
        `mode="video"` answers with one video (frames of the image size); `video_frames` fixes its
        frame count (None: the model's choice), and without `max_new_tokens` the budget is what it needs.
        `mode="speech"` answers with one utterance; `speech_sampling` sets its sampling. `modalities`
        limits a mode-"any" answer (e.g. ("text", "image"): no speech for a client that did not ask for
        audio, nor on an old task of a model grown by video and speech; None: every one it has)."""
        if not isinstance(document, Document):
            raise ValueError(f"expected a Document, got {type(document).__name__}")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
        greedy = {"temperature": 0.0} if do_sample is False else {}
        text = {**(text_sampling or {}), **_given(temperature=temperature, top_k=top_k, top_p=top_p,
                                                  repetition_penalty=repetition_penalty), **greedy}
        image = {**(image_sampling or {}), **_given(temperature=image_temperature, top_k=image_top_k,
                                                    top_p=image_top_p), **greedy}
        given_budget = max_new_tokens
        max_new_tokens = self.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_integer(max_new_tokens, "max_new_tokens", low=1)
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        check_guidance_scale(scale)
        if seed is not None:
            check_integer(seed, "seed", low=0)
        ids = self.format.encode(document, generation_role="assistant").ids
        if width is not None or height is not None:
            image_size = self.grid_size(width, height)
        elif image_size is None and self.config.layout == "unirep" and mode != "text" and self.image_tokenizer:
            image_size = self.grid_size(None, None)
        if mode == "video" and given_budget is None:
            # the video's own length: the frames asked for (or the config's count), and the stop token
            frames = self.config.video_frames if video_frames is None else check_integer(video_frames, "video_frames",
                                                                                         low=1)
            grid = image_size or self.config.flat_grid
            max_new_tokens = self.format.video_length(frames, *grid) + 1
        return GenerationRequest(
            ids, mode=mode, image_size=image_size, max_new_tokens=max_new_tokens, video_frames=video_frames,
            text=self.sampling("text", **text), image=self.sampling("image", **image),
            **({"speech": self.sampling("speech", **{**(speech_sampling or {}), **greedy})}
               if self.vocab.has_speech else {}),
            guidance_scale=scale,
            uncond_prompt_ids=self.unconditional_prompt(), seed=seed, modalities=modalities,
            **self.speculation(speculative, speculative_window))

    def use_speculative(self, speculative: str | bool | None = None, window: int | None = None) -> "Pipeline":
        """Set the config's speculative decoding ("jacobi", or False / "off"; None keeps it), checked."""
        fields = self.speculation(speculative, window)
        self.config.speculative, self.config.speculative_window = fields["speculative"], fields["speculative_window"]
        return self

    def speculation(self, speculative: str | bool | None = None, window: int | None = None) -> dict:
        """The speculative-decoding fields of a request: the config's unless given ("jacobi", or
        False / "off" for one code a step)."""
        method = self.config.speculative if speculative is None else (
            None if speculative in (False, "off", "none") else speculative)
        window = self.config.speculative_window if window is None else window
        check_speculative(method, window, "above", "speculative")
        return {"speculative": method, "speculative_window": window}

    # -- video ----------------------------------------------------------------------------------
    def encode_video(self, video, width: int | None = None, height: int | None = None) -> VideoPart:
        """A video -> a VideoPart at the model's image size (or the one given): a path to an animated
        GIF / WebP file or to a folder of frames, a list of PIL frames, or a VideoPart (returned as it is)."""
        from .video_io import read_video

        if isinstance(video, VideoPart):
            return video
        if self.image_tokenizer is None:
            raise ValueError("this model has no image tokenizer (no vq_config.json in its directory): "
                             "it cannot read videos")
        frames = read_video(video) if isinstance(video, (str, Path)) else list(getattr(video, "frames", video))
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise ValueError("a video must be a path, a VideoPart or a non-empty list of PIL images")
        if len({f.size for f in frames}) > 1:
            raise ValueError(f"a video's frames must all be one size, got {sorted({f.size for f in frames})}")
        self.format.check_video(len(frames))
        if width is None and height is None and self.config.layout == "unirep":
            width, height = self.config.image_width, self.config.image_height
        h, w = self.grid_size(width, height)
        codes = self.image_tokenizer.encode(frames, width=w * self.factor, height=h * self.factor)
        return VideoPart(codes, pixels=frames)

    def is_video(self, x) -> bool:
        """Whether `x` is a video rather than an image: a VideoPart, a path to a folder or to a GIF / WebP
        file of more than one frame, or an object with a `frames` list (the shapes world's Video)."""
        if isinstance(x, VideoPart) or isinstance(getattr(x, "frames", None), list):
            return True
        if isinstance(x, (str, Path)):
            from .video_io import stored_frames

            path = Path(x)
            if path.is_dir():
                return True
            if path.suffix.lower() in (".gif", ".webp") and path.is_file():
                try:
                    return stored_frames(path) > 1
                except ValueError:  # not an animation (or too long): not a video to read as one
                    return False
        return False

    def video_request(self, prompt: str, frames: int, grid: tuple[int, int], *, seed: int | None = None,
                      guidance_scale: float | None = None, temperature: float | None = None,
                      top_k: int | None = None, top_p: float | None = None, speculative: str | bool | None = None,
                      speculative_window: int | None = None) -> GenerationRequest:
        """The engine request of one text-to-video draw: `frames` frames of a (height, width) code grid."""
        check_integer(frames, "frames", low=1)
        self.format.check_video(frames)
        doc = Document.chat([("user", [TextPart(check_text(prompt, "prompt"))])])
        return self.chat_request(doc, mode="video", video_frames=frames, image_size=grid, seed=seed,
                                 guidance_scale=guidance_scale, image_temperature=temperature, image_top_k=top_k,
                                 image_top_p=top_p, speculative=speculative, speculative_window=speculative_window)

    def generate_videos(self, prompts: str | list[str], *, frames: int | None = None, width: int | None = None,
                        height: int | None = None, num_videos: int = 1, seed: int | None = None,
                        batch_size: int = 16, progress: bool = False, **sampling) -> list[list]:
        """Text to video: per prompt, `num_videos` videos, each a list of PIL frames (prompt order). Video k
        of prompt i uses seed + i * num_videos + k. Keywords: guidance_scale, temperature, top_k, top_p,
        speculative, speculative_window (as `generate_images`)."""
        prompts = [check_text(p, "prompt") for p in _prompt_list(prompts)[0]]
        check_integer(num_videos, "num_videos", low=1, high=MAX_NUM_IMAGES)
        check_integer(batch_size, "batch_size", low=1)
        if seed is not None:
            check_integer(seed, "seed", low=0)
        if self.image_tokenizer is None or not self.image_tokenizer.can_decode:
            raise ValueError("this model cannot draw: it has no VQGAN decoder")
        frames = self.config.video_frames if frames is None else frames
        grid = self.grid_size(width, height)
        requests = [self.video_request(p, frames, grid, seed=None if seed is None else seed + i * num_videos + k,
                                       **sampling)
                    for i, p in enumerate(prompts) for k in range(num_videos)]  # every one checked first
        videos = []
        for result in self.run_batched(requests, batch_size, progress=progress, desc="drawing"):
            parts = result.document.videos
            videos.append(list(parts[0].pixels) if parts else [])
        return videos

    def run_batched(self, requests: list[GenerationRequest], batch_size: int, *, progress: bool = False,
                    desc: str = "generating") -> list:
        """The engine's results for `requests`, in order, `batch_size` rows at a time (a bar of batches)."""
        from tqdm.auto import tqdm

        results = []
        for start in tqdm(range(0, len(requests), batch_size), desc=desc, unit="batch", disable=not progress):
            results.extend(self.engine.generate(requests[start:start + batch_size]))
        return results

    def user_document(self, prompt: str, images=()) -> Document:
        """A user turn: the images (or videos, or speech: see `is_video`, `is_speech`) and then the
        prompt's text. Speech is heard content-only (`encode_speech`)."""
        if isinstance(images, (str, Path, Image.Image, VideoPart)) or self.is_video(images) or self.is_speech(images):
            images = [images]
        parts = [self.encode_speech(im) if self.is_speech(im) else
                 self.encode_video(im) if self.is_video(im) else self.encode_image(im) for im in images]
        if prompt:
            parts.append(TextPart(check_text(prompt, "prompt")))
        return Document.chat([("user", parts)])

    def _requests(self, prompts, images, kwargs) -> tuple[list[GenerationRequest], bool]:
        """Requests for one prompt or a list of them (`images`: that prompt's images, or one list of
        images per prompt); a seed s gives prompt i the seed s + i."""
        prompts, single = _prompt_list(prompts)
        if single:
            images = [images]
        elif not images:
            images = [()] * len(prompts)
        elif len(images) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
        seed = kwargs.pop("seed", None)
        requests = []
        for i, (prompt, ims) in enumerate(zip(prompts, images)):
            doc = prompt if isinstance(prompt, Document) else self.user_document(prompt, ims)
            requests.append(self.chat_request(doc, seed=None if seed is None else seed + i, **kwargs))
        return requests, single

    def chat(self, prompt: str | Document | list, images=(), **kwargs):
        """Interleaved answer (text and images) to a user turn of text and optional images. A list of
        prompts is answered in one batch and gives a list of results. Keywords: see `chat_request`."""
        requests, single = self._requests(prompt, images, kwargs)
        results = self.engine.generate(requests)
        return results[0] if single else results

    def stream(self, prompt: str | Document | list, images=(), **kwargs):
        """Events (TextDelta, ImageStarted, ImageRow, ImageDone, VideoStarted, FrameStarted, FrameRow, FrameDone,
        VideoDone, TurnEnd, Finished) as they happen; with a list of prompts, each event's `row` is its
        prompt's index."""
        requests, _ = self._requests(prompt, images, kwargs)
        return self.engine.stream(requests)

    def ask(self, image, question: str | list[str], **kwargs):
        """Image understanding: a text answer about an image or a video (`is_video`). A list of them (and
        one question, or one question per item) gives a list of answers, from one batch."""
        kwargs.setdefault("mode", "text")
        if isinstance(image, (list, tuple)) and not self.is_video(image):  # a list of images (or videos)
            questions = [question] * len(image) if isinstance(question, str) else list(question)
            if len(questions) != len(image):
                raise ValueError(f"got {len(image)} images but {len(questions)} questions")
            return [r.text.strip() for r in self.chat(questions, images=[[im] for im in image], **kwargs)]
        return self.chat(question, images=[image], **kwargs).text.strip()

    def caption(self, image, **kwargs):
        """A description of an image or a video (or a list of descriptions of a list of them)."""
        many = isinstance(image, (list, tuple)) and not self.is_video(image)
        prompts = [self.config.video_caption_prompt if self.is_video(x) else self.config.caption_prompt
                   for x in (image if many else [image])]
        return self.ask(image, prompts if many else prompts[0], **kwargs)


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


@contextmanager
def _reading(directory: Path, names: list[str]):
    """Errors of the file readers (safetensors, JSON, the tokenizers library) name the files being read."""
    try:
        yield
    except (ValueError, OSError) as e:
        if any(name in str(e) for name in names):
            raise
        raise ValueError(f"{directory}: cannot read {' / '.join(names)}: {e}") from None
    except Exception as e:  # SafetensorError and the tokenizers library's errors are bare Exceptions
        if type(e).__module__.split(".")[0] not in ("safetensors", "builtins", "tokenizers"):
            raise
        raise ValueError(f"{directory}: cannot read {' / '.join(names)} (truncated or corrupt?): {e}") from None


def load_model(path: Path, config: ModelConfig, device: torch.device, dtype: torch.dtype | None) -> Transformer:
    """Build on the meta device and assign tensors read one at a time from memory-mapped files."""
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    state = {}
    for name, tensor in iter_weights(path):
        if name not in expected:
            raise ValueError(f"{path}: unexpected weight {name!r} for this model config")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"config expects {tuple(expected[name].shape)}")
        state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def random_pipeline(seed: int = 0, *, hidden_size: int = 128, num_layers: int = 2, codebook_size: int = 256,
                    image_size: int = 64, layout: str = "unirep", speech: tuple[int, int] | None = None,
                    speech_layout: str = "blocks", markers: bool = True) -> Pipeline:
    """A tiny randomly initialised pipeline (tests, demos before a trained model exists). `speech`:
    (codebooks, codebook_size) of a random speech codec whose codes the vocabulary gets. `markers=False`:
    a vocabulary without the video and speech markers, as models made before those modalities have."""
    from .vocab import build_native
    from .vqgan import VQGANConfig

    corpus = ["a small red circle at the top left", "a large blue square in the center",
              "Generate an image of 64x64 according to the following prompt:", "What color is the triangle?"]
    vq_config = VQGANConfig(base_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32,
                            embed_dim=16, codebook_size=codebook_size, resolution=image_size)
    factor = vq_config.downsample_factor
    max_grid = 1024 // factor
    levels, speech_codes = speech or (0, 0)
    text_tokenizer, vocab = build_native(corpus, 300, codebook_size, max_grid, speech_codebooks=levels,
                                         speech_codebook_size=speech_codes, markers=markers)
    grid = image_size // factor
    model_config = ModelConfig(vocab_size=vocab.size, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                               num_kv_heads=2, qk_norm=True, max_position_embeddings=4096)
    model = Transformer.random(model_config, seed=seed).eval()
    image_tokenizer = ImageTokenizer.random(vq_config, seed=seed)
    config = PipelineConfig(layout=layout, flat_grid=(grid, grid) if layout == "flat" else None,
                            image_width=image_size, image_height=image_size, speech_layout=speech_layout)
    speech_tokenizer = None
    if speech:
        from .speech_codec import SpeechCodecConfig, SpeechTokenizer

        speech_tokenizer = SpeechTokenizer.random(SpeechCodecConfig(codebooks=levels, codebook_size=speech_codes,
                                                                    channels=32, dim=16), seed=seed)
    return Pipeline(model, vocab, text_tokenizer, image_tokenizer, config, speech_tokenizer)


def load(path: str | Path | None = None, device=None, dtype=None, compile: bool = False,
         adapter: str | Path | None = None) -> Pipeline:
    """Load a pipeline from a directory, or the embedded default model when no path is given.
    `adapter`: a LoRA adapter directory (a `train.trainable: lora` run's final/) made for that model,
    merged into its weights; a ValueError naming the file when it was made for another base.
    `compile`: torch.compile the engine's decode step (off by default: on CPU it does not pay).
    `dtype="int8"`: the decoder's linears in dynamic int8, for CPU inference of large models
    (`tokenloom.quantize`: slower than float32 for the small embedded model)."""
    int8 = dtype == "int8"
    torch_dtype(dtype, int8=True)  # checked before anything is read
    pipe = _load_pipeline(path, device, torch.float32 if int8 else dtype, adapter)
    if int8:
        from .quantize import quantize_int8

        quantize_int8(pipe.model)
    pipe.compile = compile
    return pipe


def _load_pipeline(path, device, dtype, adapter=None) -> Pipeline:
    if path is None:
        path = default_model_path()
    if path is not None:
        return Pipeline.from_pretrained(path, device=device, dtype=dtype, adapter=adapter)
    if adapter is not None:
        raise ValueError("an adapter needs its base model directory, and no embedded default model is installed: "
                         "give the base (tokenloom.load(BASE, adapter=DIR), --model BASE --adapter DIR)")
    warnings.warn("no embedded default model is installed yet: using a small RANDOMLY INITIALISED model; "
                  "its outputs are noise", stacklevel=2)
    pipe = random_pipeline()
    if device is not None or dtype is not None:
        pipe.to(device, dtype)
    return pipe


def default_model_path() -> Path | None:
    path = Path(__file__).parent / "assets" / "shapes-tiny"
    return path if (path / CONFIG_NAME).exists() else None
