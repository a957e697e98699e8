"""`uclip export`: Hugging Face checkpoints -> verified ONNX bundle (tiny random-weight models, no downloads)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPModel, SiglipModel

from exact_towers import exact_model, mean_pooled, normalised
from rounding import assert_float32_run_of, assert_within, exact_inputs
from tiny_models import make_tiny_sentence_encoder, make_tiny_siglip
from uclip_cli import bundle as B
from uclip_cli.export import ExportError, export_bundle
from uclip_cli.export import build, parity
from uclip_cli.text import TextTokenizer

SENTENCES = ["A dog runs on the beach.", "Dvě kočky spí na červené pohovce vedle okna.", "Koira.",
             "Un bărbat merge cu bicicleta pe o stradă aglomerată din centrul orașului."]


def quiet(_: str) -> None:
    pass


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def embed_text(bundle: B.Bundle, key: str, onnx_file: str, texts: list[str]) -> np.ndarray:
    tokenizer = TextTokenizer(bundle.file(bundle.tokenizers[key].file), bundle.tokenizers[key])
    return session(bundle.file(onnx_file)).run(["embeddings"], tokenizer(texts))[0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny matrices: one thread is fastest on shared cores


@pytest.fixture(scope="module")
def siglip_xlmr_bundle(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("siglip_xlmr")
    siglip = make_tiny_siglip(root / "siglip")
    xlmr = make_tiny_sentence_encoder(root / "xlmr", "xlm-roberta")
    return siglip, xlmr, export_bundle(str(siglip), str(xlmr), root / "bundle", log=quiet)


# ------------------------------------------------------------------------------------------ tiny models

def test_tiny_clip_loads_like_a_hub_checkpoint(tiny_checkpoints):
    processor = AutoProcessor.from_pretrained(tiny_checkpoints.clip)
    pixels = processor(images=[np.zeros((80, 100, 3), np.uint8)], return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 64, 64)
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints.clip)
    ids = tokenizer(["Two cats, one dog."])["input_ids"][0]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in tokenizer(["Pes běží po pláži"])["input_ids"][0][1:-1]
    assert CLIPModel.from_pretrained(tiny_checkpoints.clip).config.text_config.eos_token_id == tokenizer.eos_token_id


def test_tiny_sentence_encoder_has_sentence_transformers_layout(tiny_checkpoints):
    directory = tiny_checkpoints.multilingual
    modules = json.loads((directory / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling"]
    assert json.loads((directory / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    tokenizer = AutoTokenizer.from_pretrained(directory)
    for text in ("Dvě kočky spí.", "Két macska alszik.", "Kaksi kissaa nukkuu.", "Două pisici dorm.", "一只狗在草地上"):
        assert tokenizer.unk_token_id not in tokenizer([text])["input_ids"][0]


# ------------------------------------------------------------------------------------------ the bundle

def test_bundle_is_complete_and_loadable(tiny_bundle, tiny_checkpoints):
    bundle = B.load_bundle(tiny_bundle)
    assert set(bundle.files) == {B.IMAGE_ENCODER, B.TEXT_MULTILINGUAL, B.TEXT_CLIP,
                                 B.TOKENIZER_MULTILINGUAL, B.TOKENIZER_CLIP}
    assert not bundle.has_heads and bundle.has_clip_text
    assert bundle.dims == {"clip": 24, "multilingual": 32, "shared": 512}
    assert bundle.manifest["sources"] == {"clip": str(tiny_checkpoints.clip),
                                          "multilingual": str(tiny_checkpoints.multilingual)}
    assert bundle.image == B.ImageSettings(size=64, resize_mode="shortest_edge", crop=True, resample="bicubic")
    clip_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints.clip)
    assert bundle.tokenizers["clip"] == B.TokenizerSettings(
        file=B.TOKENIZER_CLIP, max_length=77, padding="longest", pad_id=clip_tokenizer.pad_token_id)
    assert bundle.tokenizers["multilingual"] == B.TokenizerSettings(
        file=B.TOKENIZER_MULTILINGUAL, max_length=128, padding="longest", pad_id=0)
    assert not list(tiny_bundle.parent.glob(".*")), "staging directories left behind"


def test_parity_figures_and_versions_are_recorded(tiny_bundle):
    export = B.load_bundle(tiny_bundle).manifest["export"]
    assert set(export["parity"]) == {B.IMAGE_ENCODER, B.TEXT_MULTILINGUAL, B.TEXT_CLIP}
    assert "rounding bound" in export["parity_rule"]
    for figures in export["parity"].values():
        assert 0 <= figures["error_to_bound"] <= 1
        assert figures["max_abs_diff"] <= figures["bound"] < 1e-3   # a real fault moves unit vectors by 1e-2 or more
        assert figures["min_cosine"] > 0.9999
    assert export["opset"] == 17 and export["versions"]["torch"] == torch.__version__
    assert export["quantization"] is None


def test_graphs_have_the_bundle_signature(tiny_bundle):
    for name, inputs in ((B.IMAGE_ENCODER, ["pixel_values"]),
                         (B.TEXT_CLIP, ["input_ids", "attention_mask"]),
                         (B.TEXT_MULTILINGUAL, ["input_ids", "attention_mask"])):
        graph = onnx.load(str(tiny_bundle / name)).graph
        assert [i.name for i in graph.input] == inputs
        assert [o.name for o in graph.output] == ["embeddings"]
        for value in list(graph.input) + list(graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{name}:{value.name} has a fixed batch axis"


def test_image_tower_matches_transformers_at_any_batch_size(tiny_bundle, tiny_checkpoints):
    model = exact_model(CLIPModel, tiny_checkpoints.clip)
    image_encoder = session(tiny_bundle / B.IMAGE_ENCODER)
    rng = np.random.default_rng(7)
    for batch in (1, 4, 7):
        pixels = rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)
        got = image_encoder.run(["embeddings"], {"pixel_values": pixels})[0]
        assert got.shape == (batch, 24)
        exact = assert_float32_run_of(got, lambda p: normalised(model.get_image_features(pixel_values=p)),
                                      exact_inputs(pixels), what=f"batch {batch}")
        row_bound = np.sqrt(24) * exact.bound.numpy()[:, 0]   # the reference rows have norm 1
        assert_within(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, row_bound, what="norm")


def test_text_towers_match_transformers(tiny_bundle, tiny_checkpoints):
    bundle = B.load_bundle(tiny_bundle)
    clip = exact_model(CLIPModel, tiny_checkpoints.clip)
    clip_inputs = AutoTokenizer.from_pretrained(tiny_checkpoints.clip)(SENTENCES, padding=True, return_tensors="pt")
    multi = exact_model(AutoModel, tiny_checkpoints.multilingual)
    multi_inputs = AutoTokenizer.from_pretrained(tiny_checkpoints.multilingual)(SENTENCES, padding=True,
                                                                                 return_tensors="pt")
    assert_float32_run_of(embed_text(bundle, "clip", B.TEXT_CLIP, SENTENCES),
                          lambda ids, mask: normalised(clip.get_text_features(input_ids=ids, attention_mask=mask)),
                          [clip_inputs["input_ids"], clip_inputs["attention_mask"]], what="CLIP text")
    assert_float32_run_of(embed_text(bundle, "multilingual", B.TEXT_MULTILINGUAL, SENTENCES),
                          lambda ids, mask: mean_pooled(multi, ids, mask),
                          [multi_inputs["input_ids"], multi_inputs["attention_mask"]], what="multilingual")


def test_mean_pooling_ignores_padding(tiny_bundle, tiny_checkpoints):
    bundle = B.load_bundle(tiny_bundle)
    model = exact_model(AutoModel, tiny_checkpoints.multilingual)
    tokenizer = TextTokenizer(bundle.file(B.TOKENIZER_MULTILINGUAL), bundle.tokenizers["multilingual"])
    short = "Koira."
    alone = tokenizer([short])
    exact = assert_float32_run_of(embed_text(bundle, "multilingual", B.TEXT_MULTILINGUAL, [short]),
                                  lambda ids, mask: mean_pooled(model, ids, mask), exact_inputs(*alone.values()))
    padded = embed_text(bundle, "multilingual", B.TEXT_MULTILINGUAL, [SENTENCES[3], short])[1:]
    assert_within(padded, exact.result.numpy(), exact.bound.numpy(), what="padded in a batch")
    # The same padded ids with the padding unmasked give another vector: the mask is what makes them equal.
    feeds = tokenizer([SENTENCES[3], short])
    feeds["attention_mask"] = np.ones_like(feeds["attention_mask"])
    unmasked = session(bundle.file(B.TEXT_MULTILINGUAL)).run(["embeddings"], feeds)[0][1:]
    assert np.abs(unmasked - exact.result.numpy()).max() > 100 * exact.bound.numpy().max()


def test_bundle_tokenizers_match_the_checkpoint_tokenizers(tiny_bundle, tiny_checkpoints):
    bundle = B.load_bundle(tiny_bundle)
    long_text = " ".join(["a small wooden boat on a calm lake"] * 30)
    for key, source in (("clip", tiny_checkpoints.clip), ("multilingual", tiny_checkpoints.multilingual)):
        settings = bundle.tokenizers[key]
        ours = TextTokenizer(bundle.file(settings.file), settings)(SENTENCES + [long_text])
        theirs = AutoTokenizer.from_pretrained(source)(SENTENCES + [long_text], padding=True, truncation=True,
                                                       max_length=settings.max_length, return_tensors="np")
        assert ours["input_ids"].shape[1] == settings.max_length   # the long one is truncated
        np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], theirs["attention_mask"])


# ------------------------------------------------------------------------------------------ SigLIP, XLM-R

def test_siglip_bundle_uses_its_preprocessing_and_fixed_padding(siglip_xlmr_bundle):
    siglip, _, path = siglip_xlmr_bundle
    bundle = B.load_bundle(path)
    assert bundle.manifest["export"]["model_types"] == {"clip": "siglip", "multilingual": "xlm-roberta"}
    assert bundle.image == B.ImageSettings(size=64, resize_mode="exact", crop=False, resample="bilinear",
                                           mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    settings = bundle.tokenizers["clip"]
    assert (settings.max_length, settings.padding, settings.lowercase) == (64, "max_length", True)
    assert bundle.dims["clip"] == 32

    model = exact_model(SiglipModel, siglip)
    tokenize = TextTokenizer(bundle.file(settings.file), settings)
    feeds = tokenize(SENTENCES)
    assert feeds["input_ids"].shape == (len(SENTENCES), 64)
    got = session(bundle.file(B.TEXT_CLIP)).run(["embeddings"], feeds)[0]
    # SigLIP's text tower is trained on padded text without a mask
    assert_float32_run_of(got, lambda ids: normalised(model.get_text_features(input_ids=ids)),
                          exact_inputs(feeds["input_ids"]), what="SigLIP text")
    cased = tokenize(["A Dog Runs On The Beach."])
    np.testing.assert_array_equal(cased["input_ids"], tokenize(["a dog runs on the beach."])["input_ids"])


def test_xlm_roberta_multilingual_tower(siglip_xlmr_bundle):
    _, xlmr, path = siglip_xlmr_bundle
    bundle = B.load_bundle(path)
    assert bundle.dims["multilingual"] == 32
    assert bundle.tokenizers["multilingual"].pad_id == 1   # XLM-R's <pad>
    model = exact_model(AutoModel, xlmr)
    inputs = AutoTokenizer.from_pretrained(xlmr)(SENTENCES, padding=True, return_tensors="pt")
    assert_float32_run_of(embed_text(bundle, "multilingual", B.TEXT_MULTILINGUAL, SENTENCES),
                          lambda ids, mask: mean_pooled(model, ids, mask),
                          [inputs["input_ids"], inputs["attention_mask"]], what="XLM-R")


# ------------------------------------------------------------------------------------------ errors

def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_checkpoint_directory(tiny_checkpoints, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ExportError) as error:
        export_bundle(str(missing), str(tiny_checkpoints.multilingual), tmp_path / "out", log=quiet)
    assert str(missing) in _one_line(error)
    assert not (tmp_path / "out").exists()


def test_hub_id_that_is_not_cached_offline(tiny_checkpoints, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ExportError) as error:
        export_bundle(str(tiny_checkpoints.clip), "nobody/no-such-model", tmp_path / "out", log=quiet)
    message = _one_line(error)
    assert "nobody/no-such-model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in message
    assert "hf download nobody/no-such-model" in message and "--multilingual no-such-model" in message


def test_unsupported_architectures_are_named(tiny_checkpoints, tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError) as error:
        export_bundle(str(tmp_path / "gpt2"), str(tiny_checkpoints.multilingual), tmp_path / "out", log=quiet)
    assert "'gpt2'" in _one_line(error) and "clip, siglip" in str(error.value)
    (tmp_path / "naflex").mkdir()
    (tmp_path / "naflex" / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ExportError) as error:
        export_bundle(str(tmp_path / "naflex"), str(tiny_checkpoints.multilingual), tmp_path / "out", log=quiet)
    assert "'siglip2'" in _one_line(error) and "fixed-resolution" in str(error.value)
    with pytest.raises(ExportError) as error:   # the two sources swapped
        export_bundle(str(tiny_checkpoints.multilingual), str(tiny_checkpoints.clip), tmp_path / "out", log=quiet)
    assert "'bert'" in _one_line(error)
    with pytest.raises(ExportError) as error:
        export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.clip), tmp_path / "out", log=quiet)
    assert "'clip'" in _one_line(error) and all(t in str(error.value) for t in ("bert", "xlm-roberta", "mpnet"))


def test_sentence_encoder_without_mean_pooling_is_refused(tiny_checkpoints, tmp_path):
    encoder = tmp_path / "cls-pooled"
    shutil.copytree(tiny_checkpoints.multilingual, encoder)
    pooling = json.loads((encoder / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (encoder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ExportError) as error:
        export_bundle(str(tiny_checkpoints.clip), str(encoder), tmp_path / "out", log=quiet)
    assert "mean pooling" in _one_line(error)


def test_output_directory_that_is_not_a_bundle_is_refused(tiny_checkpoints, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"not a bundle")
    with pytest.raises(ExportError) as error:
        export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), tmp_path / "photos", log=quiet)
    assert "photos" in _one_line(error)
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_failed_export_leaves_no_half_bundle_and_keeps_the_old_one(tiny_bundle, tiny_checkpoints, tmp_path,
                                                                    monkeypatch):
    existing = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, existing)
    before = (existing / B.MANIFEST).read_bytes()
    onnx_outputs = parity.onnx_outputs
    # A graph 1 % off (a fault far smaller than a missing normalisation) fails its parity check.
    monkeypatch.setattr(parity, "onnx_outputs", lambda model, feeds: 1.01 * onnx_outputs(model, feeds))
    for out in (tmp_path / "new", existing):
        with pytest.raises(ExportError) as error:
            export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), out, log=quiet)
        assert "differs from PyTorch" in _one_line(error)
    assert not (tmp_path / "new").exists()
    assert (existing / B.MANIFEST).read_bytes() == before
    B.load_bundle(existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_unknown_quantization_is_refused(tiny_checkpoints, tmp_path):
    with pytest.raises(ExportError) as error:
        export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), tmp_path / "out",
                      quantize="int4", log=quiet)
    assert "int4" in _one_line(error)


# ------------------------------------------------------------------------------------------ int8

def test_int8_replaces_an_existing_bundle_and_records_its_cosine(tiny_bundle, tiny_checkpoints, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), out, quantize="int8",
                  verify=False, log=quiet)
    bundle, fp32 = B.load_bundle(out), B.load_bundle(tiny_bundle)
    assert bundle.manifest["export"]["verified"] is False and bundle.manifest["export"]["parity"] == {}
    quantization = bundle.manifest["export"]["quantization"]
    assert quantization["mode"] == "int8" and quantization["per_channel"] is True
    assert set(quantization["files"]) == {B.TEXT_MULTILINGUAL, B.TEXT_CLIP}
    assert bundle.files[B.IMAGE_ENCODER] == fp32.files[B.IMAGE_ENCODER]   # the image tower stays fp32
    for name, key in ((B.TEXT_MULTILINGUAL, "multilingual"), (B.TEXT_CLIP, "clip")):
        recorded = quantization["files"][name]
        ops = {node.op_type for node in onnx.load(str(out / name)).graph.node}
        assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, name
        assert (out / name).stat().st_size == recorded["int8_bytes"] < recorded["fp32_bytes"]
        if name == B.TEXT_CLIP:   # the verified bundle's multilingual tower is fused (fuse.py); this export's is not
            assert recorded["fp32_bytes"] == (tiny_bundle / name).stat().st_size
        int8 = embed_text(bundle, key, name, build.VERIFY_TEXTS)
        reference = embed_text(fp32, key, name, build.VERIFY_TEXTS)
        cosines = np.sum(int8 * reference, axis=1)
        assert cosines.min() >= recorded["min_cosine"] - 1e-6
        assert 0.9 < recorded["min_cosine"] < 1.0


def test_int8_all_also_quantizes_the_image_encoder_and_records_its_cosine(tiny_bundle, tiny_checkpoints, tmp_path):
    out = tmp_path / "bundle"
    export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), out, quantize="int8-all",
                  verify=False, log=quiet)
    bundle, fp32 = B.load_bundle(out), B.load_bundle(tiny_bundle)
    quantization = bundle.manifest["export"]["quantization"]
    assert quantization["mode"] == "int8-all"
    assert set(quantization["files"]) == {B.TEXT_MULTILINGUAL, B.TEXT_CLIP, B.IMAGE_ENCODER}
    assert bundle.image_fingerprint != fp32.image_fingerprint      # an index of fp32 features is not mixed with it
    ops = {node.op_type for node in onnx.load(str(out / B.IMAGE_ENCODER)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}
    pixels = np.random.default_rng(0).standard_normal((4, 3, bundle.image.size, bundle.image.size)).astype(np.float32)
    int8, reference = (ort.InferenceSession(str(b.file(B.IMAGE_ENCODER))).run(None, {"pixel_values": pixels})[0]
                       for b in (bundle, fp32))
    cosines = np.sum(int8 * reference, axis=1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(reference, axis=1)
    assert 0.9 < quantization["files"][B.IMAGE_ENCODER]["min_cosine"] < 1.0
    assert cosines.min() > 0.9


def test_the_checks_open_every_graph_they_judge_with_the_factory_they_are_given(tiny_checkpoints, tmp_path):
    from uclip_cli.sessions import CPU, SessionFactory

    opened: list[tuple[str, list[str]]] = []

    class Recording(SessionFactory):
        def create_as_written(self, path):
            model = super().create_as_written(path)
            opened.append((model.name, model.providers))
            return model

    export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), tmp_path / "out", quantize="int8",
                  sessions=Recording(device="auto", threads=1), log=quiet)
    # parity of the three towers against PyTorch and of the fused multilingual tower (fuse.py), then each quantized
    # text tower against its fp32 original
    assert sorted(name for name, _ in opened) == sorted(
        [B.IMAGE_ENCODER, B.TEXT_CLIP, B.TEXT_MULTILINGUAL, f"{B.TEXT_MULTILINGUAL}.fused",
         B.TEXT_CLIP, f"{B.TEXT_CLIP}.int8", B.TEXT_MULTILINGUAL, f"{B.TEXT_MULTILINGUAL}.int8"])
    assert all(providers == [CPU] for _, providers in opened)   # the checks judge the file on the CPU, whatever --device


# ------------------------------------------------------------------------------------------ fused kernels

FUSED_OPS = {"Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"}


def test_a_verified_export_fuses_the_multilingual_towers_kernels_within_float32_rounding(tiny_bundle, tiny_checkpoints,
                                                                                        tmp_path):
    """issue 22, item 3: the verified export replaces the multilingual tower by ONNX Runtime's transformer-fused graph
    (fewer, bigger kernels) because it passed the same parity check against PyTorch (twice the float32 rounding bound
    of each row); an unverified export has no such check and keeps the graph as exported; the graph as exported is
    never left in the bundle."""
    bundle = B.load_bundle(tiny_bundle)
    record = bundle.manifest["export"]["fusion"][B.TEXT_MULTILINGUAL]
    assert record["fused"] is True and record["parity"]["error_to_bound"] <= 1.0
    assert record["kernels"]["Attention"] == 2 and record["kernels"]["SkipLayerNormalization"] == 4   # 2 layers
    assert record["nodes"]["fused"] < record["nodes"]["exported"] / 2
    ops = {node.op_type for node in onnx.load(str(tiny_bundle / B.TEXT_MULTILINGUAL)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    assert not {node.op_type for node in onnx.load(str(tiny_bundle / B.TEXT_CLIP)).graph.node} & FUSED_OPS
    assert not list(tiny_bundle.glob("*.unfused")) and not list(tiny_bundle.glob("*.fused"))

    plain = tmp_path / "plain"
    export_bundle(str(tiny_checkpoints.clip), str(tiny_checkpoints.multilingual), plain, verify=False, log=quiet)
    assert B.load_bundle(plain).manifest["export"]["fusion"] == {}
    assert not {node.op_type for node in onnx.load(str(plain / B.TEXT_MULTILINGUAL)).graph.node} & FUSED_OPS
    # each graph lies within the recorded bound (twice the float32 rounding bound) of PyTorch's float32 output on the
    # verification texts, so on those texts the two lie within twice that of each other
    fused_out = embed_text(bundle, "multilingual", B.TEXT_MULTILINGUAL, build.VERIFY_TEXTS)
    plain_out = embed_text(B.load_bundle(plain), "multilingual", B.TEXT_MULTILINGUAL, build.VERIFY_TEXTS)
    assert 0 < np.max(np.abs(fused_out - plain_out)) <= 2 * record["parity"]["bound"]
