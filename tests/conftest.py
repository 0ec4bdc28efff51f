"""Test tiers: unit (pure), sim (fake peers, no root), kernel (real device-mapper).

The tier marker is applied by directory, so every test carries exactly one.  A
kernel test on a machine without device-mapper is skipped with the reason; under
``--require-kernel`` (what tools/test passes inside the VM) that skip is a failure,
so a broken VM can never look green.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Wall-clock deadlines measure the machine, not the code: CI hosts and the TCG VM are
# loaded and slow, so no per-example deadline; the example counts stay as written.
settings.register_profile(
    "dmrepl", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dmrepl"))

TIERS = ("unit", "sim", "kernel")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--require-kernel", action="store_true",
                     help="fail (not skip) kernel tests when device-mapper is missing")


def dm_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not os.path.exists("/dev/mapper/control"):
        return "no /dev/mapper/control: this kernel has no device-mapper (use tools/vmtest)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in TIERS and not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))
    reason = dm_unavailable_reason()
    if reason is None:
        return
    if config.getoption("--require-kernel"):
        return  # pytest_runtest_setup turns each of them into a failure
    for item in items:
        if item.get_closest_marker("kernel"):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not item.config.getoption("--require-kernel") or not item.get_closest_marker("kernel"):
        return
    reason = dm_unavailable_reason()
    if reason is not None:
        pytest.fail(f"--require-kernel: {reason}", pytrace=False)


def pytest_report_header(config: pytest.Config) -> str:
    return f"kernel: {platform.release()}; device-mapper: {dm_unavailable_reason() or 'yes'}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not config.getoption("--require-kernel"):
        return
    stats = terminalreporter.stats
    ran = sum(
        1 for key in ("passed", "failed", "error")
        for rep in stats.get(key, [])
        if getattr(rep, "when", "call") == "call" and "kernel" in rep.keywords
    )
    skipped = len(stats.get("skipped", []))
    terminalreporter.write_line(
        f"kernel tier: {ran} kernel tests executed on {platform.release()}, {skipped} not run")
    if skipped:
        terminalreporter.write_line("kernel tier: skipped kernel tests make this run fail")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under --require-kernel a skipped kernel test is a failure, never a pass."""
    if not session.config.getoption("--require-kernel"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.stats.get("skipped") and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
