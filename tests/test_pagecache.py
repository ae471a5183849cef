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


@pytest.fixture(autouse=True)
def no_startup_reader(monkeypatch):
    """``prefetch_startup_files`` sets the process's reader; each test starts and ends without one."""
    monkeypatch.setattr(pagecache, "startup_reader", None)


def write(path, size: int) -> None:
    path.write_bytes(os.urandom(size))


def test_reader_reads_every_byte_of_whole_files_in_pieces(tmp_path):
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    write(big, pagecache.CHUNK + 3 * MiB)  # two pieces
    write(small, 1000)
    pieces = pagecache.whole_files([big, small])
    size = pagecache.CHUNK + 3 * MiB
    assert pieces == [
        (str(big), 0, pagecache.CHUNK, size),
        (str(big), pagecache.CHUNK, 3 * MiB, size),
        (str(small), 0, 1000, 1000),
    ]
    stats = pagecache.Reader(pieces, threads=2).wait(timeout=30)
    assert stats.done and stats.errors == 0 and stats.files == 2
    assert stats.bytes_read == stats.bytes_planned == pagecache.CHUNK + 3 * MiB + 1000


def test_reader_counts_an_unreadable_file_and_reads_the_rest(tmp_path):
    good = tmp_path / "good.bin"
    write(good, 5000)
    pieces = [(str(tmp_path / "gone.bin"), 0, 10, 10), (str(good), 0, 5000, 5000)]
    stats = pagecache.Reader(pieces, threads=1).wait(30)
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
    assert stats.done and stats.bytes_read == 300 and stats.errors == 2  # the changed one and the gone one


def test_a_list_never_reads_past_a_file_or_from_a_pipe_or_device(tmp_path):
    short = tmp_path / "short.pyc"
    write(short, 100)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    files = [[str(short), 100, [[50, 10**12]]], [str(fifo), 0, [[0, 10]]], ["/dev/zero", 0, [[0, 10**12]]]]
    manifest = {"version": pagecache.MANIFEST_VERSION, "touch": [], "files": files}
    pagecache.manifest_path(tmp_path).write_text(json.dumps(manifest))
    stats = pagecache.prefetch_startup_files(tmp_path).wait(timeout=30)
    assert stats.done and stats.files == 1 and stats.bytes_read == stats.bytes_planned == 50


def test_repeated_ranges_are_read_once_and_a_list_has_a_budget(tmp_path):
    lib = tmp_path / "lib.so"
    write(lib, 2 * MiB)
    ranges = [[0, 2 * MiB]] * 1000 + [[MiB, 5 * MiB]]
    pieces = pagecache._pieces_of([[str(lib), 2 * MiB, ranges]])
    assert sum(p[2] for p in pieces) == 2 * MiB
    huge = [[f"/lib{i}.so", 10 * pagecache.STARTUP_BUDGET, [[0, 10 * pagecache.STARTUP_BUDGET]]] for i in range(3)]
    assert sum(p[2] for p in pagecache._pieces_of(huge)) == pagecache.STARTUP_BUDGET


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "null",
        '{"version": 2, "touch": [[1]], "files": []}',
        '{"version": 2, "touch": [], "files": [["/x", 1, [[Infinity, 1]]]]}',
    ],
)
def test_a_malformed_list_never_stops_the_start(tmp_path, text):
    pagecache.manifest_path(tmp_path).write_text(text)
    reader = pagecache.prefetch_startup_files(tmp_path)  # no exception
    assert reader is None or reader.wait(timeout=30).done


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
