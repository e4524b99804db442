"""The house: the public API list, the README's commands, CI, docs, layering."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvtier

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "kvtier"


def readme_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(bash[^\n]*)\n(.*?)```", text, flags=re.S)


def test_public_api_is_exactly_all() -> None:
    """Every kvtier class and function at the top level is in __all__, and back."""
    ours = {
        name
        for name, obj in vars(kvtier).items()
        if not name.startswith("_")
        and getattr(obj, "__module__", "").startswith("kvtier")
    }
    lazy = {"AsyncClusterClient"}  # imported on first use (needs the cluster extra)
    assert set(kvtier.__all__) - {"__version__"} == ours | lazy
    assert all(getattr(kvtier, name) is not None for name in kvtier.__all__)
    assert len(set(kvtier.__all__)) == len(kvtier.__all__)


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_second() -> None:
    blocks = readme_blocks()
    assert [info for info, _ in blocks[:2]] == ["bash", "bash test"]
    first, second = (body.strip() for _, body in blocks[:2])
    # installs the package (with extras) on a fresh machine, then runs its main job
    assert re.match(r"python -m pip install '?\.(\[[\w,]+\])?'? ", first), first
    assert first.endswith("kvtier demo")
    assert "pytest" in (ROOT / "scripts" / "check").read_text()
    out = subprocess.run(
        ["sed", "-n", "/^```bash test$/{n;p;q}", "README.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == second
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def test_core_imports_nothing_above_it() -> None:
    """core/ is pure: no I/O modules, no threads, no torch, nothing of kvtier above."""
    banned = {"os", "threading", "socket", "sqlite3", "torch", "asyncio", "mmap"}
    for path in (PACKAGE / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
                if name.startswith("kvtier."):
                    assert name.startswith(("kvtier.core", "kvtier.errors")), (
                        f"{path.name} imports {name}"
                    )


def test_nothing_imports_the_cli() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [
                    f"{node.module}.{a.name}" for a in node.names
                ]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert "kvtier.cli" not in names, f"{path} imports kvtier.cli"


def test_every_command_has_help() -> None:
    for args in (
        ["--help"],
        ["info", "--help"],
        ["bench", "store", "--help"],
        ["bench", "route", "--help"],
        ["route", "--help"],
        ["bench", "replay", "--help"],
        ["replay", "--help"],
        ["bench", "ttft", "--help"],
        ["demo", "--help"],
        ["check", "--help"],
        ["config", "--help"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage:" in out.stdout, args


@pytest.mark.slow
def test_first_readme_command_works_from_a_fresh_clone(tmp_path: Path) -> None:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    first = readme_blocks()[0][1].strip()
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", "-c", first],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "generated tokens identical" in out.stdout


def test_importing_kvtier_stays_light() -> None:
    """Only the core deps (numpy, xxhash, msgpack, pyyaml, rich) load on import."""
    code = (
        "import sys, kvtier\n"
        "heavy = {'aetcd', 'aiohttp', 'grpc', 'prometheus_client', 'torch', 'redis',"
        " 'boto3', 'zmq', 'transformers'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


HEAVY = (
    "aetcd aiohttp boto3 grpc lz4 matplotlib msgspec prometheus_client redis sglang "
    "torch transformers vllm zmq zstandard"
)


def test_the_command_needs_no_extra_to_start() -> None:
    """`kvtier --help` and every command's --help run with only the core deps: the
    extras (aiohttp, grpc, torch, ...) load when a command that needs them runs."""
    code = (
        "import importlib.abc, sys\n"
        f"heavy = set({HEAVY!r}.split())\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in heavy:\n"
        "            raise ImportError(f'{name} is an extra')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from kvtier.cli import main\n"
        "sys.argv = ['kvtier', *sys.argv[1:]]\n"
        "main()\n"
    )
    for args in (
        ["--help"],
        ["cluster", "--help"],
        ["route", "--help"],
        ["demo", "--help"],
    ):
        out = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage:" in out.stdout, (args, out.stderr[-800:])
