"""The one block-I/O surface: every implementation honours the same contract.

The contract (``dmrepl.blockio``'s docstring) runs against a regular file, a
regular file opened ``O_DIRECT`` (where the file system allows it), memory, memory
as a direct device with a volatile cache, and the NBD client against our server.
A block device's size through ``BLKGETSIZE64`` is checked only where the test can
open one (a loop device needs root): elsewhere that test is skipped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.blockio import BlockIO, FileBlockIO, MemoryBlockIO, UnknownScheme, open_store
from dmrepl.nbd import Export, NbdServer
from dmrepl.nbd.client import NbdStore

SIZE = 64 << 10
KINDS = ("file", "file-direct", "memory", "memory-direct-cached", "nbd")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, tmp_path: Path) -> Iterator[BlockIO]:
    if kind.startswith("file"):
        path = tmp_path / "disk"
        path.write_bytes(bytes(SIZE))
        try:
            opened: BlockIO = FileBlockIO(path, direct=kind == "file-direct")
        except OSError as e:  # tmpfs and some others refuse O_DIRECT
            pytest.skip(f"O_DIRECT on {tmp_path}: {e.strerror}")
        yield opened
        opened.close()
    elif kind == "memory":
        yield MemoryBlockIO(SIZE)
    elif kind == "memory-direct-cached":
        yield MemoryBlockIO(SIZE, direct=True, volatile_cache=True)
    else:
        with NbdServer(str(tmp_path / "s")) as srv:
            srv.add_export(Export("d", MemoryBlockIO(SIZE)))
            client = NbdStore(f"nbd+unix:///d?socket={tmp_path / 's'}")
            yield client
            client.close()


def block(i: int, n: int = 4096) -> bytes:
    return bytes([i % 251 + 1]) * n


def test_is_a_blockio_of_its_size(store: BlockIO) -> None:
    assert isinstance(store, BlockIO)
    assert store.size == SIZE
    assert store.logical_block_size == 512
    assert isinstance(store.name, str) and store.name


def test_write_then_read_back(store: BlockIO) -> None:
    assert store.pread(0, 4096) == bytes(4096)
    store.pwrite(4096, block(1))
    store.pwritev(8192, [block(2, 512), bytearray(block(3, 1024)), memoryview(block(4, 2560))])
    assert store.pread(4096, 4096) == block(1)
    assert store.pread(8192, 4096) == block(2, 512) + block(3, 1024) + block(4, 2560)
    assert store.pread(SIZE - 4096, 4096) == bytes(4096)  # the last block, whole


def test_flush_and_durable_write_keep_what_was_written(store: BlockIO) -> None:
    store.pwrite(0, block(5))
    store.flush()
    store.pwritev_durable(4096, [block(6, 512), block(7, 3584)])
    assert store.pread(0, 8192) == block(5) + block(6, 512) + block(7, 3584)


def test_trim_is_a_hint_inside_the_device(store: BlockIO) -> None:
    store.pwrite(0, block(8))
    store.trim(0, 4096)
    store.trim(SIZE - 4096, 4096)
    assert store.pread(4096, 4096) == bytes(4096)  # outside the trim: untouched


def test_reads_and_writes_past_the_end_are_refused(store: BlockIO, kind: str) -> None:
    with pytest.raises(OSError) as read:
        store.pread(SIZE - 512, 1024)
    with pytest.raises(OSError) as write:
        store.pwrite(SIZE - 512, block(9, 1024))
    # the NBD client passes the server's errors on: EINVAL for a read out of range
    assert read.value.errno == (errno.EINVAL if kind == "nbd" else errno.EIO)
    assert write.value.errno == errno.ENOSPC
    assert store.pread(SIZE - 512, 512) == bytes(512)  # nothing written, still usable


# -- what one kind adds --------------------------------------------------------


def test_memory_volatile_cache_loses_unflushed_writes_on_crash() -> None:
    mem = MemoryBlockIO(SIZE, volatile_cache=True)
    mem.pwrite(0, block(1))
    mem.flush()
    mem.pwrite(4096, block(2))
    mem.pwritev_durable(8192, [block(3)])
    after = mem.crash()
    assert after.pread(0, 12288) == block(1) + bytes(4096) + block(3)
    assert (mem.flushes, mem.durable_writes) == (1, 1)


def test_direct_io_refuses_unaligned_memory() -> None:
    mem = MemoryBlockIO(SIZE, direct=True, logical_block_size=4096)
    with pytest.raises(OSError) as err:
        mem.pwrite(512, block(1, 512))
    assert err.value.errno == errno.EINVAL


def test_file_grows_to_the_size_asked_and_exports_a_prefix(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(4096))
    grown = FileBlockIO(path, size=SIZE)
    assert grown.size == SIZE and path.stat().st_size == SIZE
    grown.close()
    prefix = FileBlockIO(path, size=8192)
    with pytest.raises(OSError):
        prefix.pwrite(8192, block(1))
    prefix.close()
    assert path.stat().st_size == SIZE


def test_file_refuses_what_is_not_a_file_or_block_device(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a block device or regular file"):
        FileBlockIO(tmp_path)


def test_file_that_shrank_under_the_store_reads_short_as_eio(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(SIZE))
    store = FileBlockIO(path)
    os.truncate(path, SIZE // 2)  # another process cut it
    with pytest.raises(OSError) as err:
        store.pread(SIZE // 2 - 512, 1024)
    assert err.value.errno == errno.EIO
    store.close()


# -- the opener: path or URL -> the kind of store ------------------------------


def test_a_closed_file_refuses_every_io_with_ebadf(tmp_path: Path) -> None:
    """A device removed while a copier or resync still holds its store: each call
    is an I/O error (EBADF), which the copier handles, never os.*'s ValueError for
    the fd -1 (a flush's killed a site link's copier thread: CI, kernel tier)."""
    path = tmp_path / "f"
    path.write_bytes(bytes(1 << 16))
    store = FileBlockIO(path)
    store.close()
    calls = {"pread": lambda: store.pread(0, 4096),
             "pwrite": lambda: store.pwrite(0, b"x" * 4096),
             "pwritev": lambda: store.pwritev(0, [b"x" * 4096]),
             "pwritev_durable": lambda: store.pwritev_durable(0, [b"x" * 4096]),
             "flush": store.flush,
             "grow": lambda: store.grow(1 << 17)}
    for name, call in calls.items():
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF, name


def test_opener_opens_paths_and_file_urls_as_files(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(bytes(SIZE))
    for spec in (str(path), f"file://{path}", f"file:{path}", f"file://localhost{path}"):
        opened = open_store(spec)
        assert isinstance(opened, FileBlockIO) and opened.size == SIZE, spec
        opened.close()


def test_opener_takes_colons_in_plain_paths_as_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_store(str(tmp_path / "a:b"))
    with pytest.raises(FileNotFoundError):
        open_store("7:2")  # major:minor is a path here, not a scheme


def test_opener_opens_nbd_urls_with_the_nbd_client(tmp_path: Path) -> None:
    with NbdServer(str(tmp_path / "s")) as srv, NbdServer(("127.0.0.1", 0)) as tcp:
        backend = MemoryBlockIO(SIZE)
        srv.add_export(Export("d", backend))
        tcp.add_export(Export("d", backend))
        host, port = tcp.address  # type: ignore[misc]
        for url in (f"nbd+unix:///d?socket={tmp_path / 's'}", f"nbd://{host}:{port}/d"):
            opened = open_store(url)
            assert isinstance(opened, NbdStore) and opened.size == SIZE, url
            opened.close()


def test_opener_names_an_unknown_scheme() -> None:
    with pytest.raises(UnknownScheme, match="unknown URL scheme 'iscsi'"):
        open_store("iscsi://target/lun0")


def test_daemon_opener_is_the_one_opener_and_simengine_needs_no_daemon() -> None:
    """The store opener lives with the stores: the simulation engine imports it
    from there, not from the daemon (the old import circle)."""
    import subprocess
    import sys
    code = ("import sys, dmrepl_testing.simengine as s, dmrepl.blockio as b; "
            "assert 'dmrepl.daemon.daemon' not in sys.modules, 'simengine imports daemon'; "
            "import dmrepl.daemon.daemon as d; assert d.open_store is b.open_store")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
