"""Every ONNX Runtime session is made by a SessionFactory (issue 21): count the ones made anywhere else.

`onnxruntime.InferenceSession.__init__` is wrapped to look at the call stack of each session made while
the product's real paths run in this process: an export (its parity checks and int8 cosines), `uclip
index`, `uclip train` (the heads' parity check, the index re-projected), `uclip query` in two languages
and `uclip doctor` (its provider probe). A session counts as made by the factory when a method of
uclip_cli/sessions.py's SessionFactory is on its stack (the optimised copy it writes on first use
included); every other creation is counted, with the stack that made it, and must not exist. Each path
must have made sessions at all, so the count cannot pass for want of anything to count.
"""
from __future__ import annotations

import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort
import pytest

from cli_helpers import environment, invoke_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from uclip_cli import bundle as B
from uclip_cli import sessions as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny models: one thread is fastest on shared cores

SESSIONS_FILE = Path(S.__file__).resolve()


def _made_by_the_factory(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_qualname.startswith("SessionFactory.") and Path(code.co_filename).resolve() == SESSIONS_FILE:
            return True
        frame = frame.f_back
    return False


@dataclass
class Creations:
    """The sessions made while recording, by phase: what each loaded, and the stacks of those made outside."""

    phase: str = ""
    inside: Counter = field(default_factory=Counter)     # (phase, graph file name or "<bytes>") -> sessions
    outside: list[str] = field(default_factory=list)     # "phase: graph\n<stack>"

    def record(self, frame, source) -> None:
        graph = Path(source).name if isinstance(source, (str, Path)) else "<bytes>"
        if _made_by_the_factory(frame):
            self.inside[(self.phase, graph)] += 1
        else:
            stack = "".join(traceback.format_stack(frame)[-6:])
            self.outside.append(f"{self.phase}: {graph}\n{stack}")

    def count(self, phase: str) -> int:
        return sum(n for (p, _), n in self.inside.items() if p == phase)

    def graphs(self, phase: str) -> set[str]:
        return {graph for (p, graph), n in self.inside.items() if p == phase and n}


@pytest.fixture
def creations(monkeypatch) -> Creations:
    seen = Creations()
    real_init = ort.InferenceSession.__init__

    def recording_init(self, path_or_bytes, *args, **kwargs):
        seen.record(sys._getframe(1), path_or_bytes)
        real_init(self, path_or_bytes, *args, **kwargs)

    monkeypatch.setattr(ort.InferenceSession, "__init__", recording_init)
    return seen


def test_a_session_made_outside_the_factory_is_counted(creations, tiny_bundle, tmp_path, monkeypatch):
    """The counter itself: a raw session is caught with its stack, a factory's is not."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    creations.phase = "raw"
    ort.InferenceSession(str(tiny_bundle / B.TEXT_CLIP), providers=[S.CPU])
    creations.phase = "factory"
    S.SessionFactory(device="cpu", threads=1).create(tiny_bundle / B.TEXT_CLIP)
    assert len(creations.outside) == 1 and creations.outside[0].startswith(f"raw: {B.TEXT_CLIP}")
    assert "test_session_origin.py" in creations.outside[0]
    assert creations.graphs("factory") == {B.TEXT_CLIP, "model.onnx"}   # the graph, and its optimised copy written


def _captions(home: Path) -> tuple[Path, Path]:
    things = ["dog", "cat", "car", "boat", "house", "bird"]
    places = ["on a beach", "in a park", "near a lake", "in the city"]
    colours = ["red", "blue", "green", "white", "black"]
    english = [f"{c} {t} {p}" for c in colours for t in things for p in places]
    foreign = [f"{c} {t} {p}" for c in ("červený", "modrý", "zelený") for t in ("pes", "kočka", "auto", "loď")
               for p in ("na pláži", "v parku")]
    (home / "en.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    (home / "foreign.txt").write_text("\n".join(foreign) + "\n", encoding="utf-8")
    return home / "en.txt", home / "foreign.txt"


def test_every_session_of_export_index_train_and_query_is_made_by_a_factory(creations, tiny_checkpoints, tmp_path):
    from uclip_cli.export import export_bundle

    home = tmp_path
    photos = home / "photos"
    photos.mkdir()
    for i in range(12):
        (photos / f"img_{i:02d}.jpg").write_bytes(jpeg_bytes(photo_like(72 + i, 64, seed=i)))
    captions, foreign = _captions(home)
    bundle, index = home / "bundle", home / "index"
    env = uclip_env(home, bundle=bundle, index=index)

    with environment(env):
        creations.phase = "export"
        export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), bundle, quantize="int8",
                      log=lambda _: None)
    creations.phase = "index"
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    creations.phase = "train"
    invoke_uclip(["train", "--captions", captions, "--foreign", foreign, "--images", photos, "--no-progress"], env).ok()
    creations.phase = "query"
    for text in ("a red dog on a beach", "modrý pes v parku"):
        invoke_uclip(["query", text, "-f", "json"], env).ok()
    creations.phase = "doctor"
    invoke_uclip(["doctor", "--json"], env).ok()

    assert creations.outside == [], (f"{len(creations.outside)} ONNX Runtime session(s) made outside a "
                                     "SessionFactory:\n\n" + "\n".join(creations.outside))
    # each path made the sessions it needs, through a factory: the zero above is not a count of nothing
    assert creations.graphs("export") == {B.IMAGE_ENCODER, B.TEXT_CLIP, B.TEXT_MULTILINGUAL,       # parity
                                          f"{B.TEXT_MULTILINGUAL}.fused",                         # fused kernels' parity
                                          f"{B.TEXT_CLIP}.int8", f"{B.TEXT_MULTILINGUAL}.int8"}   # int8 cosines
    assert B.IMAGE_ENCODER in creations.graphs("index")
    assert {B.HEAD_A, B.HEAD_B} <= creations.graphs("train")      # the new heads' parity check, then the re-projection
    assert creations.count("query") >= 2            # a text tower and Head_A (cached copies load as model.onnx)
    assert "<bytes>" in creations.graphs("doctor") and creations.count("doctor") >= 3   # the probe, then two graphs
    assert B.load_bundle(bundle).has_heads
