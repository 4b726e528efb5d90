"""The inference side of `edgetl serve`: a loaded model in a slot, its worker thread and bounded
queue (micro-batching), and the hot swap of a new bundle. No web framework here (see app.py).

One :class:`ModelSlot` per loaded bundle: a :class:`~edgetl.device.predictor.Predictor` with every
head, a ``queue.Queue(maxsize=queue_size)`` and one worker thread that takes one job, then up to
``max_batch - 1`` more waiting at most ``max_wait_ms``, and runs one ``predictor.logits`` call for
the batch. A job may come undecoded (its ``prepare`` set, when the app found the worker idle): the
worker decodes and preprocesses it first, and a bad image fails that job alone. A full queue is
refused at once (:class:`QueueFull`: the app answers 503). A request that gave up (its future
cancelled) is skipped if its batch has not started.

:class:`Engine` holds the current slot. A :class:`Watcher` thread polls the bundle folder (its
inode, and manifest.json's mtime and size: ``edgetl deploy`` renames a new folder over the old);
on a change, or on :meth:`Engine.request_reload` (SIGHUP), the new bundle is verified, loaded and
warmed up beside the old one, then swapped in: jobs already queued on the old slot finish there,
and its worker stops once its queue is empty. A bad new bundle is refused (:attr:`Engine.pending`
says why) and the old one keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.errors import BundleError
from edgetl.device.predictor import Predictor

log = logging.getLogger(__name__)

_STOP = object()  # put on a slot's queue: the worker stops once it reaches it


class QueueFull(Exception):
    """The model's queue is full: answer 503 with Retry-After."""


class NotReady(Exception):
    """No model is loaded (yet)."""


