"""The README's Python quick start runs as printed (it is the first thing a user copies)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "packages" / "ae-adapt" / "README.md"


def test_readme_quick_start_runs(tmp_path, monkeypatch):
    block = re.search(r"<!-- quickstart:begin -->\s*```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert block, "the quick-start block is missing from the README"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), str(README), "exec"), {"__name__": "readme"})  # noqa: S102 - our own README
    for stage in ("1-align-embedder", "2-align-head", "3-lora"):
        assert (tmp_path / "adapted" / stage / "done.json").is_file(), stage
