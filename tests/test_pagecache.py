"""The page-cache readers: the start's library file list (recorded, then read ahead by the next
start) and whole-file read-ahead. Real files, real ``mincore``, no mocks."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from wan_worker.infra import pagecache

MiB = 1 << 20


def write(path, size: int) -> None:
    path.write_bytes(os.urandom(size))


def test_reader_reads_every_byte_of_whole_files_in_pieces(tmp_path):
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    write(big, pagecache.CHUNK + 3 * MiB)  # two pieces
    write(small, 1000)
    pieces = pagecache.whole_files([big, small])
    assert pieces == [
        (str(big), 0, pagecache.CHUNK),
        (str(big), pagecache.CHUNK, 3 * MiB),
        (str(small), 0, 1000),
    ]
    stats = pagecache.Reader(pieces, threads=2).wait(timeout=30)
    assert stats.done and stats.errors == 0 and stats.files == 2
    assert stats.bytes_read == stats.bytes_planned == pagecache.CHUNK + 3 * MiB + 1000


def test_reader_counts_an_unreadable_file_and_reads_the_rest(tmp_path):
    good = tmp_path / "good.bin"
    write(good, 5000)
    stats = pagecache.Reader([(str(tmp_path / "gone.bin"), 0, 10), (str(good), 0, 5000)], threads=1).wait(30)
    assert stats.done and stats.errors == 1 and stats.bytes_read == 5000


def test_an_empty_reader_is_done_at_once():
    stats = pagecache.Reader([]).wait(timeout=1)
    assert stats.done and stats.bytes_read == 0 and stats.files == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise are Linux calls")
def test_resident_ranges_are_the_pages_that_were_read(tmp_path):
    path = tmp_path / "lib.so"
    write(path, 8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        if pagecache.resident_ranges(str(path), 8 * MiB):
            pytest.skip("this filesystem keeps file pages in memory (tmpfs)")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead beyond what is read
        os.pread(fd, MiB, 2 * MiB)
        os.pread(fd, 4096, 6 * MiB)
    finally:
        os.close(fd)
    assert pagecache.resident_ranges(str(path), 8 * MiB) == [(2 * MiB, MiB), (6 * MiB, 4096)]


def test_nearby_resident_runs_merge_into_one_read():
    page = 4096
    gap = pagecache.MERGE_GAP // page
    resident = bytes([1, 1] + [0] * gap + [1] + [0] * (gap + 1) + [1])
    size = len(resident) * page - 100  # the last page is partial
    assert pagecache._merge(resident, page, size) == [
        (0, (3 + gap) * page),
        ((4 + 2 * gap) * page, page - 100),
    ]


def recorded_name(source: str) -> str:
    cached = importlib.util.cache_from_source(source)
    return os.path.realpath(cached if os.path.isfile(cached) else source)


def test_the_start_records_its_files_and_the_next_start_reads_them(tmp_path):
    folder = tmp_path / "cache"
    info = pagecache.record_startup_files(folder)
    assert info["recorded"] and info["files"] > 50 and info["bytes"] > 0, info
    data = json.loads(pagecache.manifest_path(folder).read_text())
    names = [name for name, _, _ in data["files"]]
    # modules as their bytecode where it was written, in import order: a package before its modules
    this, package = recorded_name(pagecache.__file__), recorded_name(sys.modules["wan_worker"].__file__)
    assert this in names and names.index(package) < names.index(this)
    assert not any(name.endswith(".safetensors") for name in names)  # libraries only
    # what an import only looks at: the package's directory (listed) and, with bytecode, its source (dated)
    assert os.path.dirname(os.path.realpath(pagecache.__file__)) in data["touch"]
    if this.endswith(".pyc"):
        assert os.path.realpath(pagecache.__file__) in data["touch"]
    assert pagecache.record_startup_files(folder)["reason"] == "already recorded"

    reader = pagecache.prefetch_startup_files(folder, threads=4)
    assert reader is pagecache.startup_reader
    stats = reader.wait(timeout=60)
    assert stats.done and stats.errors == 0 and stats.files == info["files"]
    assert stats.bytes_read == stats.bytes_planned == info["bytes"]


def test_a_file_changed_since_it_was_recorded_is_skipped(tmp_path):
    kept, changed = tmp_path / "kept.pyc", tmp_path / "changed.pyc"
    write(kept, 300)
    write(changed, 200)
    files = [[str(kept), 300, [[0, 300]]], [str(changed), 100, [[0, 100]]], [str(tmp_path / "gone"), 5, [[0, 5]]]]
    manifest = {"version": pagecache.MANIFEST_VERSION, "touch": [str(tmp_path)], "files": files}
    pagecache.manifest_path(tmp_path).write_text(json.dumps(manifest))
    stats = pagecache.prefetch_startup_files(tmp_path).wait(timeout=30)
    assert stats.files == 1 and stats.bytes_read == 300 and stats.errors == 0


def test_a_list_of_another_format_is_ignored(tmp_path):
    pagecache.manifest_path(tmp_path).write_text(json.dumps({"version": 1, "files": []}))
    assert pagecache.prefetch_startup_files(tmp_path) is None


def test_an_unreadable_list_starts_without_prefetch(tmp_path, caplog):
    assert pagecache.prefetch_startup_files(tmp_path) is None  # none recorded yet: quiet
    assert not caplog.records
    pagecache.manifest_path(tmp_path).write_text("{not json")
    assert pagecache.prefetch_startup_files(tmp_path) is None
    assert "startup file list unreadable" in caplog.text


def test_a_folder_that_cannot_be_written_is_reported_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    info = pagecache.record_startup_files(blocker / "cache")
    assert info["recorded"] is False and "reason" in info


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and fadvise are Linux calls")
def test_cache_files_are_listed_only_where_this_start_used_them(tmp_path):
    caches = tmp_path / "inductor"
    (caches / "triton").mkdir(parents=True)
    used, stale = caches / "triton" / "kernel.cubin", caches / "old.pkl"
    write(used, 5000)
    write(stale, 7000)
    fd = os.open(stale, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if pagecache.resident_ranges(str(stale), 7000):
        pytest.skip("this filesystem keeps file pages in memory (tmpfs)")
    info = pagecache.record_startup_files(tmp_path / "list", (caches,))
    assert info["cache_files"] == 1 and info["cache_bytes"] == 5000, info
    files = json.loads(pagecache.manifest_path(tmp_path / "list").read_text())["files"]
    assert files[-1] == [str(used), 5000, [[0, 5000]]] and str(stale) not in {f[0] for f in files}


def test_a_warm_worker_leaves_its_list_for_the_next_start(api_worker, compile_cache_dir):
    """``handler.py`` with WARMUP_ON_START (the default) records the list where the next start looks."""
    assert api_worker.runsync({"action": "health"})["status"] == "COMPLETED"  # warm and serving
    data = json.loads(pagecache.manifest_path(compile_cache_dir).read_text())
    names = {name for name, _, _ in data["files"]}
    assert recorded_name(pagecache.__file__) in names and len(names) > 100
