"""The package's architecture, checked from its source: each layer imports only the layers below it, no module
imports itself back through others, and starting the command line loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import twa_cli

PACKAGE = Path(twa_cli.__file__).parent
# Lowest first. A module may import its own layer and the layers before it, never one after it.
LAYERS = ["twa_cli.errors", "twa_cli.units", "twa_cli.io", "twa_cli.engine", "twa_cli.tasks", "twa_cli.core",
          "twa_cli.commands", "twa_cli.cli", "twa_cli.integrations"]
# The tensor core takes tensors, never files: besides the layers above it, it imports no io.
NO_FILES = "twa_cli.engine"
# The training-loop callbacks are built on the tensor core's public API (the package, not its modules) alone.
INTEGRATIONS = "twa_cli.integrations"
INTEGRATIONS_MAY_IMPORT = {"twa_cli.engine", "twa_cli.errors"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The twa_cli modules a file imports (anywhere in it, or only at module level)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("twa_cli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("twa_cli"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
    return found


def _layer(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_no_module_imports_from_a_layer_above_its_own(module):
    own = _layer(module)
    above = sorted(m for m in _imports(MODULES[module], top_level_only=False) if (_layer(m) or 0) > own)
    assert not above, f"{module} (layer {LAYERS[own]}) imports {above}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m == NO_FILES or m.startswith(NO_FILES + ".")))
def test_the_tensor_core_imports_no_file_handling(module):
    files = sorted(m for m in _imports(MODULES[module], top_level_only=False)
                   if m == "twa_cli.io" or m.startswith("twa_cli.io."))
    assert not files, f"{module} (the tensor core) imports {files}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(INTEGRATIONS + ".")))
def test_integrations_import_only_the_tensor_cores_public_api(module):
    used = _imports(MODULES[module], top_level_only=False)
    assert used <= INTEGRATIONS_MAY_IMPORT, f"{module} imports {sorted(used - INTEGRATIONS_MAY_IMPORT)}"


def test_the_rooms_these_rules_name_exist():
    """The rules above are about modules that exist (a renamed room would pass them vacuously)."""
    assert {"twa_cli.engine.api", "twa_cli.engine.orthogonalizer", "twa_cli.engine.subspace",
            "twa_cli.integrations.hf", "twa_cli.integrations.lightning"} <= set(MODULES)


def test_no_import_cycle_among_the_modules():
    graph = {m: {i for i in _imports(p, top_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module in done:
            return
        for nxt in sorted(graph[module]):
            visit(nxt, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == ["twa_cli", "twa_cli.__main__"]


def test_the_public_api_names_every_command():
    for name in ("sample", "swa", "orthogonalize", "train_subspace", "evaluate_checkpoints", "inspect", "plot",
                 "Task", "TaskRequest", "Selection", "ReadOptions"):
        assert callable(getattr(twa_cli, name)), name


def test_help_and_version_do_not_import_torch(tmp_path):
    """Measured in a fresh interpreter (the process is what is tested): `twa --version` and `--help` answer
    without loading torch, also when a --config-from file (read with torch) comes before -h."""
    recorded = tmp_path / "result.safetensors"
    recorded.write_bytes(b"not read for a help page")
    config = tmp_path / "run.yaml"
    config.write_text("epochs: 3\n")
    probe = ("import sys\nfrom twa_cli.cli import main\n"
             "for argv in (['--version'], ['--help'], ['swa', '--help'], ['train-subspace', '--help'],\n"
             f"             ['swa', '--config-from', {str(recorded)!r}, '--help'],\n"
             f"             ['sample', '--config', {str(config)!r}, '--config-from', {str(recorded)!r}, '-h']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert proc.stderr.strip().splitlines()[-1] == "NO TORCH", proc.stderr
    assert "twa " in proc.stdout and "Usage" in proc.stdout
