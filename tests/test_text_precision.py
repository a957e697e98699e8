"""The text tower's precision chosen per CPU (issue 22, item 2; uclip_cli/text_precision.py).

A bundle exported with `--quantize int8-beside` carries each text tower in float32 and int8; queries
(`uclip query`, `uclip serve`) run whichever was faster on this machine, measured once with the caller's
session factory, remembered in the cache folder, forced by $UCLIP_TEXT_PRECISION, shown by `uclip doctor`;
indexing and training keep float32. Here on the tiny test bundle (the mechanism); that the int8 tower of a
real-weights model ranks as the float32 one does is checked in tests/test_real_e2e.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from cli_helpers import environment, invoke_uclip, uclip_env
from image_fixtures import make_photo_folder
from serve_helpers import bundle_with_heads

from uclip_cli import bundle as B
from uclip_cli import text_precision as T
from uclip_cli.encoders import Encoders
from uclip_cli.export import export_bundle
from uclip_cli.sessions import SessionFactory

INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}


class Recording(SessionFactory):
    """Remembers the file of every bundle graph it opens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened: list[str] = []

    def create(self, path, expect=None):
        self.opened.append(Path(path).name)
        return super().create(path, expect)


@pytest.fixture(scope="module")
def beside(tiny_checkpoints, tmp_path_factory) -> Path:
    from conftest import single_torch_thread

    out = tmp_path_factory.mktemp("beside") / "bundle"
    with single_torch_thread():
        return export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), out,
                             quantize="int8-beside", log=lambda _: None)   # verified, as tiny_bundle: the same graphs


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No choice known in this process or in the (temporary) cache folder; nothing forced."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(T.PRECISION_ENV, raising=False)
    monkeypatch.setattr(T, "_CHOSEN", {})
    return tmp_path / "cache" / "uclip" / T.CHOICES_FILE


def test_int8_beside_keeps_the_float32_towers_and_adds_int8_twins(beside, tiny_bundle):
    bundle, fp32 = B.load_bundle(beside), B.load_bundle(tiny_bundle)
    for tower, twin in B.INT8_TWINS.items():
        assert bundle.files[tower] == fp32.files[tower]              # the float32 tower, byte for byte
        assert bundle.int8_twin(tower) == twin and twin not in fp32.files
        assert {n.op_type for n in onnx.load(str(bundle.file(twin))).graph.node} & INT8_OPS
        assert "Attention" not in {n.op_type for n in onnx.load(str(bundle.file(twin))).graph.node}   # from the unfused graph
        assert not {n.op_type for n in onnx.load(str(bundle.file(tower))).graph.node} & INT8_OPS
        recorded = bundle.manifest["export"]["quantization"]["files"][tower]
        assert recorded["file"] == twin and 0.9 < recorded["min_cosine"] <= 1.0
    assert bundle.manifest["export"]["quantization"]["mode"] == "int8-beside"
    assert fp32.int8_twin(B.TEXT_MULTILINGUAL) is None


def test_the_faster_precision_is_measured_once_remembered_and_forceable(beside, fresh, monkeypatch):
    bundle, sessions = B.load_bundle(beside), SessionFactory(device="cpu", threads=1)
    calls: list[int] = []

    def measure():
        calls.append(1)
        return {"fp32": 0.030, "int8": 0.012}

    choice = T.text_tower_choice(bundle, B.TEXT_MULTILINGUAL, sessions, measure)
    assert (choice.precision, choice.file, choice.why) == ("int8", B.TEXT_MULTILINGUAL_INT8, "measured now")
    assert T.text_tower_choice(bundle, B.TEXT_MULTILINGUAL, sessions, measure) == choice and calls == [1]
    monkeypatch.setattr(T, "_CHOSEN", {})                         # a new process: read from the cache folder
    again = T.text_tower_choice(bundle, B.TEXT_MULTILINGUAL, sessions, lambda: pytest.fail("measured again"))
    assert again.precision == "int8" and again.seconds == {"fp32": 0.03, "int8": 0.012}
    (key, remembered), = json.loads(fresh.read_text()).items()
    assert key == T.machine_key(bundle, B.TEXT_MULTILINGUAL, sessions)
    assert "ort " in key and "threads 1" in key and bundle.files[B.TEXT_MULTILINGUAL_INT8][:16] in key
    assert remembered == {"precision": "int8", "seconds": {"fp32": 0.03, "int8": 0.012}}
    # another thread count is another measurement; on an AVX2-like result float32 wins
    two = SessionFactory(device="cpu", threads=2)
    assert T.text_tower_choice(bundle, B.TEXT_MULTILINGUAL, two, lambda: {"fp32": 0.02, "int8": 0.02}).precision == "fp32"
    monkeypatch.setenv(T.PRECISION_ENV, "fp32")
    forced = T.text_tower_choice(bundle, B.TEXT_MULTILINGUAL, sessions, lambda: pytest.fail("forced"))
    assert (forced.precision, forced.file) == ("fp32", B.TEXT_MULTILINGUAL)


def test_a_bundle_without_a_twin_runs_float32_without_measuring(tiny_bundle, fresh):
    choice = T.text_tower_choice(B.load_bundle(tiny_bundle), B.TEXT_MULTILINGUAL, SessionFactory(device="cpu", threads=1),
                                 lambda: pytest.fail("nothing to measure"))
    assert (choice.precision, choice.file) == ("fp32", B.TEXT_MULTILINGUAL) and not fresh.exists()


