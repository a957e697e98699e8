"""A new user's first hour (issue 7, section 3): each wall they hit, reproduced, and what they get now.

- 3.1  export / train without torch: one line with the exact pip command (uclip_cli/extras.py)
- 3.4  export offline: one quick probe of the hub, no retry noise, `hf download` and the --clip / --multilingual flag
Later items (excludes, re-projection on the spot, path-like queries, damaged heads, progress lines, doctor,
argument checks) have their tests next to the command they concern, named in each test's docstring.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import ERROR_PREFIX, run_uclip, uclip_env
from uclip_cli.extras import CPU_TORCH, MissingExtra, install_command, require, require_extra

# ------------------------------------------------------------------ 3.1 missing extras

WITHOUT = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None          # as if not installed: import fails, importlib.util.find_spec gives None
sys.argv = ["uclip", *sys.argv[2:]]
from uclip_cli.cli import main
main()
"""


def run_without(modules: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, modules, *args], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command,missing", [(["export", "--out", "bundle"], "torch"),
                                             (["train", "--captions", "en.txt"], "torch"),
                                             (["train", "--captions", "en.txt"], "transformers")])
def test_export_and_train_without_the_train_extra_say_what_to_install(tmp_path, command, missing):
    done = run_without(missing, command, uclip_env(tmp_path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    message = lines[0]
    assert message.startswith(ERROR_PREFIX) and f"`uclip {command[0]}`" in message and missing in message
    assert install_command("train") in message and CPU_TORCH in message
    assert not (tmp_path / "bundle").exists()


def test_the_install_command_names_this_installation():
    # the test environment is an editable install of this checkout: pip recorded the folder
    command = install_command("heif")
    root = Path(__file__).resolve().parents[1]
    assert command in (f"pip install -e '{root}[heif]'", f"pip install '{root}[heif]'", "pip install 'uclip-cli[heif]'")


def test_require_names_the_extra_and_passes_broken_installs_through(monkeypatch, tmp_path):
    with pytest.raises(MissingExtra, match=r"serving needs the `serve` extra \(no_such_module_xyz is not installed\)"):
        require("no_such_module_xyz", extra="serve", purpose="serving")
    with pytest.raises(MissingExtra, match="pillow_heif"):
        monkeypatch.setitem(sys.modules, "pillow_heif", None)
        require_extra("heif", purpose="HEIC")
    broken = tmp_path / "broken_pkg_xyz"
    broken.mkdir()
    (broken / "__init__.py").write_text("import another_missing_module_xyz\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):   # installed but broken: not an extra to install, the real error
        require("broken_pkg_xyz", extra="serve", purpose="serving")


# ------------------------------------------------------------------ 3.4 export offline

@contextmanager
def silent_hub():
    """A local 'hub' that accepts connections and never answers; yields (endpoint, connection counter)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def refused_endpoint() -> str:
    """An address where nothing listens: connections are refused at once."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


def offline_export(tmp_path, tiny_checkpoints, endpoint: str | None, *, offline: bool, missing: str):
    env = uclip_env(tmp_path)
    env.pop("HF_HUB_OFFLINE", None)
    env["HF_HOME"] = str(tmp_path / "hf")            # an empty hub cache
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    local = {"clip": ["--multilingual", tiny_checkpoints.multilingual], "multilingual": ["--clip", tiny_checkpoints.clip]}
    return run_uclip(["export", "--out", tmp_path / "bundle", *local[missing]], env, timeout=300)


def test_export_with_the_hub_refusing_fails_at_once_naming_hf_download_and_the_flag(tmp_path, tiny_checkpoints):
    result = offline_export(tmp_path, tiny_checkpoints, refused_endpoint(), offline=False, missing="clip")
    message = result.one_line_error()
    assert "cannot be reached" in message and "hf download" in message and "huggingface-cli" not in message
    assert "--clip CLIP-ViT-B-32-DataComp.XL-s13B-b90K" in message
    assert "Retrying" not in result.stderr and not (tmp_path / "bundle").exists()


def test_export_with_a_hub_that_never_answers_asks_once(tmp_path, tiny_checkpoints):
    with silent_hub() as (endpoint, connections):
        result = offline_export(tmp_path, tiny_checkpoints, endpoint, offline=False, missing="clip")
        asked = len(connections)
    message = result.one_line_error()
    assert endpoint in message and "hf download laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K" in message
    assert asked == 1, f"{asked} connections: one probe, no retries"


def test_export_with_hf_hub_offline_touches_no_network(tmp_path, tiny_checkpoints):
    with silent_hub() as (endpoint, connections):
        result = offline_export(tmp_path, tiny_checkpoints, endpoint, offline=True, missing="multilingual")
        asked = len(connections)
    message = result.one_line_error()
    assert "HF_HUB_OFFLINE is set" in message and "--multilingual paraphrase-multilingual-MiniLM-L12-v2" in message
    assert asked == 0


# ------------------------------------------------------------------ 3.6 excludes (semantics: tests/test_walk.py)

def test_index_help_says_how_excludes_match(tmp_path):
    shown = run_uclip(["index", "--help"], {**uclip_env(tmp_path), "COLUMNS": "200"}).ok().stdout
    text = " ".join(shown.replace("│", " ").split())
    for phrase in (".gitignore", "a name at any depth", "'*/raw/*' also takes raw/ right under it", "absolute path"):
        assert phrase in text, phrase


# ------------------------------------------------------------------ 3.7 re-projection on the spot

@pytest.fixture
def retrained(tmp_path, tiny_bundle):
    """An index of three photos, then new heads written into its bundle (what `uclip train` does)."""
    import torch

    from cli_helpers import copy_bundle, invoke_uclip
    from image_fixtures import jpeg_bytes, photo_like
    from uclip_cli.train.heads import UCLIPHeads, write_heads_into_bundle

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes(photo_like(96, 80, seed=60 + i)))
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    env = uclip_env(tmp_path, bundle=bundle, index=tmp_path / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    torch.manual_seed(3)
    write_heads_into_bundle(UCLIPHeads(32, 24).eval(), bundle, {"note": "test heads"})
    return env, tmp_path / "index", bundle


def test_a_query_after_training_answers_from_the_features_projected_in_memory_and_writes_nothing(retrained):
    """Issue 7, 3.7: after `uclip train` every query was refused until `uclip index` ran again. Issue 19, item 7:
    a query must not rewrite the index either (a `uclip serve` of the first bundle would then refuse it)."""
    from cli_helpers import invoke_uclip

    env, index, bundle = retrained
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file() and p.suffix != ".lock"}
    first = invoke_uclip(["query", "pes na pláži", "--format", "paths"], env).ok()
    assert "projected in memory" in first.stderr and "no image decoded" in first.stderr and "uclip index" in first.stderr
    assert len(first.stdout.splitlines()) == 3
    after = {p.name: p.read_bytes() for p in index.iterdir() if p.is_file() and p.suffix != ".lock"}
    assert {k: v for k, v in after.items() if not k.startswith("catalog.sqlite")} == \
        {k: v for k, v in before.items() if not k.startswith("catalog.sqlite")}          # no row file rewritten
    assert "re-projected" in invoke_uclip(["index", "--no-progress"], env).ok().stdout   # the writer stores them
    stored = invoke_uclip(["query", "pes na pláži", "--format", "paths"], env).ok()
    assert "projected in memory" not in stored.stderr and stored.stdout == first.stdout


def test_a_query_of_a_stale_index_answers_while_it_is_locked_or_read_only(retrained, monkeypatch):
    import fcntl
    import os

    from cli_helpers import invoke_uclip

    env, index, _ = retrained
    fd = os.open(index / "writer.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # `uclip index` running elsewhere
    try:
        busy = invoke_uclip(["query", "a dog", "--format", "paths"], env).ok()
    finally:
        os.close(fd)
    assert "projected in memory" in busy.stderr and len(busy.stdout.splitlines()) == 3
    index.chmod(0o555)                                  # a read-only index (root could still write: nothing tries)
    try:
        readonly = invoke_uclip(["query", "a dog", "--format", "paths"], env).ok()
    finally:
        index.chmod(0o755)
    assert readonly.stdout == busy.stdout


# ------------------------------------------------------------------ 3.8 queries that look like paths

@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_bundle):
    """Three photos indexed with the tiny bundle (no heads); a working folder with a text file and a folder."""
    from cli_helpers import invoke_uclip
    from image_fixtures import jpeg_bytes, photo_like

    home = tmp_path_factory.mktemp("first_hour")
    photos = home / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, name in enumerate(("a.jpg", "b.jpg", "sub/c.jpg")):
        (photos / name).write_bytes(jpeg_bytes(photo_like(96, 80, seed=70 + i)))
    (home / "notes.txt").write_text("a shopping list\n", encoding="utf-8")
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    return home, env


@pytest.mark.parametrize("query,words", [
    ("./missing.jpg", "no such file"), ("missing.jpg", "no such file"), ("photos", "is a folder"),
    ("./photos/sub", "is a folder"), ("notes.txt", "not an image"), ("./notes.txt", "not an image"),
])
def test_a_query_that_looks_like_a_path_and_is_not_an_image_is_an_error(small_index, monkeypatch, query, words):
    """Issue 7, 3.8: `uclip query ./missing.jpg`, a folder or a .txt file silently ran a text query."""
    from cli_helpers import invoke_uclip

    home, env = small_index
    monkeypatch.chdir(home)
    message = invoke_uclip(["query", query, "--format", "json"], env).one_line_error()
    assert query.removeprefix("./").split("/")[-1] in message and words in message and "--text" in message


@pytest.mark.parametrize("query", ["AC/DC concert", "St. Vitus", "rock-n-roll 10:30", "photos of cats"])
def test_text_with_slashes_dots_or_a_folder_name_stays_text(small_index, monkeypatch, query):
    import json

    from cli_helpers import invoke_uclip

    home, env = small_index
    monkeypatch.chdir(home)
    output = json.loads(invoke_uclip(["query", query, "--format", "json"], env).ok().stdout)
    assert output["kind"] == "text" and len(output["results"]) == 3


def test_text_flag_searches_for_a_word_that_names_a_folder(small_index, monkeypatch):
    import json

    from cli_helpers import invoke_uclip

    home, env = small_index
    monkeypatch.chdir(home)
    output = json.loads(invoke_uclip(["query", "photos", "--text", "--format", "json"], env).ok().stdout)
    assert output["kind"] == "text" and output["query"] == "photos"


# ------------------------------------------------------------------ 3.12 arguments checked before work

def test_version_and_h(tmp_path):
    """Issue 7, 3.12: no --version, no -h (and `uclip train --help` crashed on Rich markup in its text)."""
    from importlib import metadata

    from cli_helpers import invoke_uclip

    env = uclip_env(tmp_path)
    for flag in ("--version", "-V"):
        assert invoke_uclip([flag], env).ok().stdout.strip() == f"uclip {metadata.version('uclip-cli')}"
    commands = [["index"], ["query"], ["train"], ["export"], ["doctor"], ["forget"], ["eval", "retrieval"],
                ["eval", "classify"], ["eval"], ["check"], ["serve"], ["embed"], ["pull"], ["bundle", "pack"], []]
    for command in commands:
        shown = invoke_uclip([*command, "-h"], env).ok().stdout
        assert shown.startswith("Usage: ") and "-h, --help" in shown, command
    assert "hf://datasets/NAME/CONFIG:SPLIT:COLUMN" in " ".join(invoke_uclip(["train", "-h"], env).ok().stdout.split())


@pytest.mark.parametrize("score", ["5", "-1.5", "nan"])
def test_min_score_outside_the_cosine_range_is_refused(small_index, score):
    from cli_helpers import invoke_uclip

    _, env = small_index
    result = invoke_uclip(["query", "a cat", "--min-score", score], env)
    assert result.code == 2 and "--min-score" in result.stderr and not result.stdout


def test_threads_zero_is_refused_and_a_huge_count_answers_at_once(small_index):
    """Issue 7, 3.12 and issue 10, 5: `--threads 0` was accepted; `--threads 100000` gave no answer in 300 s."""
    from cli_helpers import invoke_uclip

    _, env = small_index
    assert "use at least 1 thread" in invoke_uclip(["query", "a cat", "--threads", "0"], env).one_line_error()
    huge = invoke_uclip(["query", "a cat", "--threads", "100000", "--format", "paths"], env).ok()
    assert "--threads 100000 is more than the" in huge.stderr and len(huge.stdout.splitlines()) == 3
    workers = invoke_uclip(["index", "--workers", "100000", "--no-progress"], env).ok()
    assert "--workers 100000 is more than the" in workers.stderr


def test_in_a_folder_the_index_does_not_hold_and_an_empty_index_say_so(small_index, tmp_path):
    from cli_helpers import invoke_uclip

    home, env = small_index
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    message = invoke_uclip(["query", "a cat", "--in", elsewhere], env).one_line_error()
    assert f"--in {elsewhere}" in message and str(home / "photos") in message
    assert len(invoke_uclip(["query", "a cat", "--in", home / "photos" / "sub", "--format", "paths"],
                            env).ok().stdout.splitlines()) == 1
    above_all = invoke_uclip(["query", "a cat", "--min-score", "0.999999"], env).ok()   # nothing scores that high
    assert above_all.stdout.strip() == "no results"

    empty_env = {**env, "UCLIP_INDEX": str(tmp_path / "empty_index")}
    invoke_uclip(["index", elsewhere, "--no-progress"], empty_env).ok()
    assert "holds no photos yet" in invoke_uclip(["query", "a cat"], empty_env).one_line_error()


def test_forgetting_a_folder_that_was_never_indexed_is_an_error_and_forgets_nothing(small_index, tmp_path):
    from cli_helpers import index_records, invoke_uclip

    home, env = small_index
    before = index_records(home / "index")
    message = invoke_uclip(["forget", home / "photos" / "sub", tmp_path / "typo"], env).one_line_error()
    assert str(tmp_path / "typo") in message and "nothing forgotten" in message
    assert index_records(home / "index") == before


def test_readme_names_the_feature_files_extract_only_writes():
    import re

    from uclip_cli.train.pipeline import EXTRACTED_FILES

    training = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    named = {m.group(1): Path(m.group(2)).name for m in re.finditer(
        r"--(english-clip|english-multi|image|foreign)-features (\S+\.npy)", training)}
    assert named == {"english-clip": EXTRACTED_FILES["english_clip"], "english-multi": EXTRACTED_FILES["english_multi"],
                     "image": EXTRACTED_FILES["image_memory"], "foreign": EXTRACTED_FILES["foreign_memory"]}


def test_eval_classify_checks_its_prompts_before_encoding_any_image(tmp_path, tiny_bundle, monkeypatch):
    from image_fixtures import jpeg_bytes, photo_like
    from uclip_cli import eval_run
    from uclip_cli.evaluate import EvaluationError
    from uclip_cli.sessions import SessionFactory

    for i, cls in enumerate(("cat", "dog")):
        (tmp_path / "images" / cls).mkdir(parents=True)
        (tmp_path / "images" / cls / "1.jpg").write_bytes(jpeg_bytes(photo_like(64, 64, seed=i)))
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("en\tcat\ta photo of a cat\ncs\tcat\tfotka kočky\ncs\tdog\tfotka psa\n", encoding="utf-8")

    def encoded(*args, **kwargs):
        raise AssertionError("images were encoded before the prompts were checked")

    monkeypatch.setattr(eval_run, "extract_image_features", encoded)
    with pytest.raises(EvaluationError, match="'en' has no prompt for class\\(es\\) dog"):
        eval_run.run_classification_eval(bundle_path=tiny_bundle, images=tmp_path / "images", prompts_file=prompts,
                                         languages=None, sessions=SessionFactory(device="cpu"), progress=False)
    with pytest.raises(EvaluationError, match="no prompts for language 'fi'"):
        eval_run.run_classification_eval(bundle_path=tiny_bundle, images=tmp_path / "images", prompts_file=prompts,
                                         languages=["fi"], sessions=SessionFactory(device="cpu"), progress=False)


# ------------------------------------------------------------------ 3.9 a damaged head file

def test_a_damaged_head_names_the_file_and_uclip_train_never_export(retrained, tmp_path):
    """Issue 7, 3.9: doctor and query advised "re-run `uclip export`", which throws the trained heads away."""
    import json

    from cli_helpers import flip_one_byte, invoke_uclip

    env, _, bundle = retrained
    flip_one_byte(bundle / "head_a.onnx")
    message = invoke_uclip(["query", "pes na pláži"], env).one_line_error()
    assert str(bundle / "head_a.onnx") in message and "uclip train" in message and "uclip export" not in message
    doctor = invoke_uclip(["doctor", "--json"], env)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert doctor.code == 1 and not checks["bundle checksums"]["ok"]
    detail = checks["bundle checksums"]["detail"]
    assert "head_a.onnx: mismatch" in detail and "uclip train" in detail and "re-run `uclip export`" not in detail


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_the_same_uclip_train_command_restores_damaged_or_missing_heads(retrained, tmp_path, damage):
    """The advice holds: the command that trained the heads, run again, writes them back (its run had
    finished, so nothing is trained again), though the bundle's head files are damaged or gone."""
    from cli_helpers import flip_one_byte, invoke_uclip
    from uclip_cli import bundle as B

    env, _, bundle = retrained
    rng = np.random.default_rng(0)
    features = {}
    for name, rows, dim in (("e_clip", 64, 24), ("e_multi", 64, 32), ("img", 64, 24), ("for", 64, 32)):
        features[name] = tmp_path / f"{name}.npy"
        np.save(features[name], rng.standard_normal((rows, dim)).astype(np.float32))
    command = ["train", "--english-clip-features", features["e_clip"], "--english-multi-features", features["e_multi"],
               "--image-features", features["img"], "--foreign-features", features["for"], "--epochs", "1",
               "--batch-size", "16", "--work-dir", tmp_path / "work", "--no-progress"]
    from uclip_cli.train.heads import load_heads

    invoke_uclip(command, env).ok()
    weights = load_heads(bundle / "heads.safetensors")[0].state_dict()
    if damage == "flip":
        flip_one_byte(bundle / "head_b.onnx")
    else:
        (bundle / "heads.safetensors").unlink()
    invoke_uclip(command, env).ok()
    B.load_bundle(bundle)   # every file matches its checksum again
    restored = load_heads(bundle / "heads.safetensors")[0].state_dict()
    assert restored.keys() == weights.keys() and all(restored[k].equal(weights[k]) for k in weights)
    assert invoke_uclip(["query", "pes na pláži", "--format", "paths"], env).ok().stdout


# ------------------------------------------------------------------ 3.10 progress lines and walk warnings

class Terminal:
    """A stream that says it is a terminal, as stderr is for a user."""

    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass


def test_a_message_during_a_live_progress_line_starts_on_its_own_line(monkeypatch):
    """Issue 7, 3.10: "elapsed 00:00uclip: interrupted ..." and "elapsed 00:00image memory: ..."."""
    from uclip_cli import cli
    from uclip_cli.progress import Progress, StageProgress

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress("indexing", 10, stream=terminal, interval=0)
    bar.advance(3)
    cli._log("uclip: interrupted (everything committed so far is kept; run the command again to resume)")
    bar.advance(1)                      # the line is drawn again, below the message
    cli._log("image memory: 2 of 10 files could not be decoded")
    bar.close()
    text = terminal.buffer.getvalue()
    assert "elapsed 00:00\nuclip: interrupted" in text and "elapsed 00:00\nimage memory:" in text
    assert text.endswith("\n") and "\n\n" not in text

    stages = Terminal()
    progress = StageProgress(stream=stages)
    from types import SimpleNamespace as Event

    progress(Event(stage="encode captions (CLIP text tower)", done=5, total=10, unit="texts"))
    progress(Event(stage="epoch", done=1, total=2, unit="epochs", info={"loss": 1.5}))
    progress.close()
    assert "\nepoch 1/2" in stages.buffer.getvalue() and "\n\n" not in stages.buffer.getvalue()


def test_training_names_each_text_tower_on_the_progress_line(tiny_bundle, tmp_path):
    from uclip_cli import bundle as B
    from uclip_cli.encoders import Encoders
    from uclip_cli.sessions import SessionFactory
    from uclip_cli.train.pipeline import FeatureExtractor

    events = []
    bundle = B.load_bundle(tiny_bundle)
    extractor = FeatureExtractor(bundle, Encoders(bundle, SessionFactory(device="cpu", threads=1)), tmp_path,
                                 events.append)
    for tower, name in ((B.TEXT_CLIP, "english_clip"), (B.TEXT_MULTILINGUAL, "english_multi"),
                        (B.TEXT_MULTILINGUAL, "foreign_multi")):
        extractor.texts(["a dog", "a cat"], tower, name)
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["encode captions (CLIP text tower)", "encode captions (multilingual tower)",
                      "encode foreign text (multilingual tower)"]


def test_walk_warnings_go_to_stderr_capped_with_a_count_and_all_into_the_report(tmp_path, tiny_bundle):
    """Issue 7, 3.10: 4,175 warning lines on stdout when `/` was indexed by mistake."""
    import json
    import os

    from cli_helpers import invoke_uclip
    from image_fixtures import jpeg_bytes, photo_like

    photos, outside = tmp_path / "photos", tmp_path / "outside"
    photos.mkdir()
    outside.mkdir()
    (photos / "a.jpg").write_bytes(jpeg_bytes(photo_like(64, 64, seed=1)))
    for i in range(15):   # links to a folder outside the indexed one: not followed, each a warning
        os.symlink(outside, photos / f"link{i:02d}")
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    result = invoke_uclip(["index", photos, "--no-progress"], env).ok()
    assert "warning: " not in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 11 and "link00" in warnings[0]
    assert warnings[-1] == f"warning: ... and 5 more, all listed in {tmp_path / 'index' / 'report.json'}"
    report = json.loads((tmp_path / "index" / "report.json").read_text(encoding="utf-8"))
    assert report["skipped"] == [] and len(report["walk_warnings"]) == 15
    assert all("not followed" in w["reason"] for w in report["walk_warnings"])


# ------------------------------------------------------------------ 3.11 doctor

def test_doctor_warnings_are_not_failures(retrained):
    """Issue 7, 3.11: exit 1 on a healthy trained bundle because of a weak-alignment warning, JSON "ok": true."""
    import json

    from cli_helpers import invoke_uclip

    env, _, _ = retrained                      # random heads: the English probe matches by chance only
    result = invoke_uclip(["doctor", "--json"], env)
    report = json.loads(result.stdout)
    assert report["warnings"] and any("probe sentences" in w for w in report["warnings"])
    assert report["ok"] is True and result.code == 0
    text = invoke_uclip(["doctor"], env)
    assert text.code == 0 and "WARNING" in text.stdout


def test_doctor_lists_only_the_providers_uclip_can_use(small_index, monkeypatch):
    import json

    import onnxruntime

    from cli_helpers import invoke_uclip
    from uclip_cli.sessions import USED_PROVIDERS

    _, env = small_index
    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["AzureExecutionProvider", *available])
    checks = [c["name"] for c in json.loads(invoke_uclip(["doctor", "--json"], env).ok().stdout)["checks"]]
    providers = [name.removeprefix("provider ") for name in checks if name.startswith("provider ")]
    assert "CPUExecutionProvider" in providers and set(providers) <= set(USED_PROVIDERS)
