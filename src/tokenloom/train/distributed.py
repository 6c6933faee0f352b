"""Training on several processes: FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

    torchrun --nproc_per_node 4 -m tokenloom train config.yaml --out runs/x

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `launch` reads them and joins the process group (gloo on the CPU, NCCL on CUDA GPUs,
chosen from ``train.device``: each rank takes GPU LOCAL_RANK of its node). A WORLD_SIZE of 1 (or no
torchrun) is the plain one-process run, which never touches this module's collectives.

What each rank does:

* **The model is sharded.** Every transformer block is one FSDP unit, and the root (embeddings,
  final norm, output head) another: each rank keeps 1/N of every weight, of its gradient and of its
  AdamW moments, and all-gathers a block's weights only while that block computes. Weights and
  moments stay float32 (``precision: bf16`` autocasts the matmuls, as in one process). LoRA
  (adapters trainable, the base frozen) shards the same way. ``image_head`` shards every frozen
  weight but keeps the output matrix, the one it trains, whole on every rank (its gradient
  all-reduced, its frozen rows' gradients zeroed by the same hook as in one process).
* **The batch is split.** ``data.batch_size`` is the global batch: every rank draws the same global
  batch (the sampler is seeded, so all ranks agree) and trains on its contiguous share of the rows,
  batch_size / N of them (a batch size that does not divide by N is a config error before any
  process group is joined). The loss is summed over each rank's rows, divided by the global batch's
  target count and gradients are summed across ranks (not averaged), so the update is the one a
  single process computes on the whole batch. Logged losses are all-reduced sums over the global
  batch: the metrics of an N-rank run are those of the one-rank run up to floating-point
  reduction order (docs/training.md gives the measured tolerance).
* **Rank 0 alone writes** metrics.jsonl, loss.png, config.json, the progress bar, the summary and
  ``final/`` (a plain model directory, or for LoRA the same adapter directory a one-rank run writes,
  gathered from the shards); it also decides where to resume from and tells the other ranks.

Checkpoints (``checkpoints/step-N/``) of a run on several ranks are written with
`torch.distributed.checkpoint` (DCP): every rank writes its own shards (``__R_0.distcp``), rank 0
the DCP metadata (``.metadata``), every rank its RNG state (``rng-RRRRR.safetensors``), and rank 0
writes ``state.json`` last, listing every file with its size, as in a one-process checkpoint. A
sharded checkpoint is recognised by ``"format": "dcp"`` in its state.json (which also records
``world_size``), and verified on resume like any other (every listed file there at its size) plus
the DCP metadata: it must read, and every chunk it names must lie inside its file. Only tensors go
into DCP (weights and AdamW moments); the rest is JSON. The metadata file is DCP's own (a pickle):
it is read through a restricted unpickler that admits only DCP's metadata classes, torch sizes
and dtypes, so a crafted file cannot run code; DCP reads the tensors themselves in weights-only
mode (nothing but tensors is loaded from its files).

Resume reads either format on any number of ranks: a sharded checkpoint is resharded by DCP to the
current world size (one process included), and a one-process checkpoint (safetensors) is
distributed to the shards of a sharded run. On the same number of ranks a resumed run continues
the same loss curve exactly (each rank restores its own RNG state); on another number of ranks it
continues it within the tolerance above, and model or LoRA dropout draws differ from there on.
Multi-node runs need ``out_dir`` on a file system every node sees.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import atomic_save_safetensors, load_tensors, load_weights
from ..data.packing import IGNORE_INDEX, PAD_DOCUMENT
from .common import (SHARDED_FORMAT, TrainError, load_rng, read_optimizer, read_state, start_run,
                     write_checkpoint)
from .config import ConfigError, TrainConfig, config_error

__all__ = ["SHARDED_FORMAT", "World", "check_config", "current", "is_sharded", "launch", "requested_world_size",
           "verify_sharded"]

METADATA_FILE = ".metadata"  # DCP's metadata file in a checkpoint directory


def _rng_file(rank: int) -> str:
    return f"rng-{rank:05d}.safetensors"


def requested_world_size() -> int:
    """The number of ranks torchrun asked for (WORLD_SIZE), 1 outside torchrun."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a whole number, got {text!r}") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {size}")
    return size


