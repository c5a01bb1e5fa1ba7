"""tunnel.core is sans-IO: importing it must not pull in I/O libraries, and its source must
not import os. Modules are discovered, so new core modules are checked without editing this."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import tunnel.core

FORBIDDEN_AT_RUNTIME = ("trio", "socket", "pyroute2", "subprocess", "aioquic")
FORBIDDEN_IN_SOURCE = {"os", "trio", "socket", "pyroute2", "subprocess", "aioquic"}
CORE_DIR = Path(tunnel.core.__file__).parent

_PROBE = """
import importlib, json, pkgutil, sys
import tunnel.core
names = sorted(
    info.name for info in pkgutil.walk_packages(tunnel.core.__path__, "tunnel.core.")
)
for name in names:
    importlib.import_module(name)
forbidden = json.loads(sys.argv[1])
print(json.dumps({
    "modules": names,
    "forbidden": sorted(
        m for m in sys.modules if m.split(".")[0] in forbidden or m.startswith("tunnel.daemon")
    ),
}))
"""


def test_importing_every_core_module_pulls_in_no_io_library():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(FORBIDDEN_AT_RUNTIME)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "tunnel.core.identity" in report["modules"]
    assert report["forbidden"] == []


def _core_sources():
    return sorted(CORE_DIR.rglob("*.py"))


def _imported_modules(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def test_core_source_imports_no_os_or_io_library():
    sources = _core_sources()
    assert CORE_DIR / "identity.py" in sources
    offences = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for lineno, module in _imported_modules(tree):
            if module.split(".")[0] in FORBIDDEN_IN_SOURCE:
                offences.append(f"{path.relative_to(CORE_DIR)}:{lineno}: imports {module}")
    assert offences == []


def test_static_check_catches_every_import_form():
    source = (
        "import os\nimport os.path as p\nfrom os import environ\nfrom socket import socket\n"
        "import importlib\nimportlib.import_module('subprocess')\n__import__('trio')\n"
        "from . import sibling\nimport osmosis\n"
    )
    found = [module for _, module in _imported_modules(ast.parse(source))]
    assert [m for m in found if m.split(".")[0] in FORBIDDEN_IN_SOURCE] == [
        "os",
        "os.path",
        "os",
        "socket",
        "subprocess",
        "trio",
    ]


def test_walk_packages_sees_the_same_modules_as_the_directory():
    names = {info.name for info in pkgutil.walk_packages(tunnel.core.__path__, "tunnel.core.")}
    files = {
        "tunnel.core." + ".".join(path.relative_to(CORE_DIR).with_suffix("").parts)
        for path in _core_sources()
        if path.name != "__init__.py"
    }
    assert files <= names
