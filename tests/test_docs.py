"""Every example in README.md and docs/*.md runs as written, in order, in a scratch directory.

A page's blocks run top to bottom in one temporary directory: ```python blocks share one
namespace; ```console and ```bash blocks are commands. In a block with ``$ `` prompts only the
prompted lines are commands (the others are output; an output line ``fedpipe CMD: error: ...``
means the command before it must exit 2); without prompts every line is. A trailing ``\\``
continues a command. ``fedpipe ...`` commands run in-process through ``fedpipe.cli.main.main``.

What cannot run here is marked where the reader sees it: a python block starting with
``# doc: skip``, a command whose comment says ``doc: skip`` (kubectl, docker, a remote scheduler,
``make``). Any other command is an error of the page, so nothing is skipped silently.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# DESIGN.md states contracts in signature form, not runnable code.
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "DESIGN.md")]
BLOCK = re.compile(r"```(python|console|bash)\n(.*?)```", re.S)
SKIP = "doc: skip"


def _python_blocks(page: pathlib.Path) -> list[str]:
    return [code for kind, code in BLOCK.findall(page.read_text()) if kind == "python"]


def commands(code: str) -> list[tuple[str, int]]:
    """``(command line, expected exit status)`` of a shell block, continuation lines joined."""
    lines = code.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    out: list[tuple[str, int]] = []
    pending = ""
    for line in lines:
        if pending:
            pending += " " + line.strip()
        elif prompted and not line.startswith("$ "):
            if line.startswith("fedpipe ") and ": error: " in line and out:
                out[-1] = (out[-1][0], 2)  # the doc shows this command failing
            continue
        elif line.strip() and not line.lstrip().startswith("#"):
            pending = line.removeprefix("$ ").strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        if pending:
            out.append((pending, 0))
            pending = ""
    return out


def steps(page: pathlib.Path) -> list[tuple[str, str, int]]:
    """The page's runnable steps in order: ``("python", code, 0)`` or ``("cmd", line, status)``."""
    out = []
    for kind, code in BLOCK.findall(page.read_text()):
        if kind == "python":
            if not code.lstrip().startswith("# doc: skip"):
                out.append(("python", code, 0))
            continue
        out += [("cmd", line, status) for line, status in commands(code) if SKIP not in line]
    return out


def _run_command(line: str, expected: int, capsys) -> None:
    from fedpipe.cli.main import main

    argv = shlex.split(line, comments=True)
    assert argv[0] == "fedpipe", f"{line!r} is not a fedpipe command: mark it '# {SKIP} (why)'"
    code = main(argv[1:])
    captured = capsys.readouterr()
    assert code == expected, f"{line!r} exited {code}, the page shows {expected}:\n{captured.err}"


@pytest.mark.slow
@pytest.mark.timeout(600)  # a page is a session: several ingests and runs, one cluster each
@pytest.mark.parametrize("page", [p for p in PAGES if steps(p)], ids=lambda p: p.name)
def test_page_runs_in_order(page, tmp_path, monkeypatch, capsys):
    # Examples write relative paths; run them in a scratch copy of the working directory.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDPIPE_DOCS_TEST", "1")
    # The clusters the examples' commands start run worker threads (tests/conftest.py).
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, (kind, code, expected) in enumerate(steps(page)):
        if kind == "cmd":
            _run_command(code, expected, capsys)
            continue
        try:
            exec(compile(code, f"{page.name}[step {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"{page.name} step {i} failed: {exc!r}\n{code}") from exc
    assert os.getcwd() == str(tmp_path)


def test_shell_blocks_are_parsed_as_a_reader_reads_them():
    block = ("$ fedpipe info a.zarr --verify   # comment\n"
             "fedpipe info: error: a.zarr: missing chunks X/y#1\n"
             "$ fedpipe train a.zarr --model softmax \\\n      --iterations 2\n"
             "$ kubectl apply -k k8s/   # doc: skip (kubectl)\n")
    assert commands(block) == [("fedpipe info a.zarr --verify   # comment", 2),
                               ("fedpipe train a.zarr --model softmax --iterations 2", 0),
                               ("kubectl apply -k k8s/   # doc: skip (kubectl)", 0)]
    assert commands("fedpipe report runs/a   # note\n# a comment line\nfedpipe demo\n") == [
        ("fedpipe report runs/a   # note", 0), ("fedpipe demo", 0)]
