"""The layering promises the design card makes, checked on the source tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runtime_never_names_a_device():
    pattern = re.compile(r"torch\.cuda|torch_npu|is_available")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "runtime").rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_backends_do_not_import_the_runtime():
    """A backend knows the model only through backends/base.py (ModelSpec, weight containers); the error types
    both sides raise live in backends/errors.py, so nothing under backends/ imports moerun.runtime."""
    pattern = re.compile(r"^\s*(from|import)\s+moerun\.runtime\b", re.MULTILINE)
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "backends").rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []


def test_every_backend_imports_without_its_hardware():
    """YAML validation imports every backend class; none may need triton or torch_npu to import."""
    from moerun.backends.base import backend_names, get_backend_class

    for name in backend_names():
        assert get_backend_class(name).name == name


def test_every_package_is_listed_in_pyproject():
    """setuptools installs only the packages pyproject.toml names: a new subpackage missing there works in an
    editable install and is absent from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"moerun." + ".".join(p.parent.relative_to(ROOT).parts) for top in ("runtime", "backends", "configs")
             for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set()
