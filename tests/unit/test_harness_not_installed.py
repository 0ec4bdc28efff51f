"""The test harness (``dmrepl_testing``) is not installed: the installed packages
import without it, and ``--engine sim`` (the one thing that needs it) says so."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from dmrepl.cli._exit import ExitCode

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = ("dmrepl", "ulogd", "cdefs")

# A fresh interpreter in which the harness cannot be imported, as after a wheel
# install: import every module of the installed packages, then ask for the sim.
WITHOUT_HARNESS = """
import importlib, json, pkgutil, sys
from importlib.abc import MetaPathFinder

class NoHarness(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "dmrepl_testing" or fullname.startswith("dmrepl_testing."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

sys.meta_path.insert(0, NoHarness())
failed, imported = {}, []
for top in INSTALLED:
    package = importlib.import_module(top)
    imported.append(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except BaseException as e:
            failed[info.name] = f"{type(e).__name__}: {e}"
from dmrepl.daemon._engine import EngineUnavailable, load_engine
try:
    load_engine("sim")
    sim = "loaded"
except EngineUnavailable as e:
    sim = str(e)
print(json.dumps({"failed": failed, "imported": imported, "sim": sim}))
""".replace("INSTALLED", repr(INSTALLED))

SIM_ERROR = ("the simulation engine is part of the test harness (dmrepl_testing), "
             "not installed")


def run_without_harness(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_every_installed_module_imports_without_the_harness() -> None:
    proc = run_without_harness(WITHOUT_HARNESS)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["failed"] == {}
    assert "dmrepl.daemon._engine" in result["imported"]
    assert "ulogd.server" in result["imported"]
    assert len(result["imported"]) > 30, result["imported"]
    assert result["sim"].startswith(SIM_ERROR), result["sim"]


def test_engine_sim_without_the_harness_is_one_clear_error(tmp_path: Path) -> None:
    main = WITHOUT_HARNESS.split("failed, imported")[0] + (
        "from dmrepl.cli.main import main\nmain(sys.argv[1:])\n")
    proc = run_without_harness(
        main, "--socket", str(tmp_path / "control.sock"), "daemon", "--state-dir",
        str(tmp_path / "state"), "--no-kernel-devices", "--engine", "sim")
    assert proc.returncode == ExitCode.ERROR, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("dmrepl: error: ")
    assert SIM_ERROR in proc.stderr, proc.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "control.sock").exists()


def harness_imports(path: Path) -> list[str]:
    """Where ``path`` imports the harness: ``function:line`` for each import (the
    innermost function around it, ``<module>`` if none)."""
    tree = ast.parse(path.read_text(), str(path))
    owner: dict[ast.AST, str] = {}
    functions = [f for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    for func in functions:          # outer functions first: inner ones overwrite
        for node in ast.walk(func):
            owner[node] = func.name
    found = []
    for node in ast.walk(tree):
        modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                   else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(m.split(".")[0] == "dmrepl_testing" for m in modules):
            found.append(f"{owner.get(node, '<module>')}:{node.lineno}")
    return found


def test_only_load_engine_imports_the_harness() -> None:
    """The one way into the harness from the installed code is ``--engine sim``."""
    found = {}
    for top in INSTALLED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if where := harness_imports(path):
                found[str(path.relative_to(ROOT))] = sorted(set(where))
    assert found == {"dmrepl/daemon/_engine.py": [f"load_engine:{sim_import_line()}"]}


def sim_import_line() -> int:
    source = (ROOT / "dmrepl/daemon/_engine.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1)
                if "from dmrepl_testing.simengine import" in line)
