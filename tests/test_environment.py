"""The test environment itself: pyproject.toml gives users lower bounds only (the pins live in
requirements/*.lock), and the transformers 4.x side environment imports nothing from the main environment by
accident: only torch, and what torch itself requires, may come from there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from realtools import TRANSFORMERS4

REPO = Path(__file__).resolve().parents[1]

# What a test under transformers 4.57 does (tests/test_realtools.py): import it, build a model, tokenize, read
# safetensors; then every top-level module loaded since start-up, and where it came from.
_ORIGINS = r"""
import json, sys
before = set(sys.modules)
import requests, safetensors.torch, tokenizers, huggingface_hub, torch, transformers
from transformers import AutoModelForCausalLM, GPT2Config
model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=64, n_positions=16))
model(torch.zeros(1, 4, dtype=torch.long))
files = {name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
         if "." not in name and name not in before}
print(json.dumps({"version": transformers.__version__, "files": {k: v for k, v in files.items() if v}}))
"""


def _torch_and_its_requirements() -> set[str]:
    """The distributions the side environment may share with the main one: torch and, recursively, what it
    requires (on this platform)."""
    shared: set[str] = set()
    todo = ["torch"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in shared:
            continue
        shared.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return shared


def test_the_transformers4_side_environment_takes_only_torch_from_the_main_one():
    """Run as the tests run it (`python -S`, PYTHONPATH=the side folder): transformers 4.57 and its dependencies
    from the side folder's own files; torch and its requirements through links to the main environment; nothing
    else of the main environment (not even what transformers would pick up when it probes for accelerate,
    Pillow or scikit-learn)."""
    if not (TRANSFORMERS4 / "transformers").is_dir():
        pytest.fail(f"transformers 4.57 is not installed in {TRANSFORMERS4} (scripts/test.sh installs it)")
    env = dict(os.environ, PYTHONPATH=str(TRANSFORMERS4), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-S", "-c", _ORIGINS], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["version"].startswith("4.57"), report["version"]
    main = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    providers = metadata.packages_distributions()
    shared = _torch_and_its_requirements()
    own, linked, accidental = set(), {}, {}
    for name, file in report["files"].items():
        path, real = Path(file).absolute(), Path(file).resolve()
        dists = sorted(canonicalize_name(d) for d in providers.get(name, [name]))
        if TRANSFORMERS4 in path.parents and TRANSFORMERS4 in real.parents:
            own.add(name)
        elif TRANSFORMERS4 in path.parents:
            linked[name] = dists
        elif any(root in real.parents for root in main):
            accidental[name] = dists
    assert {"transformers", "tokenizers", "huggingface_hub", "safetensors", "requests"} <= own
    assert "torch" in linked
    assert not accidental, f"imported from the main environment's site-packages: {accidental}"
    unshared = {name: dists for name, dists in linked.items() if not set(dists) & shared}
    assert not unshared, f"linked from the main environment, but not torch's: {unshared}"


def test_pyproject_gives_lower_bounds_only_and_the_lock_pins_every_package():
    text = (REPO / "pyproject.toml").read_text()
    requirements = re.findall(r'^\s*"([^"]+)",?\s*$', text, flags=re.M)
    specs = [Requirement(r) for r in requirements if re.match(r"^[A-Za-z0-9_.\-\[\]]+\s*[<>=!~]", r)]
    assert specs, "no requirements found in pyproject.toml"
    for req in specs:
        assert all(s.operator == ">=" for s in req.specifier), f"pyproject.toml: {req} is not a lower bound"
    for lock in ("test.lock", "transformers4.lock"):
        lines = [line for line in (REPO / "requirements" / lock).read_text().splitlines()
                 if line and not line.lstrip().startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+", line) for line in lines), lock
