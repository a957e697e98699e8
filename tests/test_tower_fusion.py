"""The default model's multilingual tower, fused at assembly only where it provably computes the same function.

onnx_rounding.py gives a published graph's exact (float64) result and its float32 rounding bound without
torch; tower_fusion.py fuses the published tower and keeps the fused graph only within that bound. Here:
the float64 reference against a numpy float64 evaluation of the same formula, the bound against float32
runs and a real fault, and assembly from a stand-in hub whose sentence-transformers repo holds a small BERT
exported as optimum exports it (eager attention, opset 14), and one exported with PyTorch's
scaled-dot-product attention (the optimizer fuses only its LayerNorms and GELUs: kept as published).
"""
from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from published_towers import SENTENCE_POSITIONS, SENTENCE_REPO, repo_files, write_published_repos, xlmr_tokenizer
from test_assemble import assemble, light, stand_in
from fake_hub import Server
from uclip_cli import bundle as B
from uclip_cli.families import GraphIO
from uclip_cli.onnx_rounding import Reference, Unmodelled, error_to_bound
from uclip_cli.sessions import SessionFactory
from uclip_cli.tower_fusion import fuse_published_tower

SESSIONS = SessionFactory(device="cpu", threads=1)
ROLES = ("input_ids", "attention_mask", "token_type_ids")
IO = GraphIO({n: n for n in ROLES}, "last_hidden_state", pooling="mean")
LAYERS = 2


# ------------------------------------------------------------------------------------------ the bound

