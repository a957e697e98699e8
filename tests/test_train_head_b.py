"""Issue-13 options on Head_B's side: the modality subspace it removes (the CLIP modality gap), and the kernel
Head_B (a linear map plus Gaussian-kernel features around anchor captions), in training, on disk and in ONNX."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from uclip_cli.closed_form import fit_kernel_map, kernel_design, ridge
from uclip_cli.train.config import PAPER_START, TrainConfig, TrainConfigError
from uclip_cli.train.data import TrainInputs
from uclip_cli.train.head_setup import build_heads
from uclip_cli.train.heads import (HEAD_B, ONNX_INPUT, ONNX_OUTPUT, KernelHead, UCLIPHeads, export_heads_onnx,
                                   load_heads, save_heads)
from uclip_cli.subspaces import modality_directions, modality_means
from uclip_cli.train.trainer import train_heads
from conftest import unit_rows as unit
from rounding import assert_within, gamma

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gap_world(rng, n=400, d=16, gap=1.5):
    """CLIP-like rows: content + a text offset (captions) or an image offset (photos), L2-normalised."""
    offsets = rng.standard_normal((2, d)) * gap / np.sqrt(d)
    captions_content = rng.standard_normal((n, d)) / np.sqrt(d)
    photos_content = rng.standard_normal((n, d)) / np.sqrt(d)
    captions = unit(captions_content + offsets[0]).astype(np.float32)
    photos = unit(photos_content + offsets[1]).astype(np.float32)
    return captions, photos, offsets


# ---------------------------------------------------------------- the modality subspace

def test_head_b_sees_a_photo_and_a_caption_of_the_same_content_alike():
    """With the span of the caption mean and the photo mean removed, one content shifted by the text offset
    or by the image offset reaches Head_B's layers as (almost) the same vector; without it, it does not."""
    rng = np.random.default_rng(0)
    captions, photos, offsets = gap_world(rng, gap=3.0)
    means = modality_means(captions * 2.0, photos)                  # rows are normalised before averaging
    assert_within(means, np.stack([captions.astype(np.float64).mean(0), photos.astype(np.float64).mean(0)]),
                  4 * gamma(len(captions)), "modality means")
    basis = modality_directions(captions, photos)
    assert basis.shape == (16, 2)
    assert_within(basis.T.astype(np.float64) @ basis, np.eye(2), 8 * gamma(16), "orthonormal basis")
    heads = UCLIPHeads(8, 16, d_shared=8, modality_directions=2)
    heads.head_b.set_removed(torch.from_numpy(basis))
    content = rng.standard_normal((5, 16)) / 4.0
    as_caption, as_photo = unit(content + offsets[0]).astype(np.float32), unit(content + offsets[1]).astype(np.float32)
    with torch.no_grad():
        seen_caption = heads.head_b.prepare(torch.from_numpy(as_caption)).double().numpy()
        seen_photo = heads.head_b.prepare(torch.from_numpy(as_photo)).double().numpy()
    before = np.linalg.norm(as_caption - as_photo, axis=1)
    after = np.linalg.norm(seen_caption - seen_photo, axis=1)
    assert before.min() > 0.5                     # the gap dominates the raw vectors ...
    assert after.max() < 0.25 * before.min()      # ... and is (mostly) gone after the projection


def test_modality_projection_is_fitted_on_training_rows_and_exported_inside_head_b(tmp_path):
    rng = np.random.default_rng(1)
    captions, photos, _ = gap_world(rng)
    e_K = unit(captions[:, :12] + 0.1 * rng.standard_normal((len(captions), 12))).astype(np.float32)
    inputs = TrainInputs(captions, e_K, photos, e_K[:100])
    config = TrainConfig(modality_projection=True, language_projection=False, init="ridge-to-multilingual")
    heads, info = build_heads(inputs, config, anchor_rows=np.arange(300))
    assert info["modality_directions"] == 2 and heads.head_b.removed_directions == 2
    expected = modality_directions(captions, photos, english_rows=np.arange(300))
    assert np.array_equal(heads.head_b.removed.numpy(), expected)       # held-out captions 300.. not used
    export_heads_onnx(heads, tmp_path)                                  # raises beyond float32 rounding
    session = ort.InferenceSession(str(tmp_path / HEAD_B), providers=["CPUExecutionProvider"])
    x = photos[:4]
    moved = unit(x + 0.7 * expected.sum(axis=1)).astype(np.float32)
    run = lambda v: session.run([ONNX_OUTPUT], {ONNX_INPUT: v})[0].astype(np.float64)
    with torch.no_grad():
        exact = heads.head_b.double().eval()(torch.from_numpy(x).double()).numpy()
    # the ONNX head forgets an offset along the removed span: its output for the moved photos equals the exact
    # float64 head on the original photos (and it is a unit vector, so its error is bounded by float32 rounding)
    assert_within(run(moved), exact, 64 * gamma(heads.head_b.d_in * 4), "head_b.onnx on offset photos")
    paper = TrainConfig(**PAPER_START)
    assert paper.modality_projection is False and TrainConfig().modality_projection is True


