"""The README's quickstart, line for line, in a fresh virtual environment: install, index, a Czech query.

What differs from a user's machine is only where the hub is: HF_ENDPOINT points at a local stand-in that
serves the two default repos' exact layouts with tiny random weights (tests/published_towers.py), and the
copy of uclip installed here carries the default recipe with the stand-in's pins (default_model.json: the
same repos, files and layouts; other commits and sha256). No torch gets installed; nothing else is changed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cli_helpers import uclip_env
from fake_hub import Server
from image_fixtures import jpeg_bytes, photo_like
from published_towers import repo_files, write_published_repos
from test_assemble import stand_in

ROOT = Path(__file__).resolve().parents[1]


def quickstart_lines() -> list[str]:
    """The commands of the README's first code block after `## Quickstart`, from the clone's folder on."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert lines[0].startswith("git clone") and "cd uclip" in lines[0], lines[0]
    return lines[1:]


def test_readme_quickstart_in_a_fresh_venv_gives_results_from_the_assembled_default(tmp_path):
    lines = quickstart_lines()
    assert lines == ["python3 -m venv .venv && . .venv/bin/activate", "pip install '.[cpu]'",
                     "uclip index ~/Pictures", 'uclip query "kočka na gauči"', 'uclip query "pláž after:2024"'], lines
    clone = tmp_path / "uclip"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    published = {repo: repo_files(folder) for repo, folder in write_published_repos(tmp_path / "published").items()}
    hub, recipe = stand_in(published)
    (clone / "uclip_cli" / "default_model.json").write_text(json.dumps(recipe, indent=2), encoding="utf-8")
    home = tmp_path / "user"
    (home / "Pictures" / "2024").mkdir(parents=True)
    for i in range(5):
        (home / "Pictures" / ("2024" if i % 2 else "") / f"IMG_{i}.jpg").write_bytes(jpeg_bytes(photo_like(400, 300, seed=i)))
    env = uclip_env(home)
    env.update(HOME=str(home), PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for key in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VIRTUAL_ENV", "PYTHONPATH", "UCLIP_THREADS"):
        env.pop(key, None)                                        # a user's defaults: ~/.local/share/uclip ...
    script = "set -e\n" + "\n".join(lines) + "\npython -c 'import importlib.util as u; print(\"torch:\", u.find_spec(\"torch\"))'\n"
    with Server(hub) as url:
        env["HF_ENDPOINT"] = url
        done = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, timeout=900)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, err[-3000:]
    assert "torch: None" in out                                   # the runtime install has no torch
    assert "assembling the default model" in err and "heads fitted and installed" in err
    results = [line for line in out.splitlines() if line.strip().endswith(".jpg")]
    # both queries list every photo: the filtered one too, as the photos (no EXIF) were taken, by their mtime, now
    assert len(results) == 10 and all(str(home / "Pictures") in line for line in results)
    manifest = json.loads((home / ".local" / "share" / "uclip" / "bundle" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["training"]["sizes"]["captions"] == 1800 and len(manifest["training"]["foreign_languages"]) == 35
    assert {t["repo"] for t in recipe["towers"]} == {p["repo"] for p in manifest["export"]["assembled"]["files"].values()}