def _block_graph(path: Path, *, erf: bool = True, extra: str | None = None) -> dict[str, np.ndarray]:
    """x [rows, 16] -> a transformer-like block: MatMul + bias, softmax over the features, LayerNormalization,
    GELU by erf, a mean and a division by a square root. Returns the weights (float32)."""
    rng = np.random.default_rng(3)
    w = {"w1": rng.standard_normal((16, 24)).astype(np.float32) / 4, "b1": rng.standard_normal(24).astype(np.float32),
         "gamma": (1 + rng.standard_normal(24) / 5).astype(np.float32), "beta": rng.standard_normal(24).astype(np.float32),
         "w2": rng.standard_normal((24, 8)).astype(np.float32) / 5}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Softmax", ["hb"], ["p"], axis=-1), helper.make_node("Add", ["hb", "p"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("Mul", ["n", "inv_sqrt2"], ["ns"]),
        helper.make_node("Erf" if erf else "Tanh", ["ns"], ["e"]), helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["n", "e1"], ["g2"]), helper.make_node("Mul", ["g2", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o"]),
        helper.make_node("ReduceMean", ["o"], ["m"], axes=[-1], keepdims=1),
        helper.make_node("Mul", ["m", "m"], ["m2"]), helper.make_node("Sqrt", ["m2"], ["s"]),
        helper.make_node("Add", ["s", "one"], ["s1"]), helper.make_node("Div", ["o", "s1"], ["y"]),
    ]
    if extra:
        nodes.append(helper.make_node(extra, ["y"], ["y2"]))
    consts = {"inv_sqrt2": np.float32(1 / math.sqrt(2)), "one": np.float32(1.0), "half": np.float32(0.5)}
    inits = [numpy_helper.from_array(v, k) for k, v in {**w, **{k: np.array(v) for k, v in consts.items()}}.items()]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 16])],
                              [helper.make_tensor_value_info("y2" if extra else "y", TensorProto.FLOAT, ["rows", 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def _block_float64(x: np.ndarray, w: dict[str, np.ndarray], erf: bool) -> np.ndarray:
    """The same formula in numpy float64 (erf, or tanh in its place)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hb = x.astype(np.float64) @ w["w1"] + w["b1"]
    p = np.exp(hb - hb.max(axis=-1, keepdims=True))
    r = hb + p / p.sum(axis=-1, keepdims=True)
    mu, var = r.mean(axis=-1, keepdims=True), r.var(axis=-1, keepdims=True)
    n = (r - mu) / np.sqrt(var + 1e-5) * w["gamma"] + w["beta"]
    ns = n * np.float32(1 / math.sqrt(2)).astype(np.float64)
    act = np.vectorize(math.erf)(ns) if erf else np.tanh(ns)
    o = (n * (act + 1) * 0.5) @ w["w2"]
    m = o.mean(axis=-1, keepdims=True)
    return o / (np.sqrt(m * m) + 1)


def test_the_float64_reference_is_the_formula_and_the_bound_holds_float32_but_not_a_fault(tmp_path):
    import onnxruntime as ort

    x = np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32)
    for erf in (False, True):
        path = tmp_path / f"block-{erf}.onnx"
        w = _block_graph(path, erf=erf)
        exact, bound = Reference(path, SESSIONS).exact_and_bound({"x": x})
        want = _block_float64(x, w, erf)
        assert bound.shape == (5,) and np.all(bound > 0) and np.all(bound < 1e-4)
        if not erf:   # every op in float64: the same formula in another order, a few float64 roundings apart
            np.testing.assert_allclose(exact, want, rtol=0, atol=1e-12)
        # with erf run in float32 (no float64 kernel), the reference is itself within the bound of the exact result
        assert error_to_bound(exact, want, bound) <= 0.5
        f32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert 0 < error_to_bound(f32, exact, bound) <= 1
        faulty = f32.copy()
        faulty[2] *= 1 + 1e-4                        # one row off by one part in ten thousand: a real fault
        assert error_to_bound(faulty, exact, bound) > 1


@pytest.mark.parametrize("op", ["Erf", "Gemm"])
def test_erf_run_in_float32_and_gemm_have_their_roundings_modelled(tmp_path, op):
    """erf has no float64 kernel (it runs in float32 between casts, exact casts): its rounding must still move
    the trials, or the bound of a GELU would miss it; Gemm (transposed weights, a bias) is a k + 1 term sum."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 12)).astype(np.float32)
    w, bias = rng.standard_normal((6, 12)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    if op == "Erf":
        nodes, inits, width, want = [helper.make_node("Erf", ["x"], ["y"])], [], 12, np.vectorize(math.erf)(x.astype(np.float64))
    else:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, alpha=0.5)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]
        width, want = 6, 0.5 * x.astype(np.float64) @ w.T.astype(np.float64) + bias
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", width])], inits)
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    exact, bound = Reference(path, SESSIONS).exact_and_bound({"x": x})
    assert np.all(bound > 0)
    assert error_to_bound(exact, want, bound) <= 0.5
    f32 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert error_to_bound(f32, exact, bound) <= 1


def test_an_op_without_a_rounding_model_claims_no_bound(tmp_path):
    path = tmp_path / "block.onnx"
    _block_graph(path, extra="Cos")
    with pytest.raises(Unmodelled, match="Cos"):
        Reference(path, SESSIONS)


# ------------------------------------------------------------------------------------------ published towers

def _bert(path: Path, attention: str, vocab: int) -> None:
    """A small BERT (2 layers, 64 wide, 4 heads) exported as the published layout's onnx/model.onnx."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=SENTENCE_POSITIONS, attn_implementation=attention)
    bert = BertModel(config).eval()

    class Sentence(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(2, 8, dtype=torch.int64)
    torch.onnx.export(Sentence(), (ids, ids, torch.zeros_like(ids)), str(path), input_names=list(ROLES),
                      output_names=["last_hidden_state"], opset_version=14, dynamo=False,
                      dynamic_axes={n: {0: "batch_size", 1: "sequence_length"} for n in [*ROLES, "last_hidden_state"]})


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("berts")
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(xlmr_tokenizer().to_str())
    vocab = xlmr_tokenizer().get_vocab_size(with_added_tokens=True)
    out = {"tokenizer": tokenizer}
    for attention in ("eager", "sdpa"):
        out[attention] = folder / f"{attention}.onnx"
        _bert(out[attention], attention, vocab)
    return out


def _fuse(berts: dict[str, Path], which: str, tmp_path: Path, messages: list[str] | None = None) -> tuple[Path, dict]:
    path = tmp_path / "text_multilingual.onnx"
    shutil.copy(berts[which], path)
    settings = B.TokenizerSettings(B.TOKENIZER_MULTILINGUAL, 128, pad_id=1)
    record = fuse_published_tower(path, berts["tokenizer"], settings, IO, SESSIONS,
                                  (messages if messages is not None else []).append,
                                  shape={"num_attention_heads": 4, "hidden_size": 64})
    return path, record


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_a_graph_fused_but_for_its_attention_stays_as_published(berts, tmp_path):
    path, record = _fuse(berts, "sdpa", tmp_path)
    assert record["fused"] is False and f"attention of 0 of its {LAYERS} layers" in record["why"]
    assert path.read_bytes() == berts["sdpa"].read_bytes()
    assert not (tmp_path / "text_multilingual.onnx.fused").exists()


def test_a_fused_graph_that_computes_something_else_is_kept_out(berts, tmp_path, monkeypatch):
    import uclip_cli.export.fuse as fuse

    real = fuse.fuse_graph

    def slightly_wrong(path, target, **kwargs):
        kernels = real(path, target, **kwargs)
        model = onnx.load(str(target))
        for i, t in enumerate(model.graph.initializer):   # one weight matrix of a layer, 0.1 % larger
            if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] == t.dims[1] == 64:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.001, t.name))
                break
        else:
            raise AssertionError("no 64 x 64 weight in the fused graph")
        onnx.save(model, str(target))
        return kernels

    monkeypatch.setattr(fuse, "fuse_graph", slightly_wrong)
    path, record = _fuse(berts, "eager", tmp_path)
    assert record["fused"] is False and "differs from the published graph's exact result" in record["why"]
    assert path.read_bytes() == berts["eager"].read_bytes()


def test_a_check_that_cannot_run_keeps_the_published_graph_and_never_stops_the_assembly(berts, tmp_path, monkeypatch):
    import uclip_cli.onnx_rounding as rounding

    def out_of_memory(*args, **kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(rounding.Reference, "__init__", out_of_memory)
    path, record = _fuse(berts, "eager", tmp_path)
    assert record == {"fused": False, "why": "the check could not run (std::bad_alloc)"}
    assert path.read_bytes() == berts["eager"].read_bytes()
    assert not (tmp_path / "text_multilingual.onnx.fused").exists()


@pytest.mark.parametrize("package", ["onnx", "sympy"])
def test_without_the_onnx_package_the_published_graph_stays_and_the_log_says_what_to_install(berts, tmp_path, monkeypatch, package):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    messages: list[str] = []
    path, record = _fuse(berts, "eager", tmp_path, messages)
    assert record == {"fused": False, "why": f"the {package} package is not installed (pip install onnx sympy)"}
    assert len(messages) == 1 and "pip install onnx sympy" in messages[0]
    assert path.read_bytes() == berts["eager"].read_bytes()


def test_first_use_fuses_the_published_bert_and_its_queries_keep_the_published_exact_result(berts, tmp_path, monkeypatch):
    """Assembly from the stand-in hub with the small eager BERT as onnx/model.onnx: the bundle runs the fused graph
    (one Attention kernel per layer), the manifest keeps the published file's sha256 and says what was done, and
    the bundle's token embeddings lie within float32 rounding of the published graph's exact result."""
    from cli_helpers import uclip_env
    from uclip_cli.text import TextTokenizer

    env = uclip_env(tmp_path / "home")
    for key in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    published = {repo: repo_files(folder) for repo, folder in write_published_repos(tmp_path / "published").items()}
    published[SENTENCE_REPO]["onnx/model.onnx"] = berts["eager"].read_bytes()
    config = published[SENTENCE_REPO]["config.json"].decode()
    published[SENTENCE_REPO]["config.json"] = config.replace('"hidden_size": 384', '"hidden_size": 64').replace(
        '"num_attention_heads": 12', '"num_attention_heads": 4').encode()
    hub, recipe = stand_in(published)
    messages: list[str] = []
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assert assemble(tmp_path / "bundle", light(recipe), messages)
    bundle = B.load_bundle(tmp_path / "bundle", verify="full")
    assembled = bundle.manifest["export"]["assembled"]
    record = assembled["fusion"][B.TEXT_MULTILINGUAL]
    assert record["fused"] is True, record
    assert record["kernels"]["Attention"] == LAYERS and record["kernels"]["SkipLayerNormalization"] == 2 * LAYERS
    assert record["nodes"]["fused"] < record["nodes"]["published"] / 4
    assert all(0 < r <= 1 for r in record["parity"]["error_to_bound"].values())
    assert any("multilingual tower fused (Attention 2" in m for m in messages)
    graph = bundle.path / B.TEXT_MULTILINGUAL
    assert "Attention" in _ops(graph) and "Softmax" not in _ops(graph)
    pin = assembled["files"][f"{SENTENCE_REPO}/onnx/model.onnx"]
    assert pin["sha256"] == hashlib.sha256(berts["eager"].read_bytes()).hexdigest() != bundle.manifest["files"][B.TEXT_MULTILINGUAL]
    # the bundle's graph, as queries feed it, within the rule of the published graph's exact result
    tokens = TextTokenizer(bundle.path / B.TOKENIZER_MULTILINGUAL, bundle.tokenizers["multilingual"])(
        ["Kočka spí na gauči.", "A dog runs on the beach", "x"])
    feeds = {**tokens, "token_type_ids": np.zeros_like(tokens["input_ids"])}
    exact, bound = Reference(berts["eager"], SESSIONS).exact_and_bound(feeds, valid=tokens["attention_mask"])
    got = SESSIONS.create_as_written(graph).run(feeds)
    assert error_to_bound(got, exact, bound, tokens["attention_mask"]) <= 1
    # and the assembled default answers a query with it; `uclip doctor` says the tower runs fused
    from uclip_cli.doctor import fusion_detail
    from uclip_cli.encoders import Encoders

    vector = Encoders(bundle, SESSIONS).encode_text_query(["Kočka spí na gauči."])
    assert vector.shape == (1, bundle.dims["shared"]) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5
    assert "run as fused kernels" in fusion_detail(bundle, B.TEXT_MULTILINGUAL)


def test_the_stand_in_published_graph_is_kept_and_the_manifest_says_why(tmp_path, monkeypatch):
    """The test suite's own stand-in graph (an attention-free layer) has nothing to fuse: the bundle holds the
    published file byte for byte and the manifest records the reason."""
    from cli_helpers import uclip_env

    env = uclip_env(tmp_path / "home")
    for key in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    published = {repo: repo_files(folder) for repo, folder in write_published_repos(tmp_path / "published").items()}
    hub, recipe = stand_in(published)
    with Server(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        assert assemble(tmp_path / "bundle", light(recipe))
    manifest = B.read_manifest(tmp_path / "bundle")
    assert manifest["export"]["assembled"]["fusion"][B.TEXT_MULTILINGUAL] == {
        "fused": False, "why": "no transformer layer matched the optimizer's patterns"}
    assert manifest["files"][B.TEXT_MULTILINGUAL] == hashlib.sha256(published[SENTENCE_REPO]["onnx/model.onnx"]).hexdigest()
    from uclip_cli.doctor import fusion_detail

    assert fusion_detail(B.load_bundle(tmp_path / "bundle"), B.TEXT_MULTILINGUAL) == \
        "; its layers are not fused: no transformer layer matched the optimizer's patterns"
