"""Usage errors come back before any heavy work: every check that needs only the flags and the files' names
(and what their metadata records) runs before a model is built, data is loaded or checkpoints are
orthogonalized. Measured in a fresh interpreter where that work raises, and transformers may not load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Run in a fresh interpreter: the heavy steps raise HeavyWork (not an error the CLI turns into one line), then
# each command line runs; prints, per case, the exit code, the last stderr line and the heavy step reached.
_PROBE = r"""
import contextlib, io, json, sys

class HeavyWork(BaseException):
    pass

def heavy(what):
    def refuse(*args, **kwargs):
        raise HeavyWork(what)
    return refuse

from twa_cli.core import placement
from twa_cli.tasks import classification, images

placement.SingleProcess.orthogonalize = heavy("orthogonalize")
placement.ColumnShards.orthogonalize = heavy("orthogonalize")
classification.ClassificationTask.build_model = heavy("build the model")
images.load_data = heavy("load the data")
classification.load_data = heavy("load the data")

from twa_cli.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    code, reached = 0, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(argv)
    except SystemExit as exc:
        code = exc.code
    except HeavyWork as exc:
        code, reached = None, str(exc)
    lines = err.getvalue().strip().splitlines()
    results.append({"argv": argv, "code": code, "reached": reached, "last": lines[-1] if lines else ""})
print(json.dumps({"results": results, "transformers": "transformers" in sys.modules}))
"""


def _cases(run: Path, tmp: Path) -> list[tuple[list[str], str]]:
    ckpt = str(sorted(run.glob("ckpt-*.safetensors"))[-1])
    out, missing = str(tmp / "out"), str(tmp / "missing.safetensors")
    return [
        (["train-subspace", str(run), "-o", out, "--fit-on", "val"], "--fit-on val needs --val-split"),
        (["train-subspace", str(run), "-o", out, "--fit-on", "val", "--eval-data", str(tmp / "dev.txt")],
         "--fit-on val needs --val-split"),
        (["train-subspace", str(run), "-o", out, "--affine", "--granularity", "layer"], "--affine"),
        (["train-subspace", str(run), "-o", out, "--init", missing], f"--init {missing}"),
        (["train-subspace", str(run), "-o", out, "--tol", "2"], "--tol"),
        (["train-subspace", str(run), "-o", out, "--resume"], "nothing to resume"),
        (["train-subspace", str(run), "-o", out, "--data-dir", str(tmp)], "--data-dir needs --data"),
        (["sample", out, "--model", "mlp", "--init", missing], f"--init {missing}"),
        (["swa", str(run), "-o", str(tmp / "avg.safetensors"), "--greedy"], "--greedy"),
        (["swa", str(run), "-o", str(run / "avg.safetensors")], "inside the input folder"),
        (["eval", ckpt, "--data-dir", str(tmp)], "--data-dir needs --data"),
        (["eval", ckpt, "--label", "a", "--label", "b"], "--label"),
    ]


def test_usage_errors_come_back_before_any_model_data_or_orthogonalization(mlp_run, tmp_path):
    cases = _cases(mlp_run, tmp_path)
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps([argv for argv, _ in cases])],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    late = [(r["argv"], r["reached"]) for r in report["results"] if r["reached"]]
    assert not late, f"usage errors answered only after heavy work: {late}"
    for result, (_, expected) in zip(report["results"], cases, strict=True):
        assert result["code"] == 1 and result["last"].startswith("error: ") and expected in result["last"], result
    assert not report["transformers"]  # an image model's usage error never loads transformers


@pytest.mark.parametrize("command", ["swa", "train-subspace", "orthogonalize", "inspect"])
def test_a_missing_input_is_named_at_once(tmp_path, twa, command):
    missing = tmp_path / "nowhere"
    args = [command, missing] + ([] if command == "inspect" else ["-o", tmp_path / "out.safetensors"])
    result = twa(*args, check=False)
    assert result.returncode == 1 and str(missing) in result.stderr.strip().splitlines()[-1]
