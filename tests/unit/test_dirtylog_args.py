"""Dirty-log constructor arguments, validated the way dm-log.c does."""

from __future__ import annotations

import pytest

from dmrepl.dirtylog import (
    CoreLog,
    DiskLog,
    MemoryStorage,
    SyncMode,
    open_dirty_log,
    parse_devnum,
    parse_dirty_log_args,
)
from dmrepl.dirtylog.format import area_size
from dmrepl.errors import UserError


@pytest.mark.parametrize("type_name,canonical", [
    ("core", "core"), ("clustered-core", "core"),
])
def test_core_args(type_name: str, canonical: str) -> None:
    cfg = parse_dirty_log_args(type_name, ["1024"], 2097152)
    assert cfg.type_name == canonical
    assert cfg.name == type_name
    assert (cfg.region_size, cfg.region_count, cfg.sync) == (1024, 2048, SyncMode.DEFAULT)
    assert cfg.device is None
    assert cfg.args() == ["1024"]


@pytest.mark.parametrize("type_name", ["disk", "clustered-disk"])
@pytest.mark.parametrize("dev", ["/dev/loop2", "7:2", "253:10"])
def test_disk_args(type_name: str, dev: str) -> None:
    cfg = parse_dirty_log_args(type_name, [dev, "8", "nosync"], 100)
    assert cfg.type_name == "disk"
    assert (cfg.device, cfg.region_size, cfg.region_count) == (dev, 8, 13)
    assert cfg.sync is SyncMode.NOSYNC
    assert cfg.args() == [dev, "8", "nosync"]


@pytest.mark.parametrize("target,size,count", [
    (1024, 1024, 1), (1025, 1024, 2), (2, 2, 1), (3, 2, 2), (2097152, 1024, 2048),
    (2**40, 2**31, 512),
])
def test_region_count_rounds_up(target: int, size: int, count: int) -> None:
    assert parse_dirty_log_args("core", [str(size)], target).region_count == count


@pytest.mark.parametrize("token,mode", [("sync", SyncMode.FORCESYNC),
                                        ("nosync", SyncMode.NOSYNC)])
def test_sync_tokens(token: str, mode: SyncMode) -> None:
    assert parse_dirty_log_args("core", ["16", token], 64).sync is mode


@pytest.mark.parametrize("arg,why", [
    ("1023", "not a power of two"),
    ("3", "not a power of two"),
    ("1", "at least 2"),
    ("0", "at least 2"),
    ("abc", "not a decimal"),
    ("1024x", "not a decimal"),
    ("+1024", "not a decimal"),
    ("-2", "not a decimal"),
    (" 1024", "not a decimal"),
    ("0x400", "not a decimal"),
    ("\u0661\u0660", "not a decimal"),  # Arabic-Indic digits: isdigit() but not ASCII
    ("4294967296", "32 bits"),
    ("4096", "larger than the target"),
])
def test_bad_region_size_names_the_argument(arg: str, why: str) -> None:
    with pytest.raises(UserError) as err:
        parse_dirty_log_args("core", [arg], 2048)
    assert repr(arg) in str(err.value)
    assert why in str(err.value)


def test_region_size_equal_to_target_is_allowed() -> None:
    assert parse_dirty_log_args("core", ["2048"], 2048).region_count == 1


@pytest.mark.parametrize("type_name,args,why", [
    ("core", [], "wrong number of arguments"),
    ("core", ["8", "sync", "x"], "wrong number of arguments"),
    ("disk", ["8"], "wrong number of arguments"),
    ("disk", ["/dev/x", "8", "sync", "y"], "wrong number of arguments"),
    ("core", ["8", "block_on_error"], "'block_on_error'"),
    ("core", ["8", "SYNC"], "'SYNC'"),
    ("disk", ["/dev/x", "8", "nosnyc"], "'nosnyc'"),
    ("disk", ["", "8"], "empty"),
    ("userspace", ["8"], "unknown dirty log type 'userspace'"),
    ("Core", ["8"], "unknown dirty log type 'Core'"),
])
def test_bad_args(type_name: str, args: list[str], why: str) -> None:
    with pytest.raises(UserError) as err:
        parse_dirty_log_args(type_name, args, 1024)
    assert why in str(err.value)


@pytest.mark.parametrize("target", [0, -8])
def test_bad_target_length(target: int) -> None:
    with pytest.raises(UserError, match="target length"):
        parse_dirty_log_args("core", ["8"], target)


def test_user_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        parse_dirty_log_args("core", ["7"], 64)


def test_parse_devnum() -> None:
    assert parse_devnum("7:2") == (7, 2)
    assert parse_devnum("253:0") == (253, 0)
    assert parse_devnum("/dev/loop2") is None
    assert parse_devnum("7:") is None
    assert parse_devnum("7:2:1") is None


@pytest.mark.parametrize("sync,info,table", [
    ([], "1 core", "core 1 1024"),
    (["nosync"], "1 core", "core 2 1024 nosync"),
    (["sync"], "1 core", "core 2 1024 sync"),
])
def test_core_status(sync: list[str], info: str, table: str) -> None:
    log = open_dirty_log("core", ["1024", *sync], 2097152)
    assert isinstance(log, CoreLog)
    assert (log.status_info(), log.status_table()) == (info, table)


def test_clustered_names_show_in_status() -> None:
    log = open_dirty_log("clustered-core", ["1024"], 2097152)
    assert log.status_info() == "1 clustered-core"
    assert log.type_name == "core"
    storage = MemoryStorage(area_size(2048), name="7:2")
    disk = open_dirty_log("clustered-disk", ["7:2", "1024"], 2097152, storage=storage)
    disk.resume()
    assert disk.status_info() == "3 clustered-disk 7:2 A"
    assert disk.status_table() == "clustered-disk 2 7:2 1024"


@pytest.mark.parametrize("sync,table", [
    ([], "disk 2 7:2 1024"),
    (["nosync"], "disk 3 7:2 1024 nosync"),
    (["sync"], "disk 3 7:2 1024 sync"),
])
def test_disk_status(sync: list[str], table: str) -> None:
    storage = MemoryStorage(area_size(2048), name="7:2")
    log = open_dirty_log("disk", ["/dev/whatever", "1024", *sync], 2097152, storage=storage)
    assert isinstance(log, DiskLog)
    log.resume()
    assert log.status_info() == "3 disk 7:2 A"
    assert log.status_table() == table


def test_disk_device_too_small() -> None:
    need = area_size(2048)
    storage = MemoryStorage(need - 512)
    with pytest.raises(UserError, match=f"too small: need {need} bytes"):
        open_dirty_log("disk", ["/dev/x", "1024"], 2097152, storage=storage)
    assert storage.closed


def test_disk_device_size_rounds_to_logical_block() -> None:
    # 1024 + 256 bytes of bitmap = 1280 -> 4096 with 4 KiB logical blocks.
    assert area_size(2048, 4096) == 4096
    storage = MemoryStorage(2048, logical_block_size=4096)
    with pytest.raises(UserError, match="need 4096 bytes"):
        open_dirty_log("disk", ["/dev/x", "1024"], 2097152, storage=storage)
    assert isinstance(open_dirty_log("disk", ["/dev/x", "1024"], 2097152,
                                     storage=MemoryStorage(4096, logical_block_size=4096)),
                      DiskLog)


def test_missing_device() -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_dirty_log("disk", ["/nonexistent/dev", "8"], 64)
    with pytest.raises(UserError, match="no block device"):
        open_dirty_log("disk", ["4095:1048575", "8"], 64)
