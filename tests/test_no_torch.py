"""The runtime never imports torch or transformers, and a query loads only the tower it needs."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli_helpers import invoke_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli import bundle as B
from uclip_cli.query import run_query
from uclip_cli.sessions import OrtModel, SessionFactory

BANNED = ("torch", "transformers", "ray")   # ray: only `uclip embed` may load it

# Runs `uclip ARGV...` through the real entry point, then writes its exit code and every module
# of a banned package that ended up imported to the file named by argv[1].
RUN_AND_LIST_MODULES = """
import json, sys
out, sys.argv = sys.argv[1], ["uclip", *sys.argv[2:]]
from uclip_cli.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
banned = sorted(m for m in sys.modules if m.split(".")[0] in {banned})
with open(out, "w") as f:
    json.dump({{"code": code, "banned": banned}}, f)
""".format(banned=set(BANNED))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bundle):
    home = tmp_path_factory.mktemp("no_torch")
    photos = home / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"photo_{i}.jpg").write_bytes(jpeg_bytes(photo_like(96, 80, seed=50 + i)))
    outsider = home / "outsider.jpg"
    outsider.write_bytes(jpeg_bytes(photo_like(96, 80, seed=77)))
    return photos, outsider, uclip_env(home, bundle=tiny_bundle, index=home / "index"), home


def modules_after(args: list[str], env: dict, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", RUN_AND_LIST_MODULES, str(out), *args], env=env,
                          capture_output=True, timeout=60)
    assert out.exists(), done.stderr.decode()
    return json.loads(out.read_text())


def test_index_query_and_doctor_never_import_torch_or_transformers(setup):
    photos, outsider, env, home = setup
    commands = {
        "index": ["index", str(photos), "--no-progress"],
        "text query": ["query", "a dog on the beach"],
        "image query": ["query", str(outsider)],
        "indexed image query": ["query", str(photos / "photo_0.jpg")],
        "doctor": ["doctor"],
    }
    for name, args in commands.items():
        result = modules_after(args, env, home / f"{name}.json")
        assert result["code"] == 0, name
        assert result["banned"] == [], f"`uclip {name}` imported {result['banned']}"


@dataclass
class RecordingSessions(SessionFactory):
    """A SessionFactory that remembers which bundle files it created sessions for."""

    created: list[str] = field(default_factory=list)

    def create(self, path: Path, expect: dict | None = None) -> OrtModel:
        self.created.append(Path(path).name)
        return super().create(path, expect)


def run_recorded(query: str, tiny_bundle: Path, index: Path) -> list[str]:
    sessions = RecordingSessions(device="cpu", threads=1)
    result = run_query(query, index_path=index, bundle_path=tiny_bundle, sessions=sessions, top=3)
    assert result.hits
    return sorted(sessions.created)


def test_a_query_loads_only_the_tower_it_needs(setup, tiny_bundle, monkeypatch):
    photos, outsider, env, home = setup
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    heads = B.load_bundle(tiny_bundle, verify=False).has_heads
    index = Path(env["UCLIP_INDEX"])

    text_towers = [B.HEAD_A, B.TEXT_MULTILINGUAL] if heads else [B.TEXT_CLIP]
    assert run_recorded("a dog on the beach", tiny_bundle, index) == sorted(text_towers)
    image_towers = [B.HEAD_B, B.IMAGE_ENCODER] if heads else [B.IMAGE_ENCODER]
    assert run_recorded(str(outsider), tiny_bundle, index) == sorted(image_towers)
    # an indexed photo as the example: its stored vector is used, no encoder is loaded at all
    assert run_recorded(str(photos / "photo_0.jpg"), tiny_bundle, index) == []