# ---------------------------------------------------------------- the kernel Head_B

def sphere_relation(rng, n, d=8, d_y=6, curved=1.0, noise=0.05):
    """y = x M + curved * a bump around one direction + noise: a smooth relation, linear when curved = 0."""
    x = unit(rng.standard_normal((n, d)))
    centre = unit(rng.standard_normal((1, d)))[0]
    m = rng.standard_normal((d, d_y)) / np.sqrt(d)
    bump = 2.0 * np.exp(2.0 * (x @ centre - 1))[:, None] * rng.standard_normal((1, d_y))
    return x, x @ m + curved * bump + noise * rng.standard_normal((n, d_y))


def test_kernel_fit_chooses_by_held_out_error_and_minimises_its_objective():
    """An independent reference (explicit design matrices, the penalised least squares as one augmented lstsq
    per grid point) picks the same gamma and lambdas, and the refit on all rows reaches its minimum."""
    from uclip_cli import closed_form as cf

    rng = np.random.default_rng(2)
    x, y = sphere_relation(rng, 300)
    centres = x[:40]
    fitted = fit_kernel_map(x, y, centres)

    def objective_and_solution(rows, g, lam_lin, lam_k):
        a = kernel_design(x[rows], centres, g)
        penalty = np.zeros((a.shape[1],) * 2)
        penalty[:8, :8] = lam_lin * np.eye(8)
        penalty[8:48, 8:48] = lam_k * np.exp(2 * g * (centres @ centres.T - 1)) + 1e-9 * np.eye(40)
        values, vectors = np.linalg.eigh(penalty)                              # rootᵀ root = penalty
        root = (vectors * np.sqrt(np.clip(values, 0, None))).T                 # (the bias is not penalised)
        w = np.linalg.lstsq(np.vstack([a, root]), np.vstack([y[rows], np.zeros((len(root), y.shape[1]))]), rcond=None)[0]
        objective = lambda v: float(np.sum((a @ v - y[rows]) ** 2) + np.sum(v * (penalty @ v)))
        return objective, w

    order = np.random.default_rng(0).permutation(len(x))
    held, fit = np.sort(order[:30]), np.sort(order[30:])
    errors = {}
    for g in cf.KERNEL_GAMMAS:
        for lam_lin in cf.KERNEL_LINEAR_LAMBDAS:
            for lam_k in cf.KERNEL_LAMBDAS:
                _, w = objective_and_solution(fit, g, lam_lin, lam_k)
                errors[g, lam_lin, lam_k] = float(np.sum((kernel_design(x[held], centres, g) @ w - y[held]) ** 2))
    assert (fitted["gamma"], fitted["lambda_linear"], fitted["lambda_kernel"]) == min(errors, key=errors.get)
    objective, reference = objective_and_solution(np.arange(len(x)), fitted["gamma"], fitted["lambda_linear"],
                                                  fitted["lambda_kernel"])
    w = np.vstack([fitted["linear"], fitted["kernel"], fitted["bias"][None]])
    # the objective is flat at its minimum: two float64 solvers agree on its value far below any real difference
    assert objective(w) <= objective(reference) * (1 + 1e-9)


