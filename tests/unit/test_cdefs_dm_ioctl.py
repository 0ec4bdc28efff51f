"""``cdefs.dm_ioctl`` equals ``<linux/dm-ioctl.h>``: sizes, offsets, constants, ioctl numbers.

The declarations are compiled against the system header (cffi API mode), so the
C compiler, not a retyped number, is the reference.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from cdefs import dm_ioctl, verify_against_headers

STRUCTS = ("dm_ioctl", "dm_target_spec", "dm_target_deps", "dm_name_list",
           "dm_target_versions", "dm_target_msg")

# Constants declared with a value in CDEF; the API-mode build compares each with the
# header and refuses to load on a mismatch, and we compare them again explicitly.
CONSTANTS = (
    "DM_MAX_TYPE_NAME", "DM_NAME_LEN", "DM_UUID_LEN", "DM_VERSION_MAJOR", "DM_IOCTL",
    "DM_READONLY_FLAG", "DM_SUSPEND_FLAG", "DM_PERSISTENT_DEV_FLAG", "DM_STATUS_TABLE_FLAG",
    "DM_ACTIVE_PRESENT_FLAG", "DM_INACTIVE_PRESENT_FLAG", "DM_BUFFER_FULL_FLAG",
    "DM_SKIP_BDGET_FLAG", "DM_SKIP_LOCKFS_FLAG", "DM_NOFLUSH_FLAG",
    "DM_QUERY_INACTIVE_TABLE_FLAG", "DM_UEVENT_GENERATED_FLAG", "DM_UUID_FLAG",
    "DM_SECURE_DATA_FLAG", "DM_DATA_OUT_FLAG", "DM_DEFERRED_REMOVE",
    "DM_INTERNAL_SUSPEND_FLAG", "DM_IMA_MEASUREMENT_FLAG",
    "DM_NAME_LIST_FLAG_HAS_UUID", "DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID",
)


@pytest.fixture(scope="module")
def header() -> Any:
    """(ffi, lib) of our CDEF compiled against the real header, plus the ioctl macros."""
    # Ask the compiler for every request number too: "..." lets it supply the value.
    macros = "".join(f"#define {name} ...\n" for name in dm_ioctl.COMMANDS)
    return verify_against_headers(dm_ioctl.CDEF + macros, dm_ioctl.INCLUDES,
                                  module_name="_dmrepl_verify_dm_ioctl")


@pytest.fixture(scope="module")
def header_lib(header: Any) -> Any:
    """The compiled module's ``lib``: constants as the C compiler sees them."""
    # verify_against_headers returns the ffi; the lib sits in the same built module.
    return sys.modules["_dmrepl_verify_dm_ioctl"].lib


def fields(ffi: Any, struct: str) -> dict[str, int]:
    return {name: field.offset for name, field in ffi.typeof(f"struct {struct}").fields}


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_size_and_offsets_equal_header(header: Any, struct: str) -> None:
    ours = dm_ioctl.ffi
    assert ours.sizeof(f"struct {struct}") == header.sizeof(f"struct {struct}")
    ours_fields = fields(ours, struct)
    assert list(ours_fields) == list(fields(header, struct))
    for name, offset in ours_fields.items():
        assert offset == header.offsetof(f"struct {struct}", name), (struct, name)


def test_known_sizes() -> None:
    # The layout every dm tool since 2.6 agrees on; a regression here would corrupt
    # every request, so pin it independently of the compiler too.
    assert dm_ioctl.ffi.sizeof("struct dm_ioctl") == 312
    assert dm_ioctl.ffi.sizeof("struct dm_target_spec") == 40
    assert dm_ioctl.ffi.offsetof("struct dm_name_list", "name") == 12
    assert dm_ioctl.ffi.offsetof("struct dm_target_deps", "dev") == 8


@pytest.mark.parametrize("name", CONSTANTS)
def test_constants_equal_header(header_lib: Any, name: str) -> None:
    assert getattr(dm_ioctl.lib, name) == getattr(header_lib, name)


@pytest.mark.parametrize("name", dm_ioctl.COMMANDS)
def test_ioctl_numbers_equal_header(header_lib: Any, name: str) -> None:
    assert getattr(dm_ioctl.lib, name + "_CMD") == getattr(header_lib, name + "_CMD")
    assert dm_ioctl.IOCTLS[name] == getattr(header_lib, name)
