"""The heads of an assembled bundle, written without torch: ONNX graphs, their exact function, and the
same closed form `uclip train` fits with torch."""
from __future__ import annotations

import numpy as np
import pytest

from uclip_cli.default_heads import fit_heads
from uclip_cli.head_graphs import KernelHead, LinearHead, check_graph, exact
from uclip_cli.onnx_bytes import FLOAT, GraphBuilder


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def session(graph: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


def runner(graph: bytes):
    s = session(graph)
    return lambda x: s.run(None, {"features": x})[0]


def heads(rng):
    basis, _ = np.linalg.qr(rng.normal(size=(24, 3)))
    linear = LinearHead(basis, np.eye(24, 32))
    centres = unit(rng.normal(size=(16, 20)))
    kernel = KernelHead(None, centres, 1.0, rng.normal(size=(20, 32)) * 0.1, rng.normal(size=(16, 32)) * 0.1,
                        rng.normal(size=32) * 0.01)
    return linear, kernel


def test_graphs_pass_onnx_checker_and_take_any_batch():
    onnx = pytest.importorskip("onnx")   # the train extra; CI installs it
    rng = np.random.default_rng(0)
    for head in heads(rng):
        graph = head.graph()
        onnx.checker.check_model(onnx.load_from_string(graph), full_check=True)
        s = session(graph)
        assert [(i.name, i.type, i.shape) for i in s.get_inputs()] == [("features", "tensor(float)", ["batch", head.d_in])]
        assert [(o.name, o.shape) for o in s.get_outputs()] == [("embeddings", ["batch", head.d_out])]
        for rows in (1, 5, 40):
            out = s.run(None, {"features": unit(rng.normal(size=(rows, head.d_in))).astype(np.float32)})[0]
            assert out.shape == (rows, head.d_out)
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_graphs_compute_their_exact_function_within_float32_rounding_and_a_wrong_weight_is_caught():
    rng = np.random.default_rng(1)
    linear, kernel = heads(rng)
    for head in (linear, kernel):
        x = unit(rng.normal(size=(30, head.d_in))).astype(np.float32)
        figures = check_graph(head, runner(head.graph()), x)
        assert 0 <= figures["max_abs_diff"] <= figures["bound"] < 1e-4
    wrong = KernelHead(None, kernel.centres, kernel.gamma * 1.05, kernel.linear, kernel.kernel, kernel.bias)
    x = unit(rng.normal(size=(30, kernel.d_in))).astype(np.float32)
    with pytest.raises(ValueError, match="beyond float32 rounding"):
        check_graph(wrong, runner(kernel.graph()), x)
    unremoved = LinearHead(None, linear.mapping)
    with pytest.raises(ValueError, match="beyond float32 rounding"):
        check_graph(unremoved, runner(linear.graph()), unit(rng.normal(size=(30, linear.d_in))).astype(np.float32))


def test_a_zero_row_stays_zero_instead_of_nan():
    linear, _ = heads(np.random.default_rng(2))
    out = runner(linear.graph())(np.zeros((2, linear.d_in), np.float32))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_graph_builder_writes_negative_and_list_attributes():
    onnx = pytest.importorskip("onnx")
    g = GraphBuilder("t")
    x = g.input("x", FLOAT, ["n", 3])
    g.node("ReduceMax", x, out="y", axes=[-1], keepdims=0)
    g.output("y", FLOAT, ["n"])
    model = onnx.load_from_string(g.to_bytes())
    onnx.checker.check_model(model, full_check=True)
    assert list(model.graph.node[0].attribute[0].ints) == [-1]
    np.testing.assert_array_equal(session(g.to_bytes()).run(None, {"x": np.array([[1, 5, 2], [7, 0, 3]], np.float32)})[0], [5.0, 7.0])


def test_the_assembled_fit_is_the_closed_form_uclip_train_writes_into_its_torch_heads():
    """fit_heads (numpy, no torch) and train's build_heads (torch; modality projection off, as the assembled default)
    give the same two functions on the same features, to float32 rounding."""
    torch = pytest.importorskip("torch")
    from uclip_cli.train.config import TrainConfig
    from uclip_cli.train.data import TrainInputs
    from uclip_cli.train.head_setup import build_heads

    rng = np.random.default_rng(3)
    d_clip, d_multi, n = 32, 24, 160
    english_clip = unit(rng.normal(size=(n, d_clip)))
    mixing = rng.normal(size=(d_clip, d_multi))
    english_multi = unit(np.tanh(english_clip @ mixing) + 0.3)
    offsets = unit(rng.normal(size=(3, d_multi)))
    foreign = unit(np.vstack([unit(rng.normal(size=(40, d_multi))) + 2 * o for o in offsets]))
    labels = np.repeat(np.arange(3), 40)
    head_a, head_b, info = fit_heads(english_clip, english_multi, foreign, labels, d_shared=32, landmarks_per_dim=2)
    config = TrainConfig(modality_projection=False, d_shared=32)
    inputs = TrainInputs(english_clip.astype(np.float32), english_multi.astype(np.float32),
                         unit(rng.normal(size=(20, d_clip))).astype(np.float32), foreign.astype(np.float32),
                         labels.astype(np.int16), ("a", "b", "c"))
    torch_heads, start = build_heads(inputs, config)
    torch_heads = torch_heads.double().eval()
    assert start["language_directions"] == info["language_directions"] == 4
    assert start["gamma"] == info["gamma"] and start["lambda_kernel"] == info["lambda_kernel"]
    probe_multi = unit(rng.normal(size=(10, d_multi))).astype(np.float32)
    probe_clip = unit(rng.normal(size=(10, d_clip))).astype(np.float32)
    with torch.no_grad():
        want_a = torch_heads.head_a(torch.from_numpy(probe_multi).double()).numpy()
        want_b = torch_heads.head_b(torch.from_numpy(probe_clip).double()).numpy()
    np.testing.assert_allclose(exact(head_a, probe_multi), want_a, atol=2e-5)
    np.testing.assert_allclose(exact(head_b, probe_clip), want_b, atol=2e-5)
