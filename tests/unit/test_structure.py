"""The layout's rules, checked on the code itself: two daemons over a base that
imports neither, no module that imports both, no daemon that imports the CLI, and
operator commands that never load QEMU's or etcd's client."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("blocktxn.agent", "blocktxn.coordinator")


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules *path* (in *package*) imports."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return out


def _modules() -> dict[str, set[str]]:
    """module name -> imported names, for every source file of the package."""
    found = {}
    for folder, package in (("agent", "blocktxn.agent"), ("coordinator", "blocktxn.coordinator"),
                            ("blocktxn", "blocktxn")):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder)
            if folder == "blocktxn" and rel.parts[0] in ("agent", "coordinator", "v1"):
                continue  # the daemons (symlinks) are scanned from their own folders
            parts = [*package.split("."), *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            pkg = ".".join(parts if path.name == "__init__.py" else parts[:-1])
            found[".".join(parts)] = _imports(path, pkg)
    return found


def _uses(imported: set[str], module: str) -> bool:
    return any(i == module or i.startswith(module + ".") for i in imported)


def test_the_daemons_are_parts_of_one_package() -> None:
    assert (ROOT / "blocktxn" / "agent").resolve() == ROOT / "agent"
    assert (ROOT / "blocktxn" / "coordinator").resolve() == ROOT / "coordinator"
    for module, imported in _modules().items():
        generic = {i for i in imported if i.split(".")[0] in ("agent", "coordinator")}
        assert not generic, f"{module} imports top-level {generic}"


def test_two_towers_over_a_base_that_imports_neither() -> None:
    for module, imported in _modules().items():
        daemons = [d for d in DAEMONS if _uses(imported, d)]
        assert len(daemons) < 2, f"{module} imports both daemons"
        mine = next((d for d in DAEMONS if module == d or module.startswith(d + ".")), None)
        if mine is None:
            assert not daemons, f"base module {module} imports {daemons}"
        else:
            assert daemons in ([], [mine]), f"{module} imports the other daemon"
            assert not _uses(imported, "blocktxn.cli"), f"{module} imports the CLI"
            assert not _uses(imported, "blocktxn.demo"), f"{module} imports the demo"


@pytest.mark.parametrize("argv", [["--help"], ["--coordinator", "127.0.0.1:1", "txn", "list"]])
def test_operator_commands_do_not_load_qemu_or_etcd_clients(argv: list[str]) -> None:
    code = ("import sys\nfrom blocktxn.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in "
            "('qemu', 'aetcd') or m.startswith(('blocktxn.agent', 'blocktxn.coordinator'))))")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert "LOADED []" in res.stdout, res.stdout + res.stderr
