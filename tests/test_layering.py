"""The core library never imports the demo harness (``tasks``, ``comparison``, ``cli``).

Checked on the source (every ``import`` / ``from`` statement of every core module, parsed
with ``ast``), so a lazy import inside a function counts too.
"""

import ast
import os
import sys

import vcon_kernels

PACKAGE = os.path.dirname(vcon_kernels.__file__)
HARNESS = ("tasks", "comparison", "cli")
# ``python -m vcon_kernels`` is the CLI's entry point: it is the one core file that may import it.
ENTRY_POINTS = ("__main__.py",)


def _imported_modules(path, package_parts):
    """Absolute names of everything ``path`` imports; ``package_parts``: the package it lives in."""
    tree = ast.parse(open(path).read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is the module's own package, each extra dot one up
                base = package_parts[:len(package_parts) - (node.level - 1)]
                yield ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                yield node.module or ""


def core_imports_of_harness():
    found = []
    for root, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(root, PACKAGE)
        parts = ["vcon_kernels"] + ([] if rel == "." else rel.split(os.sep))
        if len(parts) > 1 and parts[1] in HARNESS:
            continue
        for name in files:
            if not name.endswith(".py") or (rel == "." and name in ENTRY_POINTS):
                continue
            for imported in _imported_modules(os.path.join(root, name), parts):
                bits = imported.split(".")
                if bits[0] == "vcon_kernels" and len(bits) > 1 and bits[1] in HARNESS:
                    found.append(f"{os.path.relpath(os.path.join(root, name), PACKAGE)} imports {imported}")
    return found


def test_core_library_does_not_import_the_demo_harness():
    assert core_imports_of_harness() == []


def test_the_check_sees_a_harness_import(tmp_path, monkeypatch):
    """The check itself can fail: a relative import of ``..tasks`` from a core subpackage is found."""
    pkg = tmp_path / "vcon_kernels"
    (pkg / "integrations").mkdir(parents=True)
    (pkg / "integrations" / "bad.py").write_text("def f():\n    from ..tasks.deps import require\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", str(pkg))
    assert core_imports_of_harness() == ["integrations/bad.py imports vcon_kernels.tasks.deps"]
