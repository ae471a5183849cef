"""Read the start-up checkpoints into the page cache, many reads at a time, while Python imports.

A cold start reads the checkpoints through ``from_pretrained``'s memory maps, one page fault
after another: about 1 GB/s from a local NVMe disk, less from a network volume. Many reads
in flight at once go several times faster, and they overlap the 10-15 s the interpreter
spends importing torch, diffusers and transformers. ``handler.py`` starts this before those
imports, so the loads that follow find the bytes in memory. Only the standard library and
the settings are imported here, and only up to half of the machine's memory is read ahead
(more would evict what was read first). ``PREFETCH_WEIGHTS=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelUnavailable
from .locate import ModelLocator
from .settings import Settings

log = logging.getLogger(__name__)

#: Reads in flight: enough to keep an NVMe queue or a network volume busy.
THREADS = 8
CHUNK_BYTES = 8 * 1024**2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def start_up_models(settings: Settings) -> list[str]:
    """The checkpoints ``WARMUP_ON_START`` loads, in the order it loads them."""
    models = [settings.t2v_model_id]
    if settings.default_quality == "turbo":
        models.append(settings.turbo_model_id)
    if settings.warmup_qwen:
        models.append(settings.qwen_model)
    return models


def weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Prefetch:
    """Background reads of ``files``; ``report()`` says how far they got and how fast."""

    files: list[Path]
    threads: int = THREADS
    bytes_read: int = 0
    errors: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float | None = None

    def __post_init__(self) -> None:
        self._chunks: queue.SimpleQueue[tuple[Path, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self.total_bytes = 0

    def start(self) -> Prefetch:
        for path in self.files:
            try:
                size = path.stat().st_size
            except OSError as exc:  # gone since it was listed: the load will say so
                self.errors.append(f"{path.name}: {exc.strerror}")
                continue
            self.total_bytes += size
            for offset in range(0, size, CHUNK_BYTES):  # file order: the first needed come first
                self._chunks.put((path, offset))
        for _ in range(self.threads):
            self._chunks.put(None)
        self.started = time.perf_counter()
        self._workers = [
            threading.Thread(target=self._read, name=f"prefetch-{i}", daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        threading.Thread(target=self._finish, name="prefetch-done", daemon=True).start()
        return self

    def _read(self) -> None:
        buffer = bytearray(CHUNK_BYTES)
        descriptors: dict[Path, int] = {}
        try:
            while (item := self._chunks.get()) is not None:
                path, offset = item
                try:
                    fd = descriptors.get(path)
                    if fd is None:
                        fd = descriptors[path] = os.open(path, os.O_RDONLY)
                    n = os.preadv(fd, [buffer], offset)  # the GIL is released while the disk works
                except OSError as exc:
                    with self._lock:
                        self.errors.append(f"{path.name}: {exc.strerror}")
                    continue  # the load reports a broken checkpoint clearly; this is only a head start
                with self._lock:
                    self.bytes_read += n
        finally:
            for fd in descriptors.values():
                os.close(fd)

    def _finish(self) -> None:
        for worker in self._workers:
            worker.join()
        self.finished = time.perf_counter()
        log.info("checkpoints prefetched", extra=self.report())

    def report(self) -> dict[str, object]:
        seconds = (self.finished or time.perf_counter()) - self.started
        return {
            "files": len(self.files),
            "bytes": self.total_bytes,
            "bytes_read": self.bytes_read,
            "seconds": round(seconds, 2),
            "gb_per_s": round(self.bytes_read / 1e9 / seconds, 2) if seconds > 0 else None,
            "done": self.finished is not None,
            "errors": self.errors[:5],
        }


def prefetch_on_start(settings: Settings) -> Prefetch | None:
    """Start reading what ``WARMUP_ON_START`` will load; None when there is nothing to do.

    Missing checkpoints are skipped silently here: the load itself reports them clearly.
    """
    if not (settings.prefetch_weights and settings.warmup_on_start and settings.model_profile == "full"):
        return None
    locator, files = ModelLocator(settings), []
    for repo_id in start_up_models(settings):
        try:
            files.extend(weight_files(locator.resolve(repo_id)))
        except ModelUnavailable:
            continue
    budget, chosen = memory_bytes() // 2, []
    for path in files:
        budget -= path.stat().st_size
        if budget < 0:
            break
        chosen.append(path)
    return Prefetch(chosen).start() if chosen else None
