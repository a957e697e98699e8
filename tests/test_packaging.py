"""What installing uclip puts on a user's machine: the distribution `uclip-cli` (PyPI's `uclip` is an unrelated
program), one top-level package, a light runtime, exclusive extras."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"      # setuptools writes build/ next to the sources: build a copy
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, cwd=out)
    return zipfile.ZipFile(next(out.glob("uclip_cli-*.whl")))


def _metadata(wheel: zipfile.ZipFile):
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return Parser().parsestr(wheel.read(name).decode())


def test_the_distribution_is_uclip_cli_and_the_readme_installs_it(wheel):
    assert _metadata(wheel)["Name"] == "uclip-cli"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    installs = [line.strip() for line in readme.splitlines() if line.strip().startswith("pip install")]
    assert installs, "the README says how to install uclip"
    for line in installs:   # never the PyPI name `uclip`: an unrelated clipboard uploader
        assert not any(word.strip("'\"").split("[")[0] == "uclip" for word in line.split()[2:]), line


def test_only_uclip_cli_lands_in_site_packages(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"uclip_cli"}
    names = set(wheel.namelist())
    assert {"uclip_cli/train/trainer.py", "uclip_cli/export/build.py", "uclip_cli/cli.py"} <= names


def test_runtime_needs_no_torch_and_extras_are_as_documented(wheel):
    requires = _metadata(wheel).get_all("Requires-Dist")
    runtime = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requires if "extra ==" not in r}
    assert runtime == {"numpy", "pillow", "typer", "tokenizers"}
    extras = {}
    for r in requires:
        if "extra ==" in r:
            extra = r.split("extra ==")[1].strip().strip("'\"")
            extras.setdefault(extra, set()).add(r.split(";")[0].split(">")[0].split("=")[0].strip().lower())
    # onnx: the default model's multilingual tower is fused at assembly (tower_fusion.py)
    assert extras["cpu"] == {"onnxruntime", "onnx", "sympy"} and extras["gpu"] == {"onnxruntime-gpu", "onnx", "sympy"}
    assert {"torch", "transformers", "safetensors", "onnx", "onnxscript", "sentencepiece"} <= extras["train"]
    assert extras["heif"] == {"pillow-heif"}


def test_console_entry_point(wheel):
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "uclip = uclip_cli.cli:entry" in wheel.read(name).decode()


def test_the_serve_page_and_extra_ship_in_the_wheel(wheel):
    names = set(wheel.namelist())
    assert {f"uclip_cli/serve/static/{f}" for f in ("index.html", "app.js", "dupes.js", "style.css")} <= names
    assert "uclip_cli/serve/app.py" in names
    serve = {r.split(";")[0].split(">")[0].strip().lower() for r in _metadata(wheel).get_all("Requires-Dist")
             if "extra == \"serve\"" in r.replace("'", '"')}
    assert serve == {"starlette", "uvicorn"}
