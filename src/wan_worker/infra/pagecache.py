"""Reading files into the OS page cache ahead of the code that needs them.

A worker starting on a cold page cache waits on its disk twice. First for the imports: about
3,600 modules read one after another, each a synchronous read that pays the disk's latency
(13.6 s on a cold cache against 9.9 s on a warm one, on an H100 host). Then for about 15 GB of
checkpoints. Two readers fix what each can:

- **The start's library files** (``record_startup_files`` / ``prefetch_startup_files``). After
  a warm-up the worker records what its imports read: the directories they listed, each
  module's bytecode (and the source file whose date validates it), and for shared libraries
  only the pages in the page cache (``mincore``). The next start reads that list with many
  threads from its first line, so each import finds its files cached instead of waiting its
  turn on the disk. Checkpoints are not in it: bulk reads queued ahead of the imports' own
  reads made the imports wait (measured: twice as long).
- **Checkpoints during the warm-up** (``Reader`` over ``whole_files``): the T2V weights are
  read by many threads while the transformer and VAE load and compile, so UMT5's
  ``from_pretrained`` afterwards copies from memory.

Stdlib only: ``prefetch_startup_files`` runs before torch is imported.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import mmap
import os
import stat
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: One read; a file larger than this is split, so several threads share it in order.
CHUNK = 8 << 20
#: Resident page runs closer than this are read as one range (fewer, larger reads).
MERGE_GAP = 256 << 10
#: Files at most this size are read whole; larger ones only where they were resident.
SMALL_FILE = 1 << 20
MANIFEST_VERSION = 2

#: (path, offset, length, size) of one read of a regular file of ``size`` bytes; length 0: only
#: the file's inode, or a directory's listing.
Piece = tuple[str, int, int, int]
#: The most one startup list may read (the libraries of a start are about 1.7 GB).
STARTUP_BUDGET = 4 << 30


@dataclass
class ReadStats:
    files: int = 0
    bytes_planned: int = 0
    bytes_read: int = 0
    errors: int = 0
    seconds: float = 0.0
    done: bool = False

    def as_dict(self) -> dict[str, Any]:
        gbps = self.bytes_read / self.seconds / 1e9 if self.seconds else None
        return {
            "files": self.files,
            "bytes_planned": self.bytes_planned,
            "bytes_read": self.bytes_read,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "gb_per_s": round(gbps, 2) if gbps else None,
            "done": self.done,
        }


class Reader:
    """Reads pieces with a pool of daemon threads, taking them in the order given, so the
    front of the list is cached first. Reads release the GIL: the caller goes on meanwhile.
    An unreadable file is counted, never raised: the reader is only an optimisation."""

    def __init__(self, pieces: list[Piece], threads: int = 8) -> None:
        files = {p[0] for p in pieces if p[2]}
        self.stats = ReadStats(files=len(files), bytes_planned=sum(p[2] for p in pieces))
        self._pieces = iter(pieces)
        self._lock = threading.Lock()
        self._running = max(1, min(threads, len(pieces)))
        self._finished = threading.Event()
        self._started = time.perf_counter()
        if not pieces:
            self._finish()
            return
        for i in range(self._running):
            threading.Thread(target=self._run, name=f"pagecache-{i}", daemon=True).start()

    def _run(self) -> None:
        buf = bytearray(CHUNK)
        try:
            while True:
                with self._lock:
                    piece = next(self._pieces, None)
                if piece is None:
                    break
                try:
                    read, failed = _read(piece, buf)
                except Exception:  # noqa: BLE001 - a bad entry costs its read, never the thread
                    read, failed = 0, 1
                with self._lock:
                    self.stats.bytes_read += read
                    self.stats.errors += failed
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._finish()

    def _finish(self) -> None:
        self.stats.seconds = time.perf_counter() - self._started
        self.stats.done = True
        self._finished.set()

    def wait(self, timeout: float | None = None) -> ReadStats:
        self._finished.wait(timeout)
        return self.stats


def _read(piece: Piece, buf: bytearray) -> tuple[int, int]:
    """(bytes read, errors). Only a regular file of the expected size is read (checked on the
    open descriptor, which a non-blocking open never lets a pipe hold)."""
    path, offset, length, size = piece
    done = 0
    if not length:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                os.stat(path)
        except OSError:
            return 0, 1
        return 0, 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0, 1
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            return 0, 1  # not what was recorded: a changed file's ranges are stale
        view = memoryview(buf)
        while done < length:
            n = os.preadv(fd, [view[: min(length - done, len(buf))]], offset + done)
            if n <= 0:
                break
            done += n
    except OSError:
        return done, 1
    finally:
        os.close(fd)
    return done, 0


def whole_files(paths: list[Path]) -> list[Piece]:
    """Each file in ``CHUNK`` pieces, front to back."""
    pieces: list[Piece] = []
    for path in paths:
        size = path.stat().st_size
        pieces.extend(_split(str(path), 0, size, size))
    return pieces


def _split(name: str, start: int, end: int, size: int) -> list[Piece]:
    """Bytes ``[start, end)`` of a file of ``size`` bytes, in ``CHUNK`` pieces."""
    return [(name, off, min(CHUNK, end - off), size) for off in range(start, end, CHUNK)]


# -- the start's library files -----------------------------------------------------------------


def manifest_path(folder: Path) -> Path:
    """One list per Python environment: its location, interpreter and last install (the
    site-packages directory's mtime), so a rebuilt image never reads another's list."""
    purelib = sysconfig.get_paths()["purelib"]
    try:
        installed = os.stat(purelib).st_mtime_ns
    except OSError:
        installed = 0
    key = hashlib.sha256(f"{sys.prefix}|{sys.version}|{purelib}|{installed}".encode()).hexdigest()[:16]
    return Path(folder) / f"startup-files-{key}.json"


#: The reader ``prefetch_startup_files`` started in this process, for health and the benchmark.
startup_reader: Reader | None = None


def prefetch_startup_files(folder: Path, threads: int = 16) -> Reader | None:
    """Start reading the recorded files of this environment's start, if a list was recorded.
    Returns at once; the reads go on in the background while the caller imports. Never raises:
    a list that can't be used is logged and skipped."""
    global startup_reader
    path = manifest_path(folder)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
            return None
        touch = [(name, 0, 0, 0) for name in data["touch"] if isinstance(name, str)]
        pieces = touch + _pieces_of(data["files"])
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - an optimisation must not stop the start
        log.warning("startup file list unreadable; starting without it", extra={"path": str(path), "reason": str(exc)})
        return None
    startup_reader = Reader(pieces, threads=threads)
    return startup_reader


def _pieces_of(files: list[list[Any]]) -> list[Piece]:
    """The reads of a list, without touching the disk (the reader threads check each file).
    Each file's ranges are clipped to its recorded size and merged, and the whole list to
    ``STARTUP_BUDGET``: the list sits on a shared volume and is not trusted to be sane."""
    pieces: list[Piece] = []
    budget = STARTUP_BUDGET
    for name, size, ranges in files:
        if not isinstance(name, str):
            continue
        size = int(size)
        spans = sorted((max(0, int(o)), min(int(o) + int(n), size)) for o, n in ranges)
        merged: list[list[int]] = []
        for start, end in spans:
            if end <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            end = min(end, start + budget)
            budget -= end - start
            pieces.extend(_split(name, start, end, size))
        if budget <= 0:
            break
    return pieces


def record_startup_files(folder: Path, caches: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Write what this process's start read, unless this environment's list exists: the
    directories and sources its imports checked, the modules in import order, the shared
    libraries mapped, then the files under ``caches`` (the compile caches) that are in the page
    cache now, i.e. that this start read or wrote. Those are small files the warm-up reads
    while the weights are read in bulk; each would otherwise wait behind the bulk reads.
    Guarded: a folder that can't be written is reported, not raised."""
    path = manifest_path(folder)
    info: dict[str, Any] = {"path": str(path)}
    if path.is_file():
        return info | {"recorded": False, "reason": "already recorded"}
    started = time.perf_counter()
    tmp: str | None = None
    try:
        touch, libraries = _library_files()
        files = [entry for name in libraries if (entry := _entry(name)) is not None]
        cached = [entry for name in _files_under(caches) if (entry := _entry(name, resident_only=True)) is not None]
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump({"version": MANIFEST_VERSION, "touch": touch, "files": files + cached}, out)
        os.replace(tmp, path)  # atomic: a worker starting meanwhile reads the old list or the new one
        tmp = None
    except Exception as exc:  # noqa: BLE001 - an optimisation must not fail the warm-up
        log.info("startup file list not recorded", extra={"path": str(path), "reason": str(exc)})
        return info | {"recorded": False, "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return info | {
        "recorded": True,
        "files": len(files),
        "bytes": sum(length for _, _, ranges in files for _, length in ranges),
        "cache_files": len(cached),
        "cache_bytes": sum(length for _, _, ranges in cached for _, length in ranges),
        "touched": len(touch),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _library_files() -> tuple[list[str], list[str]]:
    """(directories and sources an import only looks at, files it reads), in import order."""
    touch: dict[str, None] = {}  # ordered sets
    names: dict[str, None] = {}
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source:
            continue
        touch[os.path.dirname(os.path.realpath(source))] = None  # the import finder lists it
        if source.endswith(".py"):
            cached = importlib.util.cache_from_source(source)
            if os.path.isfile(cached):
                touch[os.path.realpath(source)] = None  # its date validates the bytecode
                source = cached
        names[os.path.realpath(source)] = None
    for mapped in _mapped_libraries():
        names.setdefault(mapped, None)
    return [t for t in touch if os.path.exists(t)], [n for n in names if os.path.isfile(n)]


def _mapped_libraries() -> list[str]:
    """Shared libraries this process mapped (torch's CUDA libraries are loaded, not imported)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found: dict[str, None] = {}
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and ".so" in os.path.basename(parts[5]):
            found[os.path.realpath(parts[5])] = None
    return list(found)


def _files_under(folders: tuple[Path, ...]) -> list[str]:
    return sorted(os.path.join(root, f) for folder in folders for root, _, names in os.walk(folder) for f in names)


def _entry(name: str, resident_only: bool = False) -> list[Any] | None:
    """``[path, size, ranges]``: small files whole, large ones where resident (left out where
    ``mincore`` isn't available). ``resident_only``: nothing for a file with no page in the cache."""
    try:
        size = os.stat(name).st_size
        ranges = resident_ranges(name, size) if size and (resident_only or size > SMALL_FILE) else None
    except OSError:
        return None
    if not size or (resident_only and not ranges):
        return None
    if size <= SMALL_FILE:
        return [name, size, [[0, size]]]
    return [name, size, [list(r) for r in ranges]] if ranges else None  # no mincore here: left out


@functools.cache
def _libc() -> Any:
    """The C library's ``mmap``/``mincore``/``munmap`` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def resident_ranges(name: str, size: int) -> list[tuple[int, int]] | None:
    """The byte ranges of a file now in the page cache (``mincore`` on a mapping, which doesn't
    fault pages in), nearby runs merged. ``None`` where ``mincore`` isn't available."""
    libc = _libc()
    if libc is None:
        return None
    page = mmap.PAGESIZE
    fd = os.open(name, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident = bytes(vec)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return _merge(resident, page, size)


def _merge(resident: bytes, page: int, size: int) -> list[tuple[int, int]]:
    ranges: list[list[int]] = []
    i, n = 0, len(resident)
    while i < n:
        if not resident[i] & 1:
            i += 1
            continue
        j = i
        while j < n and resident[j] & 1:
            j += 1
        start, end = i * page, min(j * page, size)
        if ranges and start - ranges[-1][1] <= MERGE_GAP:
            ranges[-1][1] = end
        else:
            ranges.append([start, end])
        i = j
    return [(s, e - s) for s, e in ranges]
