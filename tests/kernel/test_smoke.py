"""The VM really is a device-mapper kernel: the modules our tiers rely on are loaded."""

from pathlib import Path


def test_device_mapper_and_userspace_log_present() -> None:
    assert "device-mapper" in Path("/proc/misc").read_text()
    connectors = Path("/proc/net/connector").read_text()
    assert "dmlogusr" in connectors, connectors
    targets = Path("/proc/modules").read_text()
    assert "dm_mirror" in targets
