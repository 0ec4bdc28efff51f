"""The man pages and shell completions generated from the parsers (tools/admin-docs)
name every subcommand of both commands."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl.cli._parser import gen_parser
from ulogd.main import build_parser

REPO = Path(__file__).resolve().parents[2]


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [name for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name in a.choices]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("admin-docs")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "admin-docs"), str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("parser", [gen_parser(), build_parser()], ids=["dmrepl", "ulogd"])
def test_man_page_and_completions_name_every_subcommand(
        generated: Path, parser: argparse.ArgumentParser) -> None:
    name = parser.prog
    man = (generated / "man" / "man1" / f"{name}.1").read_text()
    bash = (generated / "bash-completion" / "completions" / name).read_text()
    zsh = (generated / "zsh" / "site-functions" / f"_{name}").read_text()
    assert man.startswith(f".TH {name.upper()} 1 ")
    subs = subcommands(parser)
    assert len(subs) >= 2
    for sub in subs:
        assert f".SS {sub}\n" in man, sub
        assert sub in bash and sub in zsh, sub
    assert r"\-\-version" in man and "--version" in bash   # roff escapes "-"
    # the shells accept what was generated
    assert subprocess.run(["bash", "-n"], input=bash, text=True).returncode == 0


def test_man_page_renders(generated: Path) -> None:
    if shutil.which("man") is None:
        pytest.skip("man is not installed")
    r = subprocess.run(["man", "-l", str(generated / "man" / "man1" / "dmrepl.1")],
                       capture_output=True, text=True, timeout=60,
                       env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "slink message <slink_nr>" in r.stdout   # the message list of `message --help`
