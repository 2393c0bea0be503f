"""deploy/Dockerfile and deploy/constraints.txt, checked statically (no Docker daemon here)."""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Dask refuses mismatched versions between driver, scheduler and workers; these above all.
MUST_PIN = ("dask", "distributed", "numpy", "zarr")


def _instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = pinned
    return pins


def test_base_image_is_pinned_and_matches_our_python():
    (base,) = [arg for op, arg in _instructions() if op == "FROM"]
    image, _, digest = base.partition("@")
    name, _, tag = image.partition(":")
    assert name in ("python", "docker.io/library/python"), base
    match = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)-slim-\w+", tag)
    assert match, f"base image {base!r} is not an exact python X.Y.Z-slim-<debian> tag"
    assert tuple(map(int, match.groups()[:2])) == sys.version_info[:2]
    assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base


def test_project_is_installed_with_the_constraints_and_no_stray_cmd():
    instructions = _instructions()
    installs = [arg for op, arg in instructions if op == "RUN" and "pip install" in arg]
    assert installs and all("-c deploy/constraints.txt" in arg for arg in installs)
    copies = " ".join(arg for op, arg in instructions if op == "COPY")
    assert "deploy/constraints.txt" in copies
    # The manifests give each container its command; a CMD/ENTRYPOINT would be run instead
    # of (ENTRYPOINT) or be silently replaced by (CMD) the `dask scheduler/worker` args.
    assert not [op for op, _ in instructions if op in ("CMD", "ENTRYPOINT")]
    assert ("USER", "1000") in instructions


@pytest.mark.parametrize("name", MUST_PIN)
def test_dask_stack_pins_equal_the_tested_versions(name):
    assert _pins()[name] == version(name), (
        f"constraints.txt pins {name}=={_pins()[name]} but the tests run {version(name)}: "
        "regenerate with `.venv/bin/python deploy/pin_constraints.py`"
    )


def test_every_pin_is_installed_at_that_version():
    stale = {n: (p, version(n)) for n, p in _pins().items() if version(n) != p}
    assert not stale, f"regenerate deploy/constraints.txt: {stale}"


def test_every_runtime_dependency_is_pinned():
    try:
        requires = distribution("fedpipe").requires or []
    except PackageNotFoundError:
        pytest.skip("fedpipe is not installed (pip install -e .)")
    direct = {canonicalize_name(Requirement(r).name) for r in requires
              if Requirement(r).marker is None}
    assert direct - set(_pins()) == set(), "regenerate with deploy/pin_constraints.py"