def test_choose_prefers_float32_on_a_tie_and_never_a_graph_that_did_not_run():
    assert T.choose({"fp32": 0.02, "int8": 0.01}) == "int8"
    assert T.choose({"fp32": 0.02, "int8": 0.02}) == "fp32"
    assert T.choose({"fp32": 0.02, "int8": float("inf")}) == "fp32"
    assert T.choose({"fp32": float("inf"), "int8": 0.05}) == "int8"


def test_the_measurement_runs_both_graphs_through_the_callers_factory(beside, fresh):
    bundle = B.load_bundle(beside)
    for tower in B.INT8_TWINS:
        sessions = Recording(device="cpu", threads=1)
        seconds = T.calibrate(bundle, tower, sessions)
        assert set(seconds) == {"fp32", "int8"} and all(0 < s < 10 for s in seconds.values())
        assert sorted(sessions.opened) == sorted([tower, B.INT8_TWINS[tower]])


def test_queries_run_the_chosen_file_and_indexing_keeps_float32(beside, fresh, monkeypatch):
    bundle = B.load_bundle(beside)
    texts = ["a dog on a beach", "zwei Katzen auf einem roten Sofa"]
    vectors = {}
    for precision in ("fp32", "int8"):
        monkeypatch.setenv(T.PRECISION_ENV, precision)
        sessions = Recording(device="cpu", threads=1)
        encoders = Encoders(bundle, sessions, text_precision="auto")
        vectors[precision] = encoders.encode_text_query(texts)      # untrained: the CLIP text tower answers
        assert sessions.opened == [B.TEXT_CLIP if precision == "fp32" else B.TEXT_CLIP_INT8]
        assert encoders.text_choices[B.TEXT_CLIP].precision == precision
        default = Recording(device="cpu", threads=1)
        Encoders(bundle, default).clip_text_features(texts)          # index, train, eval: float32 whatever is chosen
        assert default.opened == [B.TEXT_CLIP]
    explicit = Encoders(bundle, SessionFactory(device="cpu", threads=1), text_precision="int8")
    np.testing.assert_array_equal(explicit.encode_text_query(texts), vectors["int8"])
    assert not np.array_equal(vectors["int8"], vectors["fp32"])     # the twin really is another graph
    cosines = np.sum(vectors["int8"] * vectors["fp32"], axis=1)
    recorded = bundle.manifest["export"]["quantization"]["files"][B.TEXT_CLIP]["min_cosine"]
    assert cosines.min() > min(0.9, recorded - 0.05)


def test_uclip_query_measures_once_and_doctor_shows_the_choice(beside, tmp_path):
    home = tmp_path / "home"
    photos = home / "photos"
    make_photo_folder(photos)
    env = uclip_env(home, bundle=beside, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    choices = home / "cache" / "uclip" / T.CHOICES_FILE
    assert not choices.exists()                                     # indexing runs float32, measures nothing
    with environment(env):
        T._CHOSEN.clear()
        first = json.loads(invoke_uclip(["query", "a red car", "--format", "json"], env).ok().stdout)
        (key, remembered), = json.loads(choices.read_text()).items()
        assert B.TEXT_CLIP in key and remembered["precision"] in T.PRECISIONS
        assert set(remembered["seconds"]) == {"fp32", "int8"}
        T._CHOSEN.clear()
        again = json.loads(invoke_uclip(["query", "a red car", "--format", "json"], env).ok().stdout)
        assert json.loads(choices.read_text()) == {key: remembered}  # read back, not measured again
        assert [r["path"] for r in again["results"]] == [r["path"] for r in first["results"]]
        doctor = invoke_uclip(["doctor", "--bundle", str(beside)], env).ok().stdout
    line = next(line for line in doctor.splitlines() if "text tower precision" in line)
    assert f"{B.TEXT_CLIP} in {remembered['precision']} (measured on this machine earlier" in line
    assert "UCLIP_TEXT_PRECISION" in line


def test_doctor_says_how_to_get_a_twin_when_the_bundle_has_none(tiny_bundle, tmp_path):
    env = uclip_env(tmp_path)
    with environment(env):
        doctor = invoke_uclip(["doctor", "--bundle", str(tiny_bundle)], env).ok().stdout
    line = next(line for line in doctor.splitlines() if "text tower precision" in line)
    assert "fp32 (the bundle has no int8 twin" in line and "--quantize int8-beside" in line


def test_the_server_encodes_with_the_chosen_twin(beside, tmp_path, monkeypatch):
    pytest.importorskip("starlette")
    from serve_helpers import served

    home = tmp_path / "home"
    photos = home / "photos"
    make_photo_folder(photos)
    bundle = bundle_with_heads(beside, home / "bundle")
    assert B.load_bundle(bundle).int8_twin(B.TEXT_MULTILINGUAL) == B.TEXT_MULTILINGUAL_INT8   # kept by training
    env = uclip_env(home, bundle=bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    answers = {}
    for precision in T.PRECISIONS:
        env[T.PRECISION_ENV] = precision
        with environment(env), served(home / "index", bundle, home / "thumbs") as (client, library, _):
            with library.use() as state:
                assert state.heads.encoders.text_choices[B.TEXT_MULTILINGUAL].precision == precision
            answer = client.get("/api/search", params={"q": "dvě kočky na pohovce", "top": 50})
            assert answer.status_code == 200, answer.text
            answers[precision] = answer.json()["results"]
    assert len(answers["int8"]) == len(answers["fp32"]) > 0
    shutil.rmtree(home)
