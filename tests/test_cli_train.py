"""Text files + an image memory -> `uclip train` -> heads in the bundle, the index re-projected ->
`uclip query` in another language; `uclip eval` on the result; bad training inputs refused up front;
the three commands from install to multilingual results; runs, batch and threads as a user meets them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cli_helpers import copy_bundle, index_vectors, invoke_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from rounding import assert_float32_run_of, exact_inputs
from uclip_cli import bundle as B
from uclip_cli.train.heads import load_heads

BATCH = ["--batch-size", "16", "--epochs", "2", "--refine", "--no-progress"]   # the contrastive trainer runs


@dataclass(frozen=True)
class Trained:
    home: Path
    env: dict
    bundle: Path
    photos: Path
    index: Path
    before: dict            # manifest before training
    train_log: str          # `uclip train` stderr
    index_output: str       # `uclip index` output after training


COLOURS = {"en": ["red", "blue", "green", "white", "black"], "cs": ["červený", "modrý", "zelený", "bílý", "černý"],
           "fi": ["punainen", "sininen", "vihreä", "valkoinen", "musta"]}
THINGS = {"en": ["dog", "cat", "car", "boat", "house", "bird"], "cs": ["pes", "kočka", "auto", "loď", "dům", "pták"],
          "fi": ["koira", "kissa", "auto", "vene", "talo", "lintu"]}
PLACES = {"en": ["on a beach", "in a park", "near a lake", "in the city"], "cs": ["na pláži", "v parku", "u jezera", "ve městě"],
          "fi": ["rannalla", "puistossa", "järven lähellä", "kaupungissa"]}


def sentences(lang: str) -> list[str]:
    """Simple captions in one language (every colour x thing x place), independent of any data set."""
    return [f"{c} {t} {p}" for c in COLOURS[lang] for t in THINGS[lang] for p in PLACES[lang]]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bundle) -> Trained:
    home = tmp_path_factory.mktemp("train_home")
    bundle = copy_bundle(tiny_bundle, home / "bundle")
    photos = home / "photos"
    (photos / "nested").mkdir(parents=True)
    for i in range(40):
        folder = photos / "nested" if i % 3 else photos
        (folder / f"img_{i:02d}.jpg").write_bytes(jpeg_bytes(photo_like(96 + i, 80, seed=i)))
    english = sentences("en")                                   # 120 captions
    foreign = sentences("cs")[60:] + sentences("fi")[:60]       # other meanings than most anchors
    captions = _write_lines(home / "en.txt", english)
    foreign_file = _write_lines(home / "foreign.txt", foreign)
    env = uclip_env(home, bundle=bundle, index=home / "index")
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    before = json.loads((bundle / B.MANIFEST).read_text(encoding="utf-8"))
    trained = invoke_uclip(["train", "--captions", captions, "--foreign", foreign_file, "--images", photos, *BATCH], env).ok()
    output = invoke_uclip(["index", photos, "--no-progress"], env).ok().stdout
    return Trained(home, env, bundle, photos, home / "index", before, trained.stderr, output)


def test_training_writes_verified_heads_into_the_bundle(trained):
    bundle = B.load_bundle(trained.bundle)
    assert bundle.has_heads
    assert bundle.dims["shared"] == 512
    training = bundle.manifest["training"]
    assert training["config"]["epochs"] == 2 and training["config"]["batch_size"] == 16
    assert [e["epoch"] for e in training["evaluations"]] == [1, 2]       # 114 training captions: 7 steps an epoch
    assert [e["step"] for e in training["evaluations"]] == [7, 14] and training["steps"] == 14
    assert training["stop_reason"] == "finished the 2-epoch schedule (14 steps), as --epochs asked"
    assert training["inputs"]["image_memory"] == [str(trained.photos)]
    assert set(training["foreign_languages"]) == {"foreign.txt"} and training["trained_at"].endswith("Z")
    assert training["feature_sources"] == {"english": "bundle", "image_memory": "bundle", "foreign_memory": "bundle"}
    assert training["encoders"][B.TEXT_MULTILINGUAL] == bundle.files[B.TEXT_MULTILINGUAL]
    assert bundle.manifest["files"][B.IMAGE_ENCODER] == trained.before["files"][B.IMAGE_ENCODER]


def test_training_reprojects_the_index_with_the_new_head_b(trained):
    assert f"re-projected the 40 stored vectors of the index {trained.index} with the new heads" in trained.train_log
    assert trained.index_output.startswith("nothing new to index: 40 files up to date")   # nothing left to do
    heads, _ = load_heads(trained.bundle / B.HEADS_WEIGHTS)
    features = index_vectors(trained.index, "features")
    vectors = index_vectors(trained.index, "vectors")
    paths = sorted(features)
    assert_float32_run_of(np.stack([vectors[p] for p in paths]), heads.eval().head_b.double(),
                          exact_inputs(np.stack([features[p] for p in paths])), what="re-projected vectors")


def test_query_in_another_language_uses_head_a(trained):
    out = json.loads(invoke_uclip(["query", "pes na pláži", "--format", "json", "--top", "5"], trained.env).ok().stdout)
    assert out["space"] == "shared" and out["kind"] == "text"
    assert len(out["results"]) == 5
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_doctor_confirms_the_heads_belong_to_these_encoders(trained):
    result = invoke_uclip(["doctor", "--json"], trained.env)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["heads trained on these encoders"]["ok"]
    other = copy_bundle(trained.bundle, trained.home / "other_bundle")
    manifest = json.loads((other / B.MANIFEST).read_text(encoding="utf-8"))
    manifest["training"]["encoders"][B.TEXT_MULTILINGUAL] = "0" * 64
    (other / B.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    result = invoke_uclip(["doctor", "--json", "--bundle", other], trained.env)
    assert result.code == 1
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert not checks["heads trained on these encoders"]["ok"]
    assert B.TEXT_MULTILINGUAL in checks["heads trained on these encoders"]["detail"]


def test_eval_retrieval_reports_recall_and_missing_images(trained, tmp_path):
    names = sorted(p.relative_to(trained.photos).as_posix() for p in trained.photos.rglob("*.jpg"))
    en, cs = sentences("en")[:len(names)], sentences("cs")[:len(names)]
    records = [{"image": n, "captions": {"en": e, "cs": c}} for n, e, c in zip(names, en, cs)]
    records.append({"image": "not_here.jpg", "captions": {"en": "gone", "cs": "pryč"}})
    captions = _write_lines(tmp_path / "captions.jsonl", [json.dumps(r, ensure_ascii=False) for r in records])
    args = ["eval", "retrieval", "--captions", captions, "-l", "en,cs", "--no-progress"]
    first = json.loads(invoke_uclip([*args, "--images", trained.photos, "--save-features", tmp_path / "f.npz",
                                     "--format", "json"], trained.env).ok().stdout)
    again = json.loads(invoke_uclip([*args, "--features", tmp_path / "f.npz", "--format", "json"], trained.env).ok().stdout)
    assert first["missing_images"] == ["not_here.jpg"]
    for report in (first, again):
        assert set(report["languages"]) == {"en", "cs"}
        assert report["languages"]["cs"]["n"] == 40
        for direction in ("t2i", "i2t"):
            r = report["languages"]["cs"][direction]
            assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
    assert again["languages"] == first["languages"]      # features alone give the same figures


def test_eval_classify_prints_a_table(trained, tmp_path):
    for cls, seeds in (("cat", range(0, 4)), ("dog", range(4, 8))):
        (tmp_path / "classes" / cls).mkdir(parents=True)
        for s in seeds:
            (tmp_path / "classes" / cls / f"{s}.jpg").write_bytes(jpeg_bytes(photo_like(64, 64, seed=s)))
    prompts = _write_lines(tmp_path / "prompts.tsv", ["cs\tcat\tFotka kočky", "cs\tdog\tFotka psa",
                                                      "fi\tcat\tKuva kissasta", "fi\tdog\tKuva koirasta"])
    out = invoke_uclip(["eval", "classify", "--images", tmp_path / "classes", "--prompts", prompts, "--no-progress"],
                       trained.env).ok().stdout
    lines = out.splitlines()
    assert lines[0].split() == ["lang", "n", "accuracy", "macro-F1"]
    assert [line.split()[0] for line in lines[2:]] == ["cs", "fi", "average"]


@pytest.mark.parametrize("case", ["empty captions", "wrong feature width", "batch larger than the captions", "nan features",
                                  "unknown adaptation"])
def test_bad_training_input_is_refused_before_training_and_leaves_the_bundle_alone(trained, tmp_path, case):
    bundle = copy_bundle(trained.bundle, tmp_path / "bundle")
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    d_clip, d_multi = B.load_bundle(bundle).dims["clip"], B.load_bundle(bundle).dims["multilingual"]
    rng = np.random.default_rng(0)

    def features(name: str, rows: int, dim: int) -> Path:
        path = tmp_path / name
        np.save(path, rng.standard_normal((rows, dim)).astype(np.float32))
        return path

    english = ["--english-clip-features", features("e_clip.npy", 64, d_clip),
               "--english-multi-features", features("e_multi.npy", 64, d_multi)]
    memories = ["--image-features", features("img.npy", 64, d_clip), "--foreign-features", features("for.npy", 64, d_multi)]
    if case == "empty captions":
        args = ["--captions", _write_lines(tmp_path / "empty.txt", [""]), *memories]
        expected = "empty.txt"
    elif case == "wrong feature width":
        args = [*english, "--image-features", features("bad.npy", 64, d_clip + 1), "--foreign-features", tmp_path / "for.npy"]
        expected = "bad.npy"
    elif case == "batch larger than the captions":
        args = [*english, "--image-features", tmp_path / "img.npy", "--foreign-features", tmp_path / "for.npy",
                "--batch-size", "100"]
        expected = "--batch-size 100 is more than the 61 training captions"
    elif case == "unknown adaptation":
        args = [*english, *memories, "--adapt-head-b", "wishful"]
        expected = "adapt_head_b='wishful' must be one of mean, coral, coral-input, self-learning"
    else:
        bad = rng.standard_normal((64, d_multi)).astype(np.float32)
        bad[7, 3] = np.nan
        np.save(tmp_path / "nan.npy", bad)
        args = [*english, "--image-features", tmp_path / "img.npy", "--foreign-features", tmp_path / "nan.npy"]
        expected = "nan.npy"
    batch = BATCH if "--batch-size" not in args else BATCH[2:]
    result = invoke_uclip(["train", "--bundle", bundle, "--work-dir", tmp_path / "work", *args, *batch], trained.env)
    message = result.one_line_error()
    assert expected in message
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == before


def test_features_extracted_once_then_trained_on_elsewhere(trained, tmp_path):
    work = tmp_path / "features"
    args = ["--captions", trained.home / "en.txt", "--foreign", trained.home / "foreign.txt", "--images", trained.photos]
    out = invoke_uclip(["train", *args, "--extract-only", "--work-dir", work, "--no-progress"], trained.env).ok().stdout
    files = dict(line.split(": ", 1) for line in out.splitlines() if line.endswith(".npy"))
    shapes = {k: np.load(v, mmap_mode="r").shape for k, v in files.items()}
    dims = B.load_bundle(trained.bundle).dims
    assert shapes == {"english_clip": (120, dims["clip"]), "english_multi": (120, dims["multilingual"]),
                      "image_memory": (40, dims["clip"]), "foreign_memory": (120, dims["multilingual"])}
    bundle = copy_bundle(trained.bundle, tmp_path / "bundle")
    invoke_uclip(["train", "--bundle", bundle, "--work-dir", tmp_path / "train",
                  "--english-clip-features", files["english_clip"], "--english-multi-features", files["english_multi"],
                  "--image-features", files["image_memory"], "--foreign-features", files["foreign_memory"], *BATCH],
                 trained.env).ok()
    training = B.load_bundle(bundle).manifest["training"]
    assert training["feature_sources"] == {"english": "files", "image_memory": "files", "foreign_memory": "files"}
    assert training["sizes"]["image_memory"] == 40


# ---------------------------------------------------------------- issue 8: training that needs only text

def _npy_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.npy*")) if folder.exists() else []


def test_three_commands_from_install_to_multilingual_results(tiny_checkpoints, tiny_bundle, tmp_path):
    """Issue 8, done when: export (or pull), train from text, query. The user's photos are already indexed
    (with a bundle of the same image encoder); nothing names a bundle, an index or an image folder."""
    env = uclip_env(tmp_path)                                  # default bundle and index locations
    data = tmp_path / "data" / "uclip"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        (photos / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(photo_like(80 + i, 72, seed=100 + i)))
    copy_bundle(tiny_bundle, data / "bundle")                  # an earlier bundle, the one the index was built with
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    en = _write_lines(tmp_path / "en.txt", sentences("en"))
    cs = _write_lines(tmp_path / "ceske_vety.txt", sentences("cs")[40:])

    # 1. a bundle (here exported from local checkpoints: no network)
    invoke_uclip(["export", "--clip", tiny_checkpoints.clip, "--multilingual", tiny_checkpoints.multilingual,
                  "--out", data / "bundle"], env).ok()
    # 2. train from text alone
    trained = invoke_uclip(["train", "--captions", en, "--foreign", f"cs={cs}", "--max-steps", "30", "--no-progress"], env).ok()
    # 3. query in another language
    out = json.loads(invoke_uclip(["query", "pes na pláži", "--format", "json", "--top", "3"], env).ok().stdout)

    assert out["space"] == "shared" and len(out["results"]) == 3
    log = trained.stderr
    assert f"image memory: 24 frozen image features from the index {data / 'index'} (no image decoded)" in log
    assert "foreign memory: 80 rows: cs 80" in log
    assert "batch 24 instead of 512: only 24 image memory rows (pass --batch-size to choose)" in log
    assert f"re-projected the 24 stored vectors of the index {data / 'index'} with the new heads" in log
    training = B.load_bundle(data / "bundle").manifest["training"]
    assert training["feature_sources"]["image_memory"] == "index" and training["foreign_languages"] == {"cs": 80}
    assert training["config"]["epochs"] is None and training["steps"] <= 30
    assert "stopped:" in trained.stdout and training["stop_reason"] in trained.stdout


def test_an_index_of_another_image_encoder_is_refused_before_encoding(trained, tmp_path):
    from cli_helpers import bundle_with_other_image_encoder

    other = bundle_with_other_image_encoder(trained.bundle, tmp_path / "other")
    result = invoke_uclip(["train", "--bundle", other, "--work-dir", tmp_path / "work", "--captions", trained.home / "en.txt",
                           "--foreign", trained.home / "foreign.txt", "--no-progress"], trained.env)
    message = result.one_line_error()
    assert f"index {trained.index} holds features of another image encoder" in message
    assert "--images DIR" in message and "--image-features FILE" in message
    assert _npy_files(tmp_path / "work") == []                 # nothing was encoded


def test_small_inputs_adapt_the_batch_and_an_explicit_batch_that_cannot_fit_is_refused_before_encoding(trained, tmp_path):
    """Issue 7 item 3.3: sizes are checked before any encoding; small memories get a batch that fits."""
    args = ["--captions", trained.home / "en.txt", "--foreign", trained.home / "foreign.txt", "--no-progress"]
    too_big = invoke_uclip(["train", "--bundle", copy_bundle(trained.bundle, tmp_path / "b1"), "--work-dir",
                            tmp_path / "w1", *args, "--batch-size", "200"], trained.env)
    assert too_big.one_line_error() == ("--batch-size 200 is more than the 114 training captions (120 minus 6 held out): "
                                        "lower --batch-size to at most 114, or leave it out to let it adapt")
    assert _npy_files(tmp_path / "w1") == []
    adapted = invoke_uclip(["train", "--bundle", copy_bundle(trained.bundle, tmp_path / "b2"), "--work-dir",
                            tmp_path / "w2", *args, "--epochs", "1"], trained.env).ok()
    assert "batch 40 instead of 512: only 40 image memory rows (pass --batch-size to choose)" in adapted.stderr
    assert B.load_bundle(tmp_path / "b2").manifest["training"]["config"]["batch_size"] == 40


def test_training_again_with_other_settings_starts_a_new_run_and_says_so(trained, tmp_path):
    """Issue 7 item 3.2: a second `uclip train` with other epochs was refused; now it starts a new run."""
    bundle, work = copy_bundle(trained.bundle, tmp_path / "bundle"), tmp_path / "work"
    args = ["train", "--bundle", bundle, "--work-dir", work, "--captions", trained.home / "en.txt",
            "--foreign", trained.home / "foreign.txt", "--batch-size", "16", "--refine", "--no-progress"]
    first = invoke_uclip([*args, "--epochs", "1"], trained.env).ok()
    first_heads = (bundle / B.HEADS_WEIGHTS).read_bytes()
    first_run, first_fingerprint = B.load_bundle(bundle).manifest["training"]["run"], B.load_bundle(bundle).heads_fingerprint
    assert f"starting run {first_run}" in first.stderr
    second = invoke_uclip([*args, "--epochs", "2"], trained.env).ok()
    second_run = B.load_bundle(bundle).manifest["training"]["run"]
    assert (f"settings changed (epochs 1 -> 2): starting a new run {second_run} "
            f"(run {first_run} stays in {work / 'runs' / first_run})") in second.stderr
    kept = work / "previous-heads" / first_fingerprint[:16]       # (the fixture's heads were kept the same way)
    assert (kept / B.HEADS_WEIGHTS).read_bytes() == first_heads
    assert f"run {first_run}); a copy of them is kept in {kept}" in second.stderr
    again = invoke_uclip([*args, "--epochs", "2"], trained.env).ok()
    assert f"run {second_run} had finished at step 14: nothing to train, its heads are used" in again.stderr
    assert again.stdout.splitlines() == [f"nothing changed: the bundle already holds the heads of run {second_run}, "
                                         "trained with the same settings and inputs (change either to train again)"]
    assert "holds the heads" not in again.stderr and "replacing the bundle's heads" not in again.stderr


def test_the_same_closed_form_command_again_says_once_that_nothing_changed(trained, tmp_path):
    """Issue 21: a re-run printed 'starting run', then 'heads ... written into' the bundle it did not write."""
    bundle = copy_bundle(trained.bundle, tmp_path / "bundle")
    args = ["train", "--bundle", bundle, "--work-dir", tmp_path / "work", "--captions", trained.home / "en.txt",
            "--foreign", trained.home / "foreign.txt", "--no-progress"]
    first = invoke_uclip(args, trained.env).ok()
    run, manifest = B.load_bundle(bundle).manifest["training"]["run"], (bundle / B.MANIFEST).read_bytes()
    assert f"starting run {run}" in first.stderr and first.stdout.startswith("heads fitted in closed form")
    again = invoke_uclip(args, trained.env).ok()
    assert again.stdout.splitlines() == [f"nothing changed: the bundle already holds the heads of run {run}, "
                                         "trained with the same settings and inputs (change either to train again)"]
    assert f"run {run} again (same settings and inputs)" in again.stderr and "starting run" not in again.stderr
    assert "replacing the bundle's heads" not in again.stderr and "re-projected" not in again.stderr
    assert (bundle / B.MANIFEST).read_bytes() == manifest


def test_threads_govern_torch_and_the_onnx_sessions(trained, tmp_path, monkeypatch):
    """Issue 7 item 3.5: training ran torch at its default thread count; now --threads (default: physical
    cores, never more than the machine has) sets torch and the feature-extraction sessions alike."""
    import torch

    import uclip_cli.threads as threads_module
    import uclip_cli.train.pipeline as pipeline_module
    from uclip_cli.sessions import SessionFactory

    seen: dict[str, list] = {"torch": [], "sessions": []}
    real_train, real_create = pipeline_module.train_heads, SessionFactory.create

    def spy_train(*a, **k):
        seen["torch"].append(torch.get_num_threads())
        return real_train(*a, **k)

    def spy_create(self, path, *a, **k):
        seen["sessions"].append(self.threads)
        return real_create(self, path, *a, **k)

    monkeypatch.setattr(pipeline_module, "train_heads", spy_train)
    monkeypatch.setattr(SessionFactory, "create", spy_create)
    monkeypatch.setattr(threads_module, "physical_cores", lambda cpus: 1)
    env = {k: v for k, v in trained.env.items() if k != "UCLIP_THREADS"}
    args = ["train", "--bundle", copy_bundle(trained.bundle, tmp_path / "bundle"), "--captions", trained.home / "en.txt",
            "--foreign", trained.home / "foreign.txt", "--epochs", "1", "--no-progress"]
    before = torch.get_num_threads()
    torch.set_num_threads(3)            # what torch would start with on a bigger machine
    try:
        result = invoke_uclip([*args, "--work-dir", tmp_path / "w1"], env).ok()
        assert torch.get_num_threads() == 3                    # restored for the library caller
    finally:
        torch.set_num_threads(before)
    assert seen["torch"] == [1] and set(seen["sessions"]) == {1}
    assert "torch and ONNX Runtime on 1 threads" in result.stderr
    many = invoke_uclip([*args, "--work-dir", tmp_path / "w2", "--threads", "512"], env).ok()
    available = threads_module.available_threads()
    assert f"note: --threads 512 is more than the {available} CPUs this process may use: using {available}" in many.stderr
    assert seen["torch"][-1] == available
    assert invoke_uclip([*args, "--threads", "0"], env).one_line_error().startswith("--threads 0: use at least 1 thread")


def test_recipes_are_listed_and_an_unknown_one_is_named(trained):
    listed = invoke_uclip(["train", "--list-recipes"], trained.env).ok().stdout
    assert "cs-fi-hr-hu-ro" in listed and "checked against dataset cards only" in listed
    assert invoke_uclip(["train", "--recipe", "klingon"], trained.env).one_line_error().startswith(
        "--recipe 'klingon': no such recipe (known: ")


def test_train_help_describes_sources_schedule_and_batch(trained):
    out = invoke_uclip(["train", "--help"], trained.env).ok().stdout
    for words in ("hf://datasets/NAME/CONFIG:SPLIT:COLUMN", "held-out loss", "--epochs", "adapts to small inputs",
                  "refused before anything", "--min-steps", "--max-rows", "--recipe", "--threads"):
        assert words in " ".join(out.split()), words


def test_the_default_keeps_the_closed_form_start_with_a_kernel_head_b_and_both_subspaces(trained, tmp_path):
    """Issue 13: `uclip train` with no options fits its closed form (language and modality subspaces removed,
    Head_B a kernel regressor into the multilingual space) and writes it, verified, without contrastive steps."""
    bundle = copy_bundle(trained.bundle, tmp_path / "bundle")
    result = invoke_uclip(["train", "--bundle", bundle, "--work-dir", tmp_path / "work", "--captions",
                           trained.home / "en.txt", "--foreign", trained.home / "foreign.txt", "--no-progress"], trained.env).ok()
    assert "starting run" in result.stderr and "fitting the heads in closed form on 114 captions" in result.stderr
    assert result.stdout.startswith("heads fitted in closed form (kernel, ")
    assert "no contrastive training: the closed form is the default" in result.stdout
    training = B.load_bundle(bundle).manifest["training"]
    assert training["steps"] == 0 and training["evaluations"] == []
    assert training["stop_reason"].startswith("the closed-form start is kept")
    start = training["start"]
    assert start["init"] == "ridge-to-multilingual" and start["head_a"] == "frozen"
    # English + the languages detected in the one foreign file, which mixes Czech and Finnish (issue 20; through the
    # tiny stand-in tower the groups need not be the two languages, only more than one)
    assert "languages detected in foreign.txt" in result.stderr
    assert start["modality_directions"] == 2 and start["language_groups"] >= 2
    assert start["language_directions"] == 1 + start["language_groups"]
    assert start["head_b"] == f"kernel, {2 * B.load_bundle(bundle).dims['clip']} landmarks"     # 2 x d_clip
    heads, meta = load_heads(bundle / B.HEADS_WEIGHTS)
    assert meta["dims"]["head_b"] == "kernel" and training["onnx_parity"][B.HEAD_B]["max_abs_diff"] <= \
        training["onnx_parity"][B.HEAD_B]["bound"]
    session = ort.InferenceSession(str(bundle / B.HEAD_B), providers=["CPUExecutionProvider"])
    features = index_vectors(trained.index, "features")
    x = np.stack([features[p] for p in sorted(features)][:8]).astype(np.float32)
    assert_float32_run_of(session.run(["embeddings"], {"features": x})[0], heads.eval().head_b.double(),
                          exact_inputs(x), what="head_b.onnx of the default run")


def test_paper_flag_runs_the_papers_heads_start_and_learning_rate(trained, tmp_path):
    bundle = copy_bundle(trained.bundle, tmp_path / "bundle")
    invoke_uclip(["train", "--bundle", bundle, "--work-dir", tmp_path / "work", "--captions", trained.home / "en.txt",
                  "--foreign", trained.home / "foreign.txt", "--paper", "--epochs", "1", "--batch-size", "16",
                  "--no-progress"], trained.env).ok()
    training = B.load_bundle(bundle).manifest["training"]
    config = training["config"]
    assert (config["init"], config["head_b"], config["language_projection"], config["modality_projection"],
            config["freeze_head_a"], config["lr"], config["epochs"]) == ("random", "mlp", False, False, False, 1e-3, 1)
    assert training["steps"] == 7 and "head_b" not in B.load_bundle(bundle).manifest["training"]["start"]


def test_a_language_recipe_trains_offline_from_the_captions_shipped_with_uclip(trained, tmp_path):
    """`uclip train --recipe hr` needs no network and no text file: the shipped XM3600 captions (issue 18)."""
    bundle = copy_bundle(trained.bundle, tmp_path / "bundle")
    env = dict(trained.env, HF_HUB_OFFLINE="1")
    result = invoke_uclip(["train", "--recipe", "hr", "--bundle", bundle, "--work-dir", tmp_path / "work", "--no-progress"],
                          env).ok()
    assert result.stdout.startswith("heads fitted in closed form (kernel, ")
    training = B.load_bundle(bundle).manifest["training"]
    assert training["foreign_languages"] == {"hr": 1800} and training["sizes"]["captions"] + training["sizes"].get(
        "heldout_captions", 0) == 1800
    assert training["inputs"]["captions"] == ["uclip:xm3600:en"] and training["inputs"]["foreign_memory"] == ["uclip:xm3600:hr"]