def env_rank() -> int:
    """This process's rank as torchrun set it (RANK), 0 outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def check_config(config: TrainConfig, world_size: int | None = None) -> None:
    """What a run on several ranks needs of its config, checked before any process group is joined:
    a global batch that splits evenly, and no schedule. A ConfigError naming file:line otherwise."""
    size = requested_world_size() if world_size is None else world_size
    if size <= 1:
        return
    if config.data.batch_size % size:
        raise config_error(config, "data.batch_size",
                           f"'data.batch_size' {config.data.batch_size} (the global batch, split over the ranks) "
                           f"does not divide by the {size} ranks of this run: make it a multiple of {size}")
    if config.schedule:
        raise config_error(config, "schedule", "a config with a 'schedule' trains on one process only for now: "
                                               "run it without torchrun, or each stage as a config of its own")


def _device(requested: str | None, local_rank: int) -> torch.device:
    """The rank's device: the CPU, or GPU LOCAL_RANK of its node when train.device is a CUDA device."""
    device = torch.device(requested or "cpu")
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"train.device {requested!r}: several ranks train on the CPU (gloo) or on CUDA GPUs "
                          f"(NCCL), not on {device.type}")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device is {requested!r} but torch sees no CUDA GPU on this machine")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node has "
                         f"{torch.cuda.device_count()}: start at most that many processes per node")
    return torch.device("cuda", local_rank)  # one GPU per rank, whatever index train.device names


