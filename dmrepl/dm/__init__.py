"""Device-mapper control: the ioctl interface (``DmControl``) and tables as values."""

from dmrepl.dm.ioctl import (
    CONTROL_PATH,
    MAPPER_DIR,
    REQUIRED_VERSION,
    DeviceEntry,
    DeviceInfo,
    DmControl,
    DmIoctlError,
    DmProtocolError,
    TargetVersion,
    check_name,
    check_uuid,
)
from dmrepl.dm.table import DeviceRef, Table, TableError, Target

__all__ = [
    "CONTROL_PATH",
    "MAPPER_DIR",
    "REQUIRED_VERSION",
    "DeviceEntry",
    "DeviceInfo",
    "DeviceRef",
    "DmControl",
    "DmIoctlError",
    "DmProtocolError",
    "Table",
    "TableError",
    "Target",
    "TargetVersion",
    "check_name",
    "check_uuid",
]
