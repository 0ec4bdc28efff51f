"""C declarations for the dm-log-userspace connector channel.

Headers: ``<linux/netlink.h>`` (``struct nlmsghdr``), ``<linux/connector.h>``
(``struct cb_id``, ``struct cn_msg``), ``<linux/dm-log-userspace.h>``
(``struct dm_ulog_request`` and the ``DM_ULOG_*`` request numbers).

``CDEF`` is checked against the real headers by ``tests/unit/test_ulog_cdefs.py``
(cffi API mode through :func:`cdefs.verify_against_headers`): sizes, offsets and
every ``#define`` value below must equal the compiler's.  The construct
definitions in ``ulogd.protocol`` are in turn checked against this ``ffi``.
"""

from __future__ import annotations

from cdefs import abi_ffi

INCLUDES = """
#include <linux/netlink.h>
#include <linux/connector.h>
#include <linux/dm-log-userspace.h>
"""

CDEF = """
struct nlmsghdr {
    uint32_t nlmsg_len;
    uint16_t nlmsg_type;
    uint16_t nlmsg_flags;
    uint32_t nlmsg_seq;
    uint32_t nlmsg_pid;
};

struct cb_id {
    uint32_t idx;
    uint32_t val;
};

struct cn_msg {
    struct cb_id id;
    uint32_t seq;
    uint32_t ack;
    uint16_t len;
    uint16_t flags;
    uint8_t data[];
};

struct dm_ulog_request {
    uint64_t luid;
    char uuid[129];
    char padding[3];
    uint32_t version;
    int32_t error;
    uint32_t seq;
    uint32_t request_type;
    uint32_t data_size;
    char data[];
};

#define NETLINK_CONNECTOR 11
#define NETLINK_ADD_MEMBERSHIP 1
#define NETLINK_NO_ENOBUFS 5
#define NLMSG_DONE 3
#define NLMSG_HDRLEN 16
#define NLMSG_ALIGNTO 4
#define CN_IDX_DM 7
#define CN_VAL_DM_USERSPACE_LOG 1
#define CONNECTOR_MAX_MSG_SIZE 16384
#define DM_UUID_LEN 129

#define DM_ULOG_CTR 1
#define DM_ULOG_DTR 2
#define DM_ULOG_PRESUSPEND 3
#define DM_ULOG_POSTSUSPEND 4
#define DM_ULOG_RESUME 5
#define DM_ULOG_GET_REGION_SIZE 6
#define DM_ULOG_IS_CLEAN 7
#define DM_ULOG_IN_SYNC 8
#define DM_ULOG_FLUSH 9
#define DM_ULOG_MARK_REGION 10
#define DM_ULOG_CLEAR_REGION 11
#define DM_ULOG_GET_RESYNC_WORK 12
#define DM_ULOG_SET_REGION_SYNC 13
#define DM_ULOG_GET_SYNC_COUNT 14
#define DM_ULOG_STATUS_INFO 15
#define DM_ULOG_STATUS_TABLE 16
#define DM_ULOG_IS_REMOTE_RECOVERING 17
#define DM_ULOG_REQUEST_MASK 255
#define DM_ULOG_REQUEST_VERSION 3
"""

# SOL_NETLINK is defined by <linux/socket.h>/<sys/socket.h>, not the netlink
# uapi header; it is a fixed part of the ABI (include/linux/socket.h).
SOL_NETLINK = 270

ffi = abi_ffi(CDEF)
lib = ffi.dlopen(None)
