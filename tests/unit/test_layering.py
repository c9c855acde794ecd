"""Dependencies point one way: entry points (the API, the dashboard UI, management commands) →
services and domain (tasks/) → plumbing (tasks/plumbing/). The domain never imports the API,
the UI, the commands or the project's runtime; plumbing imports nothing of the project."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

BASE_DIR = Path(__file__).resolve().parents[2]

ENTRY_POINTS = ("tasks.api", "tasks.management", "dashboard.ui", "dashboard.templatetags",
                "dashboard.management")  # fmt: skip
RUNTIME = "dashboard.runtime"
PLUMBING = "tasks.plumbing"


def module_name(path: Path) -> str:
    parts = path.relative_to(BASE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("tasks", "dashboard")}


def layer(module: str) -> str:
    if module.startswith(PLUMBING):
        return "plumbing"
    if module.startswith(ENTRY_POINTS):
        return "entry"
    if module.startswith(RUNTIME):
        return "runtime"
    if module.startswith("tasks"):
        return "domain"
    return "entry"  # dashboard's app module itself


# Which layers each layer may import. The runtime wires everything (root URLs, settings).
MAY_IMPORT = {
    "plumbing": {"plumbing"},
    "domain": {"domain", "plumbing"},
    "entry": {"entry", "domain", "plumbing", "runtime"},
    "runtime": {"runtime", "entry", "domain", "plumbing"},
}

MODULES = sorted(
    path
    for package in ("tasks", "dashboard")
    for path in (BASE_DIR / package).rglob("*.py")
    if "migrations" not in path.parts
)


def violations(path: Path, as_module: str | None = None) -> list[str]:
    name_of_path = as_module or module_name(path)
    own = layer(name_of_path)
    return [
        f"{name_of_path} ({own}) imports {name} ({layer(name)})"
        for name in sorted(project_imports(path))
        if layer(name) not in MAY_IMPORT[own]
    ]


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_dependencies_point_one_way(path):
    assert violations(path) == []


def test_the_api_and_the_ui_do_not_import_each_other():
    crossing = [
        f"{module_name(path)} imports {name}"
        for path in MODULES
        for name in project_imports(path)
        if (module_name(path).startswith("tasks.api") and name.startswith("dashboard.ui"))
        or (module_name(path).startswith("dashboard.ui") and name.startswith("tasks.api"))
    ]
    assert crossing == []


def test_the_check_catches_a_domain_module_importing_the_ui(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def later():\n    from dashboard.ui import views\n")
    found = violations(probe, as_module="tasks.delivery.probe")
    assert found == [
        "tasks.delivery.probe (domain) imports dashboard.ui (entry)",
        "tasks.delivery.probe (domain) imports dashboard.ui.views (entry)",
    ]
