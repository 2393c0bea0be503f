"""The lock file (uv.lock) is the one source of every install: the environment the tests run in
equals it, and deploy/Dockerfile installs from it (checked statically: no Docker daemon here)."""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# The extras `make test` installs (Makefile: `uv sync --frozen --extra dev`).
TEST_EXTRAS = ("dev",)
# Dask refuses mismatched versions between driver, scheduler and workers; these above all.
MUST_LOCK = ("dask", "distributed", "numpy", "zarr", "cloudpickle", "msgpack")


def _instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _lock() -> dict[str, list[dict]]:
    packages: dict[str, list[dict]] = {}
    for pkg in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        packages.setdefault(canonicalize_name(pkg["name"]), []).append(pkg)
    return packages


def _applies(dep: dict, extra: str = "") -> bool:
    marker = dep.get("marker")
    return marker is None or Marker(marker).evaluate({"extra": extra})


def locked_closure(root: str = "fedpipe", extras: tuple[str, ...] = TEST_EXTRAS) -> dict[str, str]:
    """``{name: version}`` the lock installs for ``root[extras]`` on this interpreter."""
    lock = _lock()
    chosen: dict[str, str] = {}
    todo: list[tuple[str, str | None, tuple[str, ...]]] = [(root, None, extras)]
    while todo:
        name, version, wanted = todo.pop()
        name = canonicalize_name(name)
        (pkg,) = [p for p in lock[name] if version in (None, p["version"])]
        first = name not in chosen
        chosen[name] = pkg["version"]
        deps = [d for d in pkg.get("dependencies", []) if _applies(d)] if first else []
        for extra in wanted:
            deps += [d for d in pkg.get("optional-dependencies", {}).get(extra, [])
                     if _applies(d, extra)]
        todo += [(d["name"], d.get("version"), tuple(d.get("extra", ()))) for d in deps]
    return chosen


def _installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}


def test_base_image_is_pinned_and_matches_our_python():
    (base,) = [arg for op, arg in _instructions() if op == "FROM"]
    image, _, digest = base.partition("@")
    name, _, tag = image.partition(":")
    assert name in ("python", "docker.io/library/python"), base
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-slim-\w+", tag)
    assert match, f"base image {base!r} is not an exact python X.Y.Z-slim-<debian> tag"
    assert tuple(map(int, match.groups()[:2])) == sys.version_info[:2]
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base


def test_image_installs_the_lock_hash_checked_and_has_no_stray_cmd():
    instructions = _instructions()
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "uv export --frozen" in runs and "--require-hashes" in runs
    # Every pip install of a dependency is --no-deps: nothing is resolved outside the lock.
    installs = re.findall(r"pip install ([^&]*)", runs)
    assert all("--no-deps" in args for args in installs if not args.startswith("uv=="))
    assert "uv.lock" in " ".join(arg for op, arg in instructions if op == "COPY")
    # The manifests give each container its command; a CMD/ENTRYPOINT would be run instead
    # of (ENTRYPOINT) or be silently replaced by (CMD) the `dask scheduler/worker` args.
    assert not [op for op, _ in instructions if op in ("CMD", "ENTRYPOINT")]
    assert ("USER", "1000") in instructions


def test_lock_is_current_with_pyproject():
    # uv records the requirements it resolved; a dependency added to pyproject.toml without
    # `make lock` would otherwise install nothing new and pass silently.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (root,) = _lock()["fedpipe"]
    locked = {canonicalize_name(r["name"]) for r in root["metadata"]["requires-dist"]}
    declared = {canonicalize_name(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0])
                for r in project["dependencies"]
                + [r for extra in project["optional-dependencies"].values() for r in extra]}
    assert declared == locked, "pyproject.toml and uv.lock disagree: run `make lock`"


@pytest.mark.parametrize("name", MUST_LOCK)
def test_dask_stack_is_locked(name):
    assert name in locked_closure(extras=())


def test_environment_equals_the_lock():
    expected, installed = locked_closure(), _installed()
    installed.pop("fedpipe", None)
    expected.pop("fedpipe")
    wrong = {n: (v, installed.get(n)) for n, v in expected.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(expected))
    assert not wrong, f"installed versions differ from uv.lock (run `make test`): {wrong}"
    assert not extra, f"installed but not in uv.lock: {extra}"
