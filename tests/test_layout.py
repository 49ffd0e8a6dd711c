"""The layout rules a reader relies on: short functions in tasks/, no module reaching into another's
private names, and no file naming a path outside the repository."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60  # a function a reader takes in at once
OURS = ("intrain_core", "tasks", "scripts", "train")  # private names of third-party packages are their business


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_no_function_in_tasks_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in python_files("tasks") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long


def private_imports(source: str) -> list[str]:
    """``from <our module> import _name`` and ``<our module>._name`` in ``source``."""
    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(OURS)):
            module = "." * node.level + (node.module or "")
            found += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_")]
            modules |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith(OURS)}
    found += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
              if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
              and node.attr.startswith("_") and not node.attr.startswith("__")]
    return found


def test_the_private_name_check_finds_both_forms():
    source = ("from tasks.curves import _number\nfrom .fixed_point import _map\nfrom tasks import tables\n"
              "import torch\ntables._x\ntorch._int_mm\n")
    assert private_imports(source) == ["tasks.curves._number", ".fixed_point._map", "tables._x"]


def test_no_module_imports_a_private_name_of_another_module():
    found = {str(p.relative_to(ROOT)): private_imports(p.read_text())
             for p in python_files("intrain_core", "tasks", "scripts") + [ROOT / "train.py"]}
    assert not {path: names for path, names in found.items() if names}


def test_no_file_names_a_path_outside_the_repository():
    # A clone holds only what git tracks: a link or path to a sibling folder or the author's
    # machine would be dead there. A run's own record of where it ran (its config.yaml and
    # run_info.yaml among the results' evidence) is data, not a reference.
    patterns = ["\\.\\./shared", "NUMERICS\\.md", "/work/"]
    records = [":!results/**/config.yaml", ":!results/**/run_info.yaml"]
    listed = subprocess.run(["git", "grep", "-n", "-I", "-E", "|".join(patterns), "--", ".", ":!tests/test_layout.py",
                             *records], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 1, listed.stdout  # 1: no match
