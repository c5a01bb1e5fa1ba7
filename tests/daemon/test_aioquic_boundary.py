"""aioquic's private state is touched in tunnel.daemon.aioquic_private and nowhere else in the
package, and that package's docstring lists every private name it uses."""

import ast
import re
from pathlib import Path

import tunnel
import tunnel.daemon.aioquic_private as aioquic_private

PACKAGE_DIR = Path(tunnel.__file__).parent
PRIVATE_DIR = Path(aioquic_private.__file__).parent
# Every `_name` the inventory mentions (attributes, methods, our own additions).
LISTED = set(re.findall(r"(?<!\w)_[a-z]\w*", aioquic_private.__doc__ or ""))
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def private_names(tree: ast.AST) -> list[tuple[int, str, str]]:
    """(line, receiver, name) of every `x._name` and `getattr(x, "_name")` not on self/cls."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            receiver, name = node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_FUNCTIONS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            receiver, name = node.args[0], node.args[1].value
        else:
            continue
        if not name.startswith("_") or name.startswith("__"):
            continue
        if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
            continue
        found.append((node.lineno, ast.unparse(receiver), name))
    return found


def private_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """Imports of aioquic's private modules (aioquic._crypto and the like)."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [
            (node.lineno, name)
            for name in names
            if name.split(".")[0] == "aioquic" and any(p.startswith("_") for p in name.split("."))
        ]
    return found


def test_nothing_outside_the_private_package_reads_aioquic_private_state():
    offences = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if PRIVATE_DIR in path.parents:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(PACKAGE_DIR.parent)
        offences += [
            f"{where}:{line}: {receiver}.{name}"
            for line, receiver, name in private_names(tree)
            if name in LISTED
        ]
        offences += [f"{where}:{line}: import {name}" for line, name in private_modules(tree)]
    assert offences == [], "use tunnel.daemon.aioquic_private instead"


def test_the_inventory_lists_every_private_name_the_package_uses():
    used = set()
    for path in sorted(PRIVATE_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        used |= {name for _, _, name in private_names(tree)}
        for node in ast.walk(tree):  # attributes set on self in our own subclasses
            if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                if not node.attr.startswith("__"):
                    used.add(node.attr)
    assert sorted(used - LISTED) == []
