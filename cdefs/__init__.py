"""C declarations of the kernel ABI, one module per kernel header.

Each module exports ``INCLUDES`` (the system headers that define the real
thing), ``CDEF`` (our declarations, given to cffi) and an ``ffi`` built from
``CDEF`` in ABI mode, so nothing is compiled at run time.  ``verify_against_headers``
compiles the same declarations against the system headers (cffi API mode), which
the unit tests use to prove our sizes and offsets equal the kernel's.
"""

from __future__ import annotations

import tempfile
from types import ModuleType
from typing import Any

import cffi


def abi_ffi(cdef: str) -> cffi.FFI:
    """An ABI-mode FFI for ``cdef`` (declarations must be exact: see verify)."""
    ffi = cffi.FFI()
    ffi.cdef(cdef, packed=False)
    return ffi


def verify_against_headers(cdef: str, includes: str, *, module_name: str) -> Any:
    """Compile ``cdef`` against the real ``includes`` and return the built lib's ffi.

    cffi checks every declared struct field against the C compiler's view when
    the declarations end in ``...;``-free exact form; we then compare sizeof and
    offsetof explicitly in the tests.  Needs a C compiler and the kernel headers.
    """
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(module_name, includes)
    build_dir = tempfile.mkdtemp(prefix="cdefs-")
    library_path = ffi.compile(tmpdir=build_dir, verbose=False)
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, library_path)
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi


# asm-generic/ioctl.h: nr in bits 0-7, type in 8-15, size in 16-29, direction in
# 30-31.  x86, arm and arm64 use this generic layout (powerpc, mips and sparc don't).
_IOC_NRSHIFT, _IOC_TYPESHIFT, _IOC_SIZESHIFT, _IOC_DIRSHIFT = 0, 8, 16, 30
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def ioc(direction: int, type_: int, nr: int, size: int) -> int:
    """The kernel's ``_IOC(dir, type, nr, size)``: an ioctl request number (the
    headers build them with macros cffi cannot evaluate in ABI mode)."""
    return ((direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT)
            | (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT))
