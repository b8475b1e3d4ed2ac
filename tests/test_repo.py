"""The monorepo's contracts: one version source per package, hatch builds, console scripts,
and dependencies that point one way (dcvg-kernels <- dcae-v <- dcvg-wan; ae-adapt never Wan)."""

import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dcvg-kernels": "dcvg_kernels", "dcae-v": "dcae_v", "ae-adapt": "ae_adapt", "dcvg-wan": "dcvg_wan"}


def _script(name):
    """A console script of the environment running the tests (its bin/ need not be on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _project(name):
    return tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text())


def _deps(name):
    return {re.split(r"[<>=!\[ ;]", d)[0] for d in _project(name)["project"]["dependencies"]}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_layout_and_single_version_source(name):
    module = PACKAGES[name]
    proj = _project(name)
    assert proj["build-system"]["build-backend"] == "hatchling.build"
    assert proj["project"]["dynamic"] == ["version"]
    about = ROOT / "packages" / name / proj["tool"]["hatch"]["version"]["path"]
    assert about == ROOT / "packages" / name / "src" / module / "__about__.py"
    assert (ROOT / "packages" / name / "README.md").is_file()
    # the declared license ships with each package (hatchling puts it in the wheel's dist-info)
    assert proj["project"]["license"] == "Apache-2.0"
    assert (ROOT / "packages" / name / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    version = re.search(r'__version__ = "([^"]+)"', about.read_text())[1]
    assert __import__(module).__version__ == version


@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_hatch_version_works_per_package(name):
    hatch = _script("hatch")
    assert hatch, "hatch is a test dependency (tests/requirements.txt)"
    out = subprocess.run([hatch, "version"], cwd=ROOT / "packages" / name, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == __import__(PACKAGES[name]).__version__


def test_dependencies_point_one_way():
    assert _deps("dcvg-kernels") == {"torch"}
    assert _deps("dcae-v") <= {"torch", "einops", "safetensors", "av", "numpy", "tqdm"}
    assert _project("dcae-v")["project"]["optional-dependencies"]["kernels"] == ["dcvg-kernels"]
    assert not _deps("ae-adapt") & {"dcvg-wan", "dcae-v", "transformers"}
    assert {"dcae-v", "ae-adapt", "dcvg-kernels"} <= _deps("dcvg-wan")


@pytest.mark.parametrize("script", ["dcae-v", "ae-adapt", "dcvg-wan"])
def test_console_scripts_answer_help(script):
    path = _script(script)
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and "usage:" in out.stdout


@pytest.mark.slow
def test_dcae_v_wheel_ships_demo_clip_and_default_checkpoint(tmp_path):
    hatch = _script("hatch")
    assert hatch, "hatch is a test dependency (tests/requirements.txt)"
    out = subprocess.run([hatch, "build", "-t", "wheel", str(tmp_path)], cwd=ROOT / "packages/dcae-v",
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("dcae_v-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("dcae_v/assets/demo.mp4", "dcae_v/assets/dcae-v-tiny-default/model.safetensors",
                   "dcae_v/assets/dcae-v-tiny-default/config.json", "dcae_v/cli.py"):
        assert needed in names
    assert wheel.stat().st_size < 25 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dcae-v", "dcvg-wan"])  # the packages with data files
def test_a_wheel_built_from_the_sdist_has_the_files_of_the_direct_wheel(tmp_path, name):
    """pip install of the sdist (PyPI's fallback, `python -m build`) must not lose the git-ignored
    assets (the demo clip, *.mp4) that the direct wheel ships."""
    hatch = _script("hatch")
    direct, via = tmp_path / "direct", tmp_path / "via"
    for target, out_dir in (("wheel", direct), ("sdist", tmp_path / "sdist")):
        out = subprocess.run([hatch, "build", "-t", target, str(out_dir)], cwd=ROOT / "packages" / name,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr
    with tarfile.open(next((tmp_path / "sdist").glob("*.tar.gz"))) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    out = subprocess.run([hatch, "build", "-t", "wheel", str(via)], cwd=unpacked, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    names = [sorted(zipfile.ZipFile(next(d.glob("*.whl"))).namelist()) for d in (direct, via)]
    assert names[0] == names[1]
    assert any(n.endswith(("demo.mp4", "example.png")) for n in names[1])


@pytest.mark.slow
def test_dcvg_wan_wheel_ships_the_embedded_demo_model(tmp_path):
    hatch = _script("hatch")
    out = subprocess.run([hatch, "build", "-t", "wheel", str(tmp_path)], cwd=ROOT / "packages/dcvg-wan",
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("dcvg_wan-*.whl"))).namelist()
    for needed in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                   "text_encoder/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json",
                   "defaults.json"):
        assert f"dcvg_wan/assets/t2v-tiny/{needed}" in names
    for needed in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                   "image_encoder/config.json", "image_encoder/model.safetensors", "defaults.json", "example.png"):
        assert f"dcvg_wan/assets/i2v-tiny/{needed}" in names
