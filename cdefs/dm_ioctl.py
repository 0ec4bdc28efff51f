"""``<linux/dm-ioctl.h>``: the device-mapper control interface (version 4).

Every request to ``/dev/mapper/control`` is one buffer that starts with a
``struct dm_ioctl``; ``data_start`` and ``data_size`` place a payload after it
(target specs with their parameter strings, a message, a new name) and the
kernel writes its answer into the same buffer (name lists, target specs with
status or table text, dependencies, versions).  When the answer does not fit the
kernel sets ``DM_BUFFER_FULL_FLAG`` and the caller retries with a larger buffer.

``CDEF`` must match the header exactly: the ABI-mode ``ffi`` below trusts it, and
``tests/unit/test_cdefs_dm_ioctl.py`` compiles it against the real header and
compares every size, offset and constant.

The ioctl request numbers are ``_IOWR(DM_IOCTL, cmd, struct dm_ioctl)``; the
header builds them with a macro cffi cannot evaluate in ABI mode, so ``ioctl_number``
computes them from the declared size and the test checks them against the header.
"""

from __future__ import annotations

import cffi

from cdefs import IOC_READ, IOC_WRITE, abi_ffi, ioc

# <sys/ioctl.h> for ioctl(2) itself (and the _IOWR macro the dm header uses).
INCLUDES = "#include <sys/ioctl.h>\n#include <linux/dm-ioctl.h>"

CDEF = """
#define DM_MAX_TYPE_NAME 16
#define DM_NAME_LEN 128
#define DM_UUID_LEN 129

#define DM_VERSION_MAJOR 4

#define DM_IOCTL 253

/* Status bits (in/out flags of struct dm_ioctl) */
#define DM_READONLY_FLAG 1
#define DM_SUSPEND_FLAG 2
#define DM_PERSISTENT_DEV_FLAG 8
#define DM_STATUS_TABLE_FLAG 16
#define DM_ACTIVE_PRESENT_FLAG 32
#define DM_INACTIVE_PRESENT_FLAG 64
#define DM_BUFFER_FULL_FLAG 256
#define DM_SKIP_BDGET_FLAG 512
#define DM_SKIP_LOCKFS_FLAG 1024
#define DM_NOFLUSH_FLAG 2048
#define DM_QUERY_INACTIVE_TABLE_FLAG 4096
#define DM_UEVENT_GENERATED_FLAG 8192
#define DM_UUID_FLAG 16384
#define DM_SECURE_DATA_FLAG 32768
#define DM_DATA_OUT_FLAG 65536
#define DM_DEFERRED_REMOVE 131072
#define DM_INTERNAL_SUSPEND_FLAG 262144
#define DM_IMA_MEASUREMENT_FLAG 524288

#define DM_NAME_LIST_FLAG_HAS_UUID 1
#define DM_NAME_LIST_FLAG_DOESNT_HAVE_UUID 2

enum {
    DM_VERSION_CMD = 0,
    DM_REMOVE_ALL_CMD = 1,
    DM_LIST_DEVICES_CMD = 2,
    DM_DEV_CREATE_CMD = 3,
    DM_DEV_REMOVE_CMD = 4,
    DM_DEV_RENAME_CMD = 5,
    DM_DEV_SUSPEND_CMD = 6,
    DM_DEV_STATUS_CMD = 7,
    DM_DEV_WAIT_CMD = 8,
    DM_TABLE_LOAD_CMD = 9,
    DM_TABLE_CLEAR_CMD = 10,
    DM_TABLE_DEPS_CMD = 11,
    DM_TABLE_STATUS_CMD = 12,
    DM_LIST_VERSIONS_CMD = 13,
    DM_TARGET_MSG_CMD = 14,
    DM_DEV_SET_GEOMETRY_CMD = 15,
    DM_DEV_ARM_POLL_CMD = 16,
    DM_GET_TARGET_VERSION_CMD = 17
};

struct dm_ioctl {
    uint32_t version[3];
    uint32_t data_size;
    uint32_t data_start;
    uint32_t target_count;
    int32_t open_count;
    uint32_t flags;
    uint32_t event_nr;
    uint32_t padding;
    uint64_t dev;
    char name[128];
    char uuid[129];
    char data[7];
};

struct dm_target_spec {
    uint64_t sector_start;
    uint64_t length;
    int32_t status;
    uint32_t next;
    char target_type[16];
};

struct dm_target_deps {
    uint32_t count;
    uint32_t padding;
    uint64_t dev[];
};

struct dm_name_list {
    uint64_t dev;
    uint32_t next;
    char name[];
};

struct dm_target_versions {
    uint32_t next;
    uint32_t version[3];
    char name[];
};

struct dm_target_msg {
    uint64_t sector;
    char message[];
};

/* Called through cffi, which releases the GIL for the call: fcntl.ioctl keeps it
   while the kernel works on a buffer larger than 1 KiB, so a suspend or a
   DM_DEV_WAIT would stall every thread (and deadlock a dirty-log server living
   in the same process). */
int ioctl(int fd, unsigned long request, ...);
"""

ffi: cffi.FFI = abi_ffi(CDEF)
#: Constants, and libc's ioctl (dlopen(None) is the C library of this process).
lib = ffi.dlopen(None)

#: The command names of the header's anonymous enum, in ioctl-number order.
COMMANDS = (
    "DM_VERSION", "DM_REMOVE_ALL", "DM_LIST_DEVICES", "DM_DEV_CREATE", "DM_DEV_REMOVE",
    "DM_DEV_RENAME", "DM_DEV_SUSPEND", "DM_DEV_STATUS", "DM_DEV_WAIT", "DM_TABLE_LOAD",
    "DM_TABLE_CLEAR", "DM_TABLE_DEPS", "DM_TABLE_STATUS", "DM_LIST_VERSIONS",
    "DM_TARGET_MSG", "DM_DEV_SET_GEOMETRY", "DM_DEV_ARM_POLL", "DM_GET_TARGET_VERSION",
)

def ioctl_number(cmd: int) -> int:
    """``_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`` for one ``DM_*_CMD``."""
    return ioc(IOC_READ | IOC_WRITE, lib.DM_IOCTL, cmd, ffi.sizeof("struct dm_ioctl"))


#: Request number of every command, keyed by the header's macro name (``DM_TABLE_LOAD``).
IOCTLS: dict[str, int] = {
    name: ioctl_number(getattr(lib, name + "_CMD")) for name in COMMANDS
}