def bundle_version(manifest_bytes: bytes) -> str:
    """First 12 hex characters of the sha256 of manifest.json's bytes (the manifest holds every
    file's sha256, so this names the bundle's content)."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:12]


def _now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def job_records(
    predictor: Predictor, job: Job, logits: dict[str, np.ndarray], row: int, features: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """The records ``edgetl predict --json`` prints for the job's image (row ``row`` of the batch's
    ``logits`` and trunk ``features``) and the heads it asked for: image, head, label, score, top_k,
    unfamiliar and its score (heads with statistics), variant, runtime."""
    mine = {h: logits[h][row : row + 1] for h in job.heads}
    tag = {"variant": predictor.variant, "runtime": predictor.runtime}
    feats = None if features is None else features[row : row + 1]
    return [{**r, **tag} for r in predictor.records([job.name], mine, job.top_k, features=feats)]


# Decode and preprocess one request's image for a predictor: ((1, 3, S, S), decode ms, preprocess ms).
Prepare = Callable[[Predictor], tuple[np.ndarray, float, float]]


@dataclasses.dataclass(eq=False)
class Job:
    """One request's image: preprocessed (``x``: (1, 3, S, S) float32), or still to be prepared by
    the worker (``x`` None and ``prepare`` set: see :meth:`ModelSlot.idle`); the heads asked for
    and top_k."""

    x: np.ndarray | None
    heads: tuple[str, ...]
    top_k: int
    name: str = "upload"
    prepare: Prepare | None = None
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)

    def cancel(self) -> bool:
        """Give up on this job: the worker skips it if its batch has not started."""
        return self.future.cancel()


@dataclasses.dataclass
class Stats:
    """Callbacks the worker reports to (the app's Prometheus metrics); each may be None."""

    on_batch: Callable[[int, float], None] | None = None  # (batch size, inference seconds)


class ModelSlot:
    """One loaded bundle: its predictor, version, queue and worker thread."""

    def __init__(
        self,
        path: Path,
        predictor: Predictor,
        version: str,
        *,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        stats: Stats | None = None,
    ) -> None:
        self.path = path
        self.predictor = predictor
        self.version = version
        self.loaded_at = _now_utc()
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.stats = stats or Stats()
        self._lock = threading.Lock()
        self._closed = False
        self._busy = False  # the worker is running a batch
        self._thread = threading.Thread(target=self._run, name=f"edgetl-serve-worker-{version}", daemon=True)

    @property
    def variant(self) -> str:
        return self.predictor.variant

    def start(self) -> ModelSlot:
        self._thread.start()
        return self

    def depth(self) -> int:
        return self.queue.qsize()

    def idle(self) -> bool:
        """Nothing queued and no batch running: a job submitted now starts at once, so the worker
        may as well decode it itself (one thread hand-off fewer than decoding in the app's thread
        pool first). When the worker is busy the app decodes in its pool, beside the inference."""
        return not self._busy and self.queue.empty()

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False if this slot is closed (swapped out: submit to the new one), and
        :class:`QueueFull` when its queue is full."""
        with self._lock:
            if self._closed:
                return False
            try:
                self.queue.put_nowait(job)
            except queue.Full:
                raise QueueFull from None
        return True

    def close(self) -> None:
        """No new jobs; the worker finishes the queued ones, then stops."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.queue.put(_STOP)  # blocks while full: the worker is emptying it

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # The worker thread ------------------------------------------------------------------------

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is _STOP:
                break
            self._busy = True
            batch = [first]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.perf_counter()
                try:
                    job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stop = True
                    break
                batch.append(job)
            try:
                self._run_batch(batch)
            finally:
                self._busy = False

    def _fits(self, job: Job, size: int) -> bool:
        return job.x.shape[1:] == (3, size, size) and all(h in self.predictor.labels for h in job.heads)

    def _prepared(self, job: Job) -> bool:
        """Decode and preprocess a job that came undecoded; on a bad image its future gets the
        error (the app answers 422) and the rest of the batch goes on."""
        if job.x is not None:
            return True
        try:
            assert job.prepare is not None
            job.x, job.decode_ms, job.preprocess_ms = job.prepare(self.predictor)
        except Exception as exc:  # DataError for a bad image; anything else fails this job only
            job.future.set_exception(exc)
            return False
        finally:
            job.prepare = None  # the request's bytes are not needed any more
        return True

    def _run_batch(self, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]  # skips cancelled jobs
        picked = time.perf_counter()
        live = [job for job in live if self._prepared(job)]
        size = self.predictor.preprocessing.input_size
        for job in [j for j in live if not self._fits(j, size)]:
            # Prepared for the model before a swap, and this one differs (heads, input size).
            live.remove(job)
            job.future.set_exception(NotReady("the model changed during this request; send it again"))
        if not live:
            return
        started = time.perf_counter()
        try:
            heads = tuple(h for h in self.predictor.head_names if any(h in job.heads for job in live))
            x = live[0].x if len(live) == 1 else np.concatenate([job.x for job in live])
            logits, feats = self.predictor.outputs(x, heads=heads)
            seconds = time.perf_counter() - started
            results = [
                {
                    "records": job_records(self.predictor, job, logits, row, feats),
                    "queue_ms": (picked - job.enqueued) * 1000.0,
                    "decode_ms": job.decode_ms,
                    "preprocess_ms": job.preprocess_ms,
                    "inference_ms": seconds * 1000.0,
                    "batch": len(live),
                    "model": {"version": self.version, "variant": self.variant},
                }
                for row, job in enumerate(live)
            ]
            # Idle from here: a request answered now may send the next one before this thread has
            # returned to the queue, and that one is then the worker's to decode.
            self._busy = False
            for job, result in zip(live, results, strict=True):
                job.future.set_result(result)
        except BaseException as exc:  # the runtime's errors: every job of the batch fails, the worker goes on
            log.error("inference failed for a batch of %d: %s", len(live), one_line(exc))
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if self.stats.on_batch is not None:
            self.stats.on_batch(len(live), seconds)


def one_line(exc: BaseException) -> str:
    """An exception as one line of at most 300 characters (for logs and JSON errors)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """What :class:`Engine` loads and how it batches. ``load_options`` is a
    :class:`~edgetl.device.bundle_loading.LoadOptions` (its ``heads`` are replaced by ``"all"``)."""

    bundle: Path
    load_options: Any = None
    max_batch: int = 1
    max_wait_ms: float = 2.0
    queue_size: int = 16
    watch_interval: float = 2.0


class Engine:
    """The serving model: the current :class:`ModelSlot`, hot swaps, and the reload state."""

    def __init__(self, settings: EngineSettings, *, stats: Stats | None = None) -> None:
        self.settings = settings
        self.path = Path(settings.bundle)
        self.stats = stats or Stats()
        self._slot: ModelSlot | None = None
        self._swap_lock = threading.Lock()  # one load/swap at a time
        self._retired: list[ModelSlot] = []
        self.pending: dict[str, Any] | None = None
        self._reload = threading.Event()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._signature: tuple | None = None
        self.on_swap: Callable[[ModelSlot, ModelSlot], None] | None = None

    # Loading --------------------------------------------------------------------------------------

    @property
    def slot(self) -> ModelSlot:
        slot = self._slot
        if slot is None:
            raise NotReady
        return slot

    @property
    def ready(self) -> bool:
        return self._slot is not None

    def _load(self) -> ModelSlot:
        """Verify, load and warm up the bundle at the path now; a new started slot."""
        from edgetl.device.bundle_loading import LoadOptions, open_bundle

        before = _read_manifest_bytes(self.path)
        bundle = open_bundle(self.path)  # every file's sha256
        options = self.settings.load_options or LoadOptions()
        predictor = bundle.load(dataclasses.replace(options, heads="all"))
        if _read_manifest_bytes(self.path) != before:
            raise BundleError(f"bundle {self.path} changed while it was loaded; it is loaded again at the next change")
        self._warm_up(predictor)
        slot = ModelSlot(
            self.path,
            predictor,
            bundle_version(before),
            max_batch=self.settings.max_batch,
            max_wait_ms=self.settings.max_wait_ms,
            queue_size=self.settings.queue_size,
            stats=self.stats,
        )
        return slot.start()

    def _warm_up(self, predictor: Predictor) -> None:
        """One inference of every head on a blank batch (1, then max_batch images): the runtime
        allocates now, and a model that returns the wrong shape or non-finite numbers is refused
        before it serves."""
        s = predictor.preprocessing.input_size
        for n in dict.fromkeys((1, self.settings.max_batch)):
            x = np.zeros((n, 3, s, s), dtype=np.float32)
            predictor.records(["warm-up"] * n, predictor.logits(x, heads=predictor.head_names), 1)

    def start(self) -> Engine:
        """Load and warm up the bundle (a BundleError etc. when it cannot serve), then start the
        watcher (unless watch_interval is 0: SIGHUP still reloads)."""
        self._signature = _signature(self.path)
        self._slot = self._load()
        self._watcher = threading.Thread(target=self._watch, name="edgetl-serve-watcher", daemon=True)
        self._watcher.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the watcher; every worker finishes its queued jobs and stops."""
        self._stopping.set()
        self._reload.set()
        if self._watcher is not None:
            self._watcher.join(timeout)
        with self._swap_lock:
            slots = [s for s in (self._slot, *self._retired) if s is not None]
        for slot in slots:
            slot.close()
        for slot in slots:
            slot.join(timeout)

    # Requests -------------------------------------------------------------------------------------

    def submit(self, job: Job, slot: ModelSlot | None = None) -> concurrent.futures.Future:
        """Queue ``job`` on ``slot`` (the one its image was prepared for), or on the current slot
        when that one has been swapped out since; QueueFull at once when the queue is full."""
        if slot is not None and slot.submit(job):
            return job.future
        for _ in range(100):  # a swap between reading the slot and queueing: queue on the new one
            if self.slot.submit(job):
                return job.future
        raise NotReady

    def depth(self) -> int:
        """Jobs waiting on every slot (the current one, and old ones finishing): never waits for
        a reload in progress (the metrics endpoint reads it on the event loop)."""
        slots = [s for s in (self._slot, *self._retired) if s is not None]
        return sum(s.depth() for s in slots)

    # Hot swap -------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Load the bundle again now, changed or not (SIGHUP)."""
        self._reload.set()

    def _watch(self) -> None:
        interval = self.settings.watch_interval
        while not self._stopping.is_set():
            forced = self._reload.wait(interval if interval > 0 else None)
            if self._stopping.is_set():
                return
            self._reload.clear()
            signature = _signature(self.path)
            if signature is None:  # between the two renames of a deploy, or removed: wait
                continue
            if forced or signature != self._signature:
                self._signature = signature
                self.reload()

    def reload(self) -> bool:
        """Load the bundle at the path and swap it in; on failure keep the old one and record why
        in :attr:`pending` (state "refused"). True when swapped."""
        with self._swap_lock:
            self._reap()
            version = _version_or_none(self.path)
            self.pending = {"version": version, "state": "loading", "reason": None}
            log.info("loading the changed bundle %s (version %s)", self.path, version)
            try:
                new = self._load()
            except Exception as exc:  # whatever the new bundle does wrong, the old one serves on
                reason = one_line(exc)
                self.pending = {"version": version, "state": "refused", "reason": reason}
                current = self._slot.version if self._slot is not None else None
                log.error("refused the new bundle at %s: %s; still serving version %s", self.path, reason, current)
                return False
            old, self._slot = self._slot, new
            self.pending = None
            if old is not None:
                self._retired.append(old)
        log.info("now serving %s version %s (%s)", self.path, new.version, new.variant)
        if old is not None:
            threading.Thread(target=old.close, name="edgetl-serve-retire", daemon=True).start()
            if self.on_swap is not None:
                self.on_swap(old, new)
        return True

    def _reap(self) -> None:
        self._retired = [s for s in self._retired if s._thread.is_alive()]


def _read_manifest_bytes(path: Path) -> bytes:
    try:
        return (path / "manifest.json").read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{path} is not a bundle (no manifest.json); point edgetl serve at a bundle folder") from None


def _version_or_none(path: Path) -> str | None:
    try:
        return bundle_version((path / "manifest.json").read_bytes())
    except OSError:
        return None


def _signature(path: Path) -> tuple | None:
    """What changes when a bundle is replaced or edited in place: the folder's inode, and every
    file's inode, mtime and size (a bundle holds a few dozen files at most). Files copied in one by
    one (``cp good/* bundle/``) may trigger a reload that is refused half-way; the last file's
    change triggers another, so the server does not stay on "refused" once the copy is complete."""
    try:
        folder = os.stat(path)
        os.stat(path / "manifest.json")
        files = []
        stack = [path]
        while stack and len(files) <= 10_000:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    else:
                        st = entry.stat(follow_symlinks=False)
                        files.append((entry.path, st.st_ino, st.st_mtime_ns, st.st_size))
    except OSError:
        return None
    return (folder.st_dev, folder.st_ino, tuple(sorted(files)))


__all__ = [
    "Engine",
    "EngineSettings",
    "Job",
    "ModelSlot",
    "NotReady",
    "Prepare",
    "QueueFull",
    "Stats",
    "bundle_version",
    "job_records",
    "one_line",
]
