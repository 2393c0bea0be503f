"""tasks/ is the math layer: it must not import Dask, distributed, zarr or fsspec."""

import ast
import pathlib

FORBIDDEN = {"dask", "distributed", "zarr", "fsspec", "numcodecs", "pipeline"}
TASKS = pathlib.Path(__file__).resolve().parents[2] / "tasks"


def _imported_roots(path: pathlib.Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_tasks_imports_no_orchestration_library():
    files = sorted(TASKS.glob("*.py"))
    assert files, "tasks/ has no modules"
    offenders = {f.name: sorted(_imported_roots(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}