def test_the_kernel_head_fits_a_curved_relation_a_linear_map_cannot_and_costs_nothing_on_a_linear_one():
    rng = np.random.default_rng(3)
    for curved, must_win in ((1.0, True), (0.0, False)):
        x, y = sphere_relation(rng, 2400, curved=curved)
        train, test = slice(0, 2000), slice(2000, None)
        fitted = fit_kernel_map(x[train], y[train], x[:64])
        kernel = kernel_design(x[test], x[:64], fitted["gamma"]) @ np.vstack(
            [fitted["linear"], fitted["kernel"], fitted["bias"][None]])
        xa = np.hstack([x, np.ones((len(x), 1))])
        linear = xa[test] @ ridge(xa[train], y[train], 1e-3)
        err_kernel, err_linear = np.mean((kernel - y[test]) ** 2), np.mean((linear - y[test]) ** 2)
        if must_win:
            assert err_kernel < 0.5 * err_linear, (err_kernel, err_linear)
        else:   # the largest kernel penalty switches the kernel off: no worse than the linear map, within 5 %
            assert err_kernel <= 1.05 * err_linear, (err_kernel, err_linear)


def kernel_inputs(rng, n=600, d_clip=16, d_multi=12):
    e_K = unit(rng.standard_normal((n, d_multi))).astype(np.float32)
    curve = np.exp(3.0 * (e_K @ unit(rng.standard_normal((1, d_multi)))[0] - 1))[:, None]
    e_I = unit(np.hstack([e_K, curve * np.ones((1, d_clip - d_multi))]) + 0.05 * rng.standard_normal((n, d_clip)))
    photos = unit(e_I[:200] + 0.3).astype(np.float32)
    return TrainInputs(e_I.astype(np.float32), e_K, photos, e_K[:150])


def test_kernel_head_b_starts_as_its_closed_form_trains_saves_loads_and_exports(tmp_path):
    rng = np.random.default_rng(4)
    inputs = kernel_inputs(rng)
    config = TrainConfig(head_b="kernel", batch_size=64, epochs=2, device="cpu", language_projection=False)
    heads, info = build_heads(inputs, config, anchor_rows=np.arange(500))
    assert isinstance(heads.head_b, KernelHead) and heads.head_b.landmarks == 32       # 2 x d_clip
    assert info["head_b"] == "kernel, 32 landmarks" and info["gamma"] in (0.5, 1.0, 2.0)
    # the landmarks are training captions as Head_B sees them (normalised, after its removed subspace)
    with torch.no_grad():
        seen = torch.nn.functional.normalize(heads.head_b.prepare(torch.from_numpy(inputs.english_clip[:500])), dim=-1)
    nearest = (heads.head_b.centres @ seen.T).max(dim=1).values.double().numpy()
    assert_within(nearest, np.ones(32), 4 * gamma(16), "landmarks are training captions")

    result = train_heads(inputs, config)
    assert isinstance(result.heads.head_b, KernelHead) and result.start["head_b"] == "kernel, 32 landmarks"
    assert all(np.isfinite(e.train["total"]) for e in result.history)
    trained = result.heads.eval()
    save_heads(trained, tmp_path / "heads.safetensors", config=config)
    loaded, meta = load_heads(tmp_path / "heads.safetensors")
    assert meta["dims"]["head_b"] == "kernel" and meta["dims"]["landmarks"] == 32
    x = torch.from_numpy(inputs.image_memory[:9])
    with torch.no_grad():
        assert torch.equal(loaded.head_b(x), trained.head_b(x)) and torch.equal(loaded.head_a(x[:, :12]), trained.head_a(x[:, :12]))
    figures = export_heads_onnx(trained, tmp_path)        # raises when head_b.onnx is off by more than rounding
    assert figures[HEAD_B]["max_abs_diff"] <= figures[HEAD_B]["bound"]


def test_a_kernel_head_b_with_fewer_captions_than_landmarks_uses_every_caption():
    rng = np.random.default_rng(5)
    inputs = kernel_inputs(rng, n=20)
    heads, info = build_heads(inputs, TrainConfig(head_b="kernel", language_projection=False))
    assert heads.head_b.landmarks == 20 and info["head_b"] == "kernel, 20 landmarks"
    with pytest.raises(TrainConfigError, match="head_b='rbf'"):
        TrainConfig(head_b="rbf").validate()
