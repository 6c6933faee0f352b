"""The engine thread: it alone touches the model. It loads the pipeline, takes jobs and cancellations
from a thread-safe queue, adds their requests to a ContinuousBatcher, steps it, and hands each event
to its job (which posts to its handler's asyncio queue with loop.call_soon_threadsafe).

Admission is counted here too (any thread may ask): at most settings.capacity HTTP requests are in
flight, running or waiting; the handler that finds no room answers 429 at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from ..engine import (Finished, ImageDone, ImageRow, ImageStarted, SpeechChunk, SpeechStarted, TextDelta, VideoDone,
                      VideoStarted)
from ..engine.continuous import ContinuousBatcher
from .errors import APIError, from_value_error
from .jobs import Job
from .metrics import Metrics
from .settings import ServeSettings

log = logging.getLogger("tokenloom.serve")


PREVIEW_FILL = (232, 232, 232)  # the not yet drawn part of a preview
MAX_PENDING = 16  # messages waiting for a client above which previews are skipped


class _Row:
    """One engine request of a job, and the image it is drawing (for previews)."""

    __slots__ = ("job", "index", "height", "rows", "previews", "sent")

    def __init__(self, job: Job, index: int):
        self.job, self.index = job, index
        self.height = 0
        self.rows: list[np.ndarray] = []
        self.previews: set[int] = set()
        self.sent = 0


def model_id_for(settings: ServeSettings) -> str:
    if settings.model_id:
        return settings.model_id
    from ..adapters import adapter_base, is_adapter_dir

    adapter, model = settings.adapter, settings.model
    if adapter is None and model is not None and is_adapter_dir(model):  # an adapter as --model: its base, with it
        adapter, model = model, None
        try:
            model = str(adapter_base(adapter))
        except (OSError, ValueError):
            pass
    if adapter is not None:  # "base+run" for runs/x/final
        adapter = Path(adapter).resolve()
        base = Path(model).resolve().name if model is not None else "default"
        return f"{base}+{adapter.parent.name if adapter.name == 'final' else adapter.name}"
    if settings.model is not None:
        return Path(settings.model).resolve().name or "model"
    from ..pipeline import default_model_path

    path = default_model_path()
    return path.name if path is not None else "random"


class EngineWorker:
    def __init__(self, settings: ServeSettings, metrics: Metrics, pipe=None):
        self.settings, self.metrics = settings, metrics
        self.pipe = pipe
        self.model_id = model_id_for(settings)
        self.state = "loading"  # loading -> ready -> stopped, or failed
        self.load_error: BaseException | None = None
        self.on_fatal = None  # called (from the engine thread) when the model cannot be loaded
        self.batcher: ContinuousBatcher | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._rows: dict[int, _Row] = {}
        self._jobs: set[Job] = set()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = False
        self._closed = False  # the engine thread has stopped taking commands
        self._thread = threading.Thread(target=self._run, name="tokenloom-engine", daemon=True)

    # -- any thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def try_admit(self) -> bool:
        with self._lock:
            if self._in_flight >= self.settings.capacity:
                return False
            self._in_flight += 1
        return True

    def release(self, job: Job) -> None:
        """Give back a job's admission slot (once, whoever calls first)."""
        with self._lock:
            if job.released:
                return
            job.released = True
            self._in_flight -= 1

    def submit(self, job: Job) -> None:
        with self._lock:  # the engine thread closes the queue under this lock before its last drain
            closed = self._stopping or self._closed
            if not closed:
                self._commands.put(("submit", job))
        if closed:
            job.post("error", APIError(503, "the server is shutting down", code="server_shutting_down"))
            self.release(job)

    def cancel(self, job: Job) -> None:
        if not job.cancelled and not job.finished:
            job.cancelled = True
            self._commands.put(("cancel", job))

    # -- the engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.pipe is None:
                from ..pipeline import load

                self.pipe = load(self.settings.model, device=self.settings.device, dtype=self.settings.dtype,
                                 adapter=self.settings.adapter)
            elif callable(self.pipe):  # a loader
                self.pipe = self.pipe()
            self.pipe.use_speculative(self.settings.speculative, self.settings.speculative_window)
            self.batcher = ContinuousBatcher(self.pipe.engine, self.settings.max_batch)
        except BaseException as e:  # noqa: BLE001 - reported by /health and the CLI
            with self._lock:
                self._closed = True
            self.load_error, self.state = e, "failed"
            log.error("cannot load the model: %s", e)
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        self.state = "ready"
        self.metrics.set_gauges(ready=1)
        try:
            with torch.inference_mode():
                self._loop()
        finally:
            with self._lock:
                self._closed = True  # no submit gets in after this: the drain below sees every job
            self.state = "stopped"
            self.metrics.set_gauges(ready=0)
            self._fail_all(APIError(503, "the server is shutting down", code="server_shutting_down"))
            while True:  # jobs still queued
                try:
                    kind, job = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "submit":
                    job.post("error", APIError(503, "the server is shutting down", code="server_shutting_down"))
                    self._finish(job)

    def _loop(self) -> None:
        while not self._stopping:
            busy = self.batcher.has_work()
            try:  # idle: wait for work (a stop command wakes it too)
                command = self._commands.get_nowait() if busy else self._commands.get(timeout=0.5)
            except queue.Empty:
                command = None
            while command is not None:
                self._command(*command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self._stopping:
                break
            if self.batcher.has_work():
                try:
                    events = self.batcher.step()
                except Exception:  # noqa: BLE001 - a bug or out of memory: fail its requests, keep serving
                    self._engine_failed()
                    continue
                for event in events:
                    self._dispatch(event)
            self._gauges()

    def _gauges(self) -> None:
        b = self.batcher
        self.metrics.set_gauges(queue_depth=b.waiting, running_requests=b.running,
                                running_rows=getattr(b, "running_rows", b.running), requests_in_flight=self._in_flight)

    def _command(self, kind: str, job: Job | None) -> None:
        if kind == "submit":
            self._admit(job)
        elif kind == "cancel":
            self._cancel(job)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self.metrics.incr("cancelled")
            job.post("cancelled")
            self._finish(job)
            return
        rids: list[int] = []
        try:
            for request in job.build(self.pipe):
                rids.append(self.batcher.add(request))
        except Exception as e:  # noqa: BLE001
            for rid in rids:
                self.batcher.cancel(rid)
            if isinstance(e, (ValueError, APIError)):
                error = from_value_error(e)
            else:
                log.error("preparing a %s request failed:\n%s", job.kind, traceback.format_exc())
                error = APIError(500, f"internal error while preparing the request: {type(e).__name__}: {e}")
            job.post("error", error)
            self._finish(job)
            return
        job.rids = rids
        for index, rid in enumerate(rids):
            self._rows[rid] = _Row(job, index)
        self._jobs.add(job)
        job.post("accepted")

    def _cancel(self, job: Job) -> None:
        if job not in self._jobs:
            return  # finished, or refused, already (its submit came first: the queue keeps order)
        self._drop(job)
        self.metrics.incr("cancelled")
        job.post("cancelled")
        self._finish(job)

    def _drop(self, job: Job) -> None:
        for rid in job.rids:
            if self._rows.pop(rid, None) is not None:
                self.batcher.cancel(rid)
        self._jobs.discard(job)

    def _finish(self, job: Job) -> None:
        job.finished = True
        self._jobs.discard(job)
        self.release(job)
        self.metrics.observe_duration(time.monotonic() - job.created)

    def _dispatch(self, event) -> None:
        row = self._rows.get(event.row)
        if row is None:
            return  # a cancelled request's last events
        job = row.job
        try:
            if isinstance(event, (TextDelta, ImageStarted, VideoStarted, SpeechStarted)) and job.first_output is None:
                job.first_output = time.monotonic()
                self.metrics.observe_ttft(job.first_output - job.created)
            if isinstance(event, TextDelta):
                job.on_text(row.index, event.text)
            elif isinstance(event, ImageStarted):
                row.height, row.rows, row.sent = event.height, [], 0
                row.previews = job.preview_rows(row.index, event.height)
            elif isinstance(event, ImageRow):
                row.rows.append(np.asarray(event.codes))
                # A preview is skipped while the client has not read what was sent before: a reader
                # that stalls holds at most MAX_PENDING messages of its request, not every preview.
                if len(row.rows) in row.previews and job.queue.qsize() < MAX_PENDING:
                    image = self._preview(row)
                    if image is not None:
                        job.on_preview(row.index, image, row.sent)
                        row.sent += 1
            elif isinstance(event, ImageDone):
                job.on_image(row.index, event.image)
            elif isinstance(event, VideoDone):
                if event.video.pixels is not None:
                    job.on_video(row.index, list(event.video.pixels))
            elif isinstance(event, SpeechStarted):
                job.on_speech_started(row.index)
            elif isinstance(event, SpeechChunk):
                if event.audio is not None and event.audio.size:
                    job.on_speech_chunk(row.index, event.audio, self.pipe.speech_tokenizer.config.sample_rate)
            elif isinstance(event, Finished):
                del self._rows[event.row]
                self.metrics.add_tokens(len(event.result.ids))
                if job.on_finished(row.index, event.result, self.pipe):
                    job.post("done")
                    self._finish(job)
        except Exception as e:  # noqa: BLE001 - one job's failure (a preview, a rerank) is not the server's
            log.error("a %s request failed:\n%s", job.kind, traceback.format_exc())
            self._drop(job)
            job.post("error", APIError(500, f"internal error: {type(e).__name__}: {e}"))
            self._finish(job)

    def _preview(self, row: _Row):
        """The rows drawn so far: the grid filled by repeating the last row (the VQGAN decodes whole
        grids), decoded, and the part below the drawn rows painted over, so the image fills in row by row."""
        grid = np.stack(row.rows)
        missing = row.height - len(row.rows)
        if missing > 0:
            grid = np.concatenate([grid, np.repeat(grid[-1:], missing, axis=0)])
        image = self.pipe.engine.decode_image(grid)
        if image is not None and missing > 0:
            top = len(row.rows) * image.height // row.height
            image.paste(PREVIEW_FILL, (0, top, image.width, image.height))
        return image

    def _engine_failed(self) -> None:
        log.error("an engine step failed; its requests get a 500:\n%s", traceback.format_exc())
        self.metrics.incr("engine_errors")
        self.batcher = ContinuousBatcher(self.pipe.engine, self.settings.max_batch)
        for job in self._jobs:  # the new batcher knows none of their requests (and counts ids afresh)
            job.rids = []
        self._fail_all(APIError(500, "internal error: the engine step failed; the request was dropped"))

    def _fail_all(self, error: APIError) -> None:
        for job in list(self._jobs):
            self._drop(job)
            job.post("error", error)
            self._finish(job)
        self._rows.clear()
