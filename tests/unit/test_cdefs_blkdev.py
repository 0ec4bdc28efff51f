"""``cdefs.blkdev`` equals ``<linux/fs.h>``: the block device ioctl numbers, as the
C compiler computes them from the header's ``_IO``/``_IOR`` macros."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from cdefs import blkdev, verify_against_headers


@pytest.fixture(scope="module")
def header_lib() -> Any:
    macros = "".join(f"#define {name} ...\n" for name in blkdev.IOCTL_NAMES)
    verify_against_headers(macros, blkdev.INCLUDES, module_name="_dmrepl_verify_blkdev")
    return sys.modules["_dmrepl_verify_blkdev"].lib


@pytest.mark.parametrize("name", blkdev.IOCTL_NAMES)
def test_ioctl_numbers_equal_header(header_lib: Any, name: str) -> None:
    assert getattr(blkdev, name) == getattr(header_lib, name)


def test_blkgetsize64_is_declared_once() -> None:
    """The one declaration: the stores and the dirty log's storage use it."""
    from dmrepl.blockio import file
    from dmrepl.dirtylog import storage
    from dmrepl.replicator import store
    for module in (file, storage, store):
        assert "BLKGETSIZE64 = " not in open(module.__file__ or "").read(), module
