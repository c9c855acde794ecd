"""The seams of dashboard/runtime/seams.py hold for the installed Django, RQ and psycopg, the
list is complete, and the suite uses only the client that serves requests as production does."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from pathlib import Path

import pytest
from django.utils.module_loading import import_string

from dashboard.runtime.seams import CHECKED_AGAINST, SEAMS, SUBCLASSES

BASE_DIR = Path(__file__).resolve().parents[2]


def owner_of(path: str):
    try:
        return import_string(path)
    except ImportError:
        return importlib.import_module(path)


def library_source(owner) -> str:
    """The source of `owner` and of its bases from the same library."""
    if inspect.ismodule(owner):
        return inspect.getsource(owner)
    package = owner.__module__.split(".")[0]
    return "\n".join(inspect.getsource(cls) for cls in owner.__mro__
                     if cls.__module__.split(".")[0] == package)  # fmt: skip


@pytest.mark.parametrize("seam", SEAMS, ids=lambda s: f"{s.owner}.{s.attribute}")
def test_each_seam_still_exists_with_the_parameters_we_assume(seam):
    owner = owner_of(seam.owner)
    assert hasattr(owner, seam.attribute), f"{seam.owner}.{seam.attribute} is gone"
    attribute = inspect.getattr_static(owner, seam.attribute)
    if seam.parameters is not None:
        function = (
            attribute.__func__ if isinstance(attribute, staticmethod | classmethod) else attribute
        )
        names = tuple(inspect.signature(function).parameters)
        assert names == seam.parameters, f"{seam.owner}.{seam.attribute}{names}"
    if seam.private_state:
        source = library_source(owner)
        for name in seam.private_state:
            assert re.search(rf"\b{re.escape(name)}\b", source), (
                f"{seam.owner} no longer uses {name}, which {seam.where} relies on"
            )


@pytest.mark.parametrize(("ours", "bases"), SUBCLASSES.items())
def test_every_shadowed_library_attribute_is_listed(ours, bases):
    listed = {(seam.owner, seam.attribute) for seam in SEAMS}
    cls = import_string(ours)
    own = {name for name in vars(cls) if not name.startswith("__")}
    missing = [
        f"{ours}.{name} shadows {base}.{name}"
        for base in bases
        for name in own
        if hasattr(import_string(base), name) and (base, name) not in listed
    ]
    assert missing == []


def test_the_list_was_checked_against_the_installed_minor_versions():
    for package, checked in CHECKED_AGAINST.items():
        installed = ".".join(importlib.metadata.version(package).split(".")[:2])
        assert installed == checked, (
            f"{package} {installed} is installed, the seams were checked against {checked}: "
            "re-check dashboard/runtime/seams.py, then update CHECKED_AGAINST and pyproject.toml"
        )


def test_dependency_ranges_stop_before_the_next_minor_release():
    pyproject = (BASE_DIR / "pyproject.toml").read_text()
    for package, checked in CHECKED_AGAINST.items():
        major, minor = (int(part) for part in checked.split("."))
        pattern = rf'"{package}(\[[a-z]+\])?>={major}\.{minor}[.\d]*,<{major}\.{minor + 1}"'
        assert re.search(pattern, pyproject), f"{package} is not pinned to {checked}.x"


def test_no_test_module_uses_djangos_own_client():
    """tests.conftest.Client routes /api/ through the API's middleware as production does."""
    offenders = [
        str(path.relative_to(BASE_DIR))
        for path in (BASE_DIR / "tests").rglob("*.py")
        if path.name != "conftest.py"
        and re.search(r"from django\.test import[^\n]*\bClient\b", path.read_text())
    ]
    assert offenders == []
