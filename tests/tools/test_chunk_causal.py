"""Smoke test of tools/experiments/chunk_causal.py: a seconds-long run writes the report, PNG and JSON."""

import importlib.util
import json
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("chunk_causal", ROOT / "tools/experiments/chunk_causal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_report(tmp_path):
    tool = _tool()
    report = tmp_path / "report" / "chunk_causal.md"
    argv = ["--steps", "2", "--train-clips", "3", "--eval-clips", "1", "--frames", "8", "--size", "32",
            "--batch", "2", "--modes", "causal,non_causal,chunk_causal:4,chunk_causal:8", "--threads", "1",
            "--workdir", str(tmp_path / "work"), "--report", str(report)]
    assert tool.main(argv) == 0
    text = report.read_text()
    rows = json.loads(report.with_suffix(".json").read_text())
    assert list(rows) == ["causal", "non_causal", "chunk_causal:4", "chunk_causal:8"]
    assert len({r["params"] for r in rows.values()}) == 1  # identical size in every mode
    for name, r in rows.items():
        assert f"| {name} | {r['params']:,} | 2 |" in text and r["psnr_T"] > 0
    # one chunk spanning the whole training clip is non-causal at length T (same seed, same data)
    assert abs(rows["chunk_causal:8"]["psnr_T"] - rows["non_causal"]["psnr_T"]) < 1e-3
    assert "Command: `python tools/experiments/chunk_causal.py --steps 2" in text and "Wall-clock:" in text
    assert text.count("1. chunk-causal beats causal") == 1 and "3. larger chunks help" in text
    with av.open(str(report.with_suffix(".png"))) as c:
        frame = next(c.decode(video=0))
    assert frame.width > 100 and frame.height == 240