@dataclass
class World:
    """This process's place in a run on several ranks, and the collectives the trainer calls."""

    rank: int
    size: int
    local_rank: int
    device: torch.device
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    _head: nn.Parameter | None = field(default=None, repr=False)  # image_head: the unsharded output matrix

    @property
    def main(self) -> bool:
        return self.rank == 0

    # -- the model ------------------------------------------------------------------------------------

    def shard(self, model: nn.Module, head_only: bool = False) -> None:
        """FSDP2 over `model` (a Transformer, LoRA layers included), in place: one unit per block plus
        the root; parameters move to this rank's device. Gradients are summed across ranks, not
        averaged (the loss is already normalised by the global batch's targets).

        `head_only` (image_head): the output matrix, the one trainable weight, stays whole on every
        rank (its gradient all-reduced in `clip_grad_norm_`) and keeps the hook that zeroes its
        frozen rows. Sharded, it would never get a gradient: with every other weight frozen the
        model's output needs none, so FSDP's backward hooks, which reduce the gradients, never run."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        head = model.output_weight if head_only else None
        for layer in model.layers:
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh, ignored_params=None if head is None else {head})
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # per unit: it does not recurse
                module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        if head is not None:
            with torch.no_grad():
                head.data = head.data.to(self.device)  # the same Parameter: its hook and identity stay
            self._head = head

    def clip_grad_norm_(self, parameters: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global gradient norm over every rank's shards, clipping to max_norm (inf: none); with
        image_head, the whole head's gradient is summed over the ranks first."""
        import torch.distributed as dist

        if self._head is not None and self._head.grad is not None:
            dist.all_reduce(self._head.grad)
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- batches and metrics --------------------------------------------------------------------------

    def local(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This rank's contiguous share of a global batch's rows (num_tokens / num_targets counted
        again for them). A rank left without rows (the short last batch of an evaluation) gets one
        row of padding with no target, so that every rank runs the same forward and backward."""
        rows = batch["input_ids"].shape[0]
        start, stop = rows * self.rank // self.size, rows * (self.rank + 1) // self.size
        out = {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v
               for k, v in batch.items()}
        if stop == start:
            width = batch["input_ids"].shape[1]
            out["input_ids"] = batch["input_ids"][:1].clone()
            out["labels"] = torch.full((1, width), IGNORE_INDEX, dtype=batch["labels"].dtype)
            out["document_ids"] = torch.full((1, width), PAD_DOCUMENT, dtype=batch["document_ids"].dtype)
            if "sources" in out:
                out["sources"] = torch.full((1, width), -1, dtype=batch["sources"].dtype)
        out["num_targets"] = int((out["labels"] != IGNORE_INDEX).sum())
        out["num_tokens"] = int((out["document_ids"] != PAD_DOCUMENT).sum())
        return out

    def sum(self, *values: float) -> list[float]:
        """Floats summed over the ranks (float64)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (plain data: strings, numbers, lists, dicts) on every rank."""
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- starting and checkpoints ---------------------------------------------------------------------

    def start(self, out_dir: Path, resume: bool, *, seed: int, config: dict[str, Any], metrics,
              check: Callable[[Path], None], load: Callable[[Path], None]) -> Path | None:
        """`common.start_run` on rank 0 (refuse, clean up, pick the checkpoint, check the config,
        truncate the metrics, write config.json), its outcome sent to every rank; then every rank
        loads that checkpoint (`load`, collective), or seeds torch with seed + rank."""
        outcome: dict[str, Any] = {}
        if self.main:
            def found(path: Path) -> int:
                check(path)
                return read_state(path)["step"]

            try:
                latest = start_run(out_dir, resume, seed=seed, config=config, metrics=metrics, load=found)
                outcome = {"checkpoint": None if latest is None else str(latest)}
            except Exception as e:
                self.broadcast({"error": f"{type(e).__name__}: {e}"})
                raise
        outcome = self.broadcast(outcome)
        if "error" in outcome:  # rank 0 reports it; the other ranks stop with it
            raise TrainError(f"rank 0 could not start the run: {outcome['error']}")
        latest = None if outcome["checkpoint"] is None else Path(outcome["checkpoint"])
        if latest is None:
            torch.manual_seed(seed + self.rank)
        else:
            load(latest)
        return latest

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], keep: int, trainable_only: bool = False) -> Path:
        """A sharded checkpoint root/step-N (collective): DCP shards from every rank, each rank's RNG
        state, then rank 0's state.json listing them all ("format": "dcp"). TrainError on every rank
        when a weight holds NaN or inf (nothing is written)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = _model_state(model, trainable_only)
        moments = get_optimizer_state_dict(model, optimizer)["state"]
        bad = [name for name, t in weights.items() if not bool(torch.isfinite(_local(t)).all())]
        if self.sum(float(len(bad)))[0]:
            raise TrainError(f"training stopped at step {step}: a weight ({bad[0] if bad else 'on another rank'}) "
                             f"holds NaN or inf values, so checkpoint step-{step:08d} was not written")

        def write(directory: Path) -> None:
            directory = Path(self.broadcast(str(directory)))
            dcp.save({"model": weights, "optim": moments}, storage_writer=dcp.FileSystemWriter(str(directory)))
            rng = {"torch": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            atomic_save_safetensors(rng, directory / _rng_file(self.rank))
            self.barrier()  # every rank's files are there before rank 0 lists them

        state = {**state, "format": SHARDED_FORMAT, "world_size": self.size}
        if self.main:
            path = write_checkpoint(root, step, write, state, keep)
        else:
            write(Path())  # into the directory rank 0 sends
            path = Path(root) / f"step-{step:08d}"
        self.barrier()  # renamed into place before any rank looks for it
        return path

    # -- the end of a run -------------------------------------------------------------------------------

    def gather(self, model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full weights (the trainable ones only: LoRA) on rank 0's CPU, an empty dict elsewhere
        (collective)."""
        if trainable_only:
            full = {name: p.full_tensor().cpu() for name, p in model.named_parameters() if p.requires_grad}
            return full if self.main else {}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_final(self, final_dir: Path, pipeline, adapter=None, lora_base: dict | None = None,
                   extra: dict | None = None) -> None:
        """final/ by rank 0 from the gathered weights (collective): the pipeline as a model directory,
        or for LoRA (`adapter`, the PeftModel) the adapter directory a one-process run writes."""
        from torch.distributed.fsdp import FSDPModule

        from ..adapters import save_adapter
        from ..model import Transformer
        from ..pipeline import Pipeline

        model = pipeline.model
        full = self.gather(model, trainable_only=adapter is not None)
        if self.main:
            if adapter is not None:
                # peft records the base model's class in adapter_config.json: the Transformer's, not the
                # FSDP subclass fully_shard swapped in (peft only reads the class; the weights are `full`)
                sharded_class = type(model)
                model.__class__ = next(c for c in sharded_class.__mro__[1:] if not issubclass(c, FSDPModule))
                try:
                    save_adapter(adapter, final_dir, lora_base, extra,
                                 state_dict={"base_model.model." + k: v for k, v in full.items()})
                finally:
                    model.__class__ = sharded_class
            else:
                with torch.device("meta"):
                    plain = Transformer(model.config)
                plain.load_state_dict(full, strict=True, assign=True)
                Pipeline(plain, pipeline.vocab, pipeline.text_tokenizer, pipeline.image_tokenizer,
                         pipeline.config).save_pretrained(final_dir)
        self.barrier()


# --------------------------------------------------------------------------- the process group

_current: World | None = None


def current() -> World | None:
    """The World of the run under way on several ranks, None otherwise."""
    return _current


@contextmanager
def launch(config: TrainConfig) -> Iterator[World | None]:
    """Join the process group torchrun describes (its env variables), for the block; None when the
    run has one process. The config is checked first (`check_config`), so a bad one fails alike on
    every rank before any rank waits for another."""
    global _current
    size = requested_world_size()
    if size <= 1:
        yield None
        return
    check_config(config, size)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(config.train.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if dist.get_world_size() != size:
        raise RuntimeError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE says {size}")
    try:
        _current = World(rank=rank, size=size, local_rank=local_rank, device=device,
                         mesh=init_device_mesh(device.type, (size,)))
        yield _current
    finally:
        _current = None
        dist.destroy_process_group()


# --------------------------------------------------------------------------- reading sharded checkpoints


def is_sharded(state: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's state.json says it was written by several ranks (DCP)."""
    return state.get("format") == SHARDED_FORMAT


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle: admit only what DCP's metadata is made of."""

    _MODULES = ("torch.distributed.checkpoint.metadata",)
    _NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
              ("torch", "Size"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module in self._MODULES or (module, name) in self._NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                 torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(path: Path):
    """The DCP metadata of a sharded checkpoint directory, through the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    with open(Path(path) / METADATA_FILE, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _reader(path: Path):
    """DCP's file reader, its metadata read through the restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(Path(self.path))
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


def verify_sharded(path: Path) -> str | None:
    """None when a sharded checkpoint's DCP metadata reads and every chunk it names lies inside its
    file, else what is wrong (state.json's file list and sizes are checked by `verify_checkpoint`)."""
    path = Path(path)
    try:
        metadata = read_metadata(path)
    except FileNotFoundError:
        return f"{METADATA_FILE} is missing"
    except Exception as e:  # a truncated or foreign pickle raises all sorts
        return f"{METADATA_FILE} is unreadable ({type(e).__name__}: {e})"
    if not getattr(metadata, "state_dict_metadata", None) or not isinstance(metadata.storage_data, dict):
        return f"{METADATA_FILE} lists no tensors"
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        name = str(info.relative_path)
        if Path(name).name != name:
            return f"{METADATA_FILE} names {name!r}, which is not a file of the checkpoint"
        if name not in sizes:
            file = path / name
            if not file.is_file():
                return f"{name} is missing (named in {METADATA_FILE})"
            sizes[name] = file.stat().st_size
        if info.offset + info.length > sizes[name]:
            return f"{name} is {sizes[name]} bytes, too short for {index.fqn} ({METADATA_FILE})"
    return None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights = get_model_state_dict(model)
    if trainable_only:
        names = {name for name, p in model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k in names}
    return weights


def load_checkpoint(path: Path, state: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                    world: World | None, trainable_only: bool = False) -> None:
    """Restore weights (the trainable ones only: LoRA), AdamW moments and RNG state from checkpoint
    `path` into a sharded model (`world`) or a one-process one (world None), whichever format the
    checkpoint has: a sharded one is resharded by DCP, a one-process one spread over the shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    path = Path(path)
    weights = _model_state(model, trainable_only)
    what = "this run's LoRA adapter" if trainable_only else "this run's model"
    if is_sharded(state):
        import torch.distributed.checkpoint as dcp

        saved = {k.removeprefix("model.") for k in read_metadata(path).state_dict_metadata if k.startswith("model.")}
        if saved != set(weights):
            raise TrainError(f"cannot resume from {path}: its weights are not {what}")
        optim = get_optimizer_state_dict(model, optimizer)  # initialises the moments, which DCP fills in place
        try:
            with warnings.catch_warnings():  # one process: DCP warns that it loads without a process group
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({"model": weights, "optim": optim["state"]}, storage_reader=_reader(path))
        except Exception as e:  # CheckpointException wraps the failing rank's error
            raise TrainError(f"cannot resume from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        set_model_state_dict(model, weights, options=StateDictOptions(strict=not trainable_only))
        set_optimizer_state_dict(model, optimizer, optim)
        rank = 0 if world is None else world.rank
        own = path / _rng_file(rank)
        rng = load_tensors(own if own.is_file() else path / _rng_file(0))
        torch.set_rng_state(rng["torch"])
        device = torch.device("cpu") if world is None else world.device
        if "cuda" in rng and device.type == "cuda" and own.is_file():
            torch.cuda.set_rng_state(rng["cuda"], device)
        return
    if world is None:
        raise ValueError("a one-process checkpoint on one process is the trainer's own job")
    # a one-process checkpoint (safetensors) resumed on several ranks: each rank reads it whole and
    # keeps its shards
    full = load_weights(path)
    if set(full) != set(weights):
        raise TrainError(f"cannot resume from {path}: its weights are not {what}")
    options = StateDictOptions(full_state_dict=True, strict=not trainable_only)
    set_model_state_dict(model, full, options=options)
    saved = read_optimizer(path)
    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    names = [name for group in groups for name in group["params"]]  # index in the saved state -> name
    if len(saved["param_groups"]) != len(groups) or max(saved["state"], default=-1) >= len(names):
        raise TrainError(f"cannot resume from {path}: its optimizer state is not this run's")
    moments = {names[i]: values for i, values in saved["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": [
        {**g, "params": mine["params"]} for g, mine in zip(saved["param_groups"], groups)]}, options=options)
    load_rng(path)  # every rank the one process's state (its dropout draws are another run's anyway)
