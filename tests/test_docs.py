"""Every ```python block in README.md and docs/*.md runs as written (from the repo root).

Blocks in one file share a namespace, in order, so a page reads like a session. A block that
starts with ``# doc: skip`` is shown but not run (it needs a real Kubernetes cluster, say).
"""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# DESIGN.md states contracts in signature form, not runnable code.
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "DESIGN.md")]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(page: pathlib.Path) -> list[str]:
    return [b for b in BLOCK.findall(page.read_text()) if not b.lstrip().startswith("# doc: skip")]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=lambda p: p.name)
def test_python_examples_run(page, tmp_path, monkeypatch):
    # Examples write relative paths; run them in a scratch copy of the working directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDPIPE_DOCS_TEST", "1")
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(_blocks(page)):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name} block {i} failed: {exc!r}\n{code}") from exc
    assert os.getcwd() == str(tmp_path)
