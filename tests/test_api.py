"""The README's "As a library" example, run as it is written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_library_example_runs(tmp_path, monkeypatch):
    section = README.read_text().split("## As a library", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    result, scored = namespace["result"], namespace["scored"]
    assert len(result.report.alpha) == 5 and abs(sum(result.report.alpha) - 1) < 0.5
    assert scored.test.accuracy == pytest.approx(result.test.accuracy)
    assert (tmp_path / "swa.safetensors").exists() and (tmp_path / "twa-out" / "coefficients.json").exists()
