"""registry/ stands alone: it imports none of our other packages but the base package common/, and its light modules
load without mlflow/boto3. (Every package's import rules: tests/unit/test_import_rules.py.)"""

import ast
import subprocess
import sys
from pathlib import Path

REGISTRY = Path(__file__).resolve().parents[2] / "registry"


def test_registry_imports_nothing_of_ours():
    ours = {"pipelines", "monitoring", "serving", "infra"}  # common/ is allowed
    for path in REGISTRY.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bad = [n for n in names if n.split(".")[0] in ours]
            assert not bad, f"{path.name} imports {bad}; registry/ may import nothing of ours but common/ (docs/ARCHITECTURE.md)"


def test_every_module_has_a_docstring():
    for path in REGISTRY.glob("*.py"):
        if path.name != "__init__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no module docstring"


def test_light_modules_do_not_pull_heavy_dependencies():
    code = (
        "import sys, registry.hashing, registry.names, registry.store, registry.binding; "
        "print(sorted(m for m in ('mlflow', 'boto3', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REGISTRY.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
