"""Heads: the paper's parameter count, BatchNorm handling, safetensors, ONNX parity, writing into a bundle."""
import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from uclip_cli.bundle import (HEAD_A, HEAD_B, HEADS_WEIGHTS, IMAGE_ENCODER, TEXT_MULTILINGUAL,
                              TOKENIZER_MULTILINGUAL, ImageSettings, TokenizerSettings, load_bundle,
                              write_manifest)
from uclip_cli.train.config import TrainConfig
from uclip_cli.train import heads as heads_module
from uclip_cli.train.heads import (HeadsError, ProjectionHead, UCLIPHeads, count_parameters, export_heads_onnx,
                                   load_heads, save_heads, write_heads_into_bundle)
from rounding import U32, assert_float32_run_of, assert_within, exact_inputs, gamma


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tiny matrices: one thread is fastest on shared cores


def trained_like(d_multi=12, d_clip=16, d_shared=8, seed=0):
    """Heads whose BatchNorm statistics and affine parameters are far from their initial values."""
    torch.manual_seed(seed)
    heads = UCLIPHeads(d_multi, d_clip, d_shared)
    heads.train()
    with torch.no_grad():
        for _ in range(20):
            heads.head_a(torch.randn(32, d_multi) * 3 + 1)
            heads.head_b(torch.randn(32, d_clip) * 0.5 - 2)
        for head in (heads.head_a, heads.head_b):
            head.net[1].weight.uniform_(0.5, 2.0)
            head.net[1].bias.uniform_(-1, 1)
    return heads.eval()


def test_paper_configuration_has_1743104_parameters():
    heads = UCLIPHeads(d_multi=384, d_clip=512)
    assert count_parameters(heads) == 1_743_104
    # Head_A 384->768->512, Head_B 512->1024->512, BatchNorm weight and bias counted, running stats not
    assert count_parameters(heads.head_a) == (384 * 768 + 768) + 2 * 768 + (768 * 512 + 512)
    assert count_parameters(heads.head_b) == (512 * 1024 + 1024) + 2 * 1024 + (1024 * 512 + 512)


def test_head_layers_and_unit_outputs():
    head = ProjectionHead(6, 4, hidden_mult=2)
    kinds = [type(m) for m in head.net]
    assert kinds == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    assert head.net[0].out_features == 12 and head.net[3].out_features == 4
    out = head(torch.randn(5, 6))
    # a float32 normalisation: a 4-term sum of squares, a root and a division per element
    assert_within(out.detach().double().norm(dim=-1).numpy(), 1.0, gamma(5) / 2 + 3 * U32, what="norms")


def test_eval_mode_uses_running_statistics_not_the_batch():
    heads = trained_like()
    x = torch.randn(4, 12)
    with torch.no_grad():
        alone = heads.head_a(x[:1])
        together = heads.head_a(x)[:1]
        batch_statistics = copy.deepcopy(heads.head_a).train()(x)[:1]   # what a train-mode export would give
    # in eval mode a row does not depend on its batch: alone and in a batch, the same exact value
    exact = assert_float32_run_of(alone.numpy(), copy.deepcopy(heads.head_a).double(), exact_inputs(x[:1]))
    assert_within(together.numpy(), exact.result.numpy(), exact.bound.numpy(), what="in a batch")
    assert np.abs(batch_statistics.numpy() - exact.result.numpy()).max() > 100 * exact.bound.numpy().max()


def test_safetensors_round_trip_keeps_weights_statistics_and_metadata(tmp_path):
    heads = trained_like()
    config = TrainConfig(epochs=3)
    save_heads(heads, tmp_path / HEADS_WEIGHTS, config=config, training_info={"captions": 42})
    loaded, meta = load_heads(tmp_path / HEADS_WEIGHTS)
    for (k, a), (k2, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert meta["dims"] == {"multilingual": 12, "clip": 16, "shared": 8, "hidden_mult": 2}
    assert TrainConfig.from_dict(meta["train_config"]) == config
    assert meta["training"] == {"captions": 42}
    assert not loaded.training
    raw = (tmp_path / HEADS_WEIGHTS).read_bytes()        # safetensors: u64 header size, JSON header, raw tensors
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["head_a.net.1.running_var"]["dtype"] == "F32"


def test_loading_a_non_heads_file_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(HeadsError, match="junk.safetensors is not a readable safetensors file"):
        load_heads(tmp_path / "junk.safetensors")
    with pytest.raises(HeadsError, match="missing.safetensors does not exist"):
        load_heads(tmp_path / "missing.safetensors")


def test_onnx_heads_match_pytorch_eval_mode(tmp_path):
    heads = trained_like()
    figures = export_heads_onnx(heads, tmp_path)
    assert set(figures) == {HEAD_A, HEAD_B}
    assert all(f["max_abs_diff"] <= f["bound"] for f in figures.values())
    for name, head, d in ((HEAD_A, heads.head_a, 12), (HEAD_B, heads.head_b, 16)):
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["features"]
        assert [o.name for o in session.get_outputs()] == ["embeddings"]
        exact = copy.deepcopy(head).double().eval()
        for batch in (1, 3, 33):
            x = torch.randn(batch, d)
            got = session.run(["embeddings"], {"features": x.numpy()})[0]
            assert_float32_run_of(got, exact, exact_inputs(x), what=f"{name} batch {batch}")
        assert not any(n.op_type == "BatchNormalization" for n in _onnx_nodes(tmp_path / name))  # folded


def test_the_parity_check_opens_both_heads_with_the_factory_it_is_given(tmp_path):
    from uclip_cli.sessions import CPU, SessionFactory

    opened = []

    class Recording(SessionFactory):
        def create_as_written(self, path):
            model = super().create_as_written(path)
            opened.append((model.name, model.providers))
            return model

    export_heads_onnx(trained_like(), tmp_path, sessions=Recording(device="auto", threads=1))
    assert sorted(opened) == [(HEAD_A, [CPU]), (HEAD_B, [CPU])]   # on the CPU, whatever the factory's device


def test_a_head_folded_with_another_epsilon_is_refused(tmp_path, monkeypatch):
    """A subtle export fault (BatchNorm folded with eps 1e-3, not the trained 1e-5) is beyond float32 rounding."""
    export_one = heads_module._export_one

    def folded_wrongly(head, path):
        wrong = copy.deepcopy(head)
        wrong.net[1].eps = 1e-3
        export_one(wrong, path)

    monkeypatch.setattr(heads_module, "_export_one", folded_wrongly)
    with pytest.raises(HeadsError, match="beyond float32 rounding"):
        export_heads_onnx(trained_like(), tmp_path)


def _onnx_nodes(path):
    import onnx
    return onnx.load(str(path)).graph.node


def make_bundle(directory, d_multi=12, d_clip=16):
    directory.mkdir()
    for name in (IMAGE_ENCODER, TEXT_MULTILINGUAL, TOKENIZER_MULTILINGUAL):
        (directory / name).write_bytes(name.encode())
    write_manifest(directory, sources={"clip": "test"}, dims={"clip": d_clip, "multilingual": d_multi, "shared": 8},
                   image=ImageSettings(), tokenizers={"multilingual": TokenizerSettings(TOKENIZER_MULTILINGUAL, 16)},
                   extra={"note": "kept"})
    return directory


def test_writing_heads_into_a_bundle_changes_its_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle_dir = make_bundle(tmp_path / "bundle")
    before = load_bundle(bundle_dir)
    assert not before.has_heads
    manifest = write_heads_into_bundle(trained_like(), bundle_dir, {"captions": 7}, config=TrainConfig())
    after = load_bundle(bundle_dir)                 # verifies every checksum
    assert after.has_heads and HEADS_WEIGHTS in after.files
    assert after.fingerprint != before.fingerprint
    assert after.image_fingerprint == before.image_fingerprint   # frozen image features stay valid
    assert manifest["training"]["captions"] == 7 and manifest["note"] == "kept"
    assert all(f["max_abs_diff"] <= f["bound"] for f in manifest["training"]["onnx_parity"].values())
    assert sorted(p.name for p in bundle_dir.iterdir() if p.name.startswith(".")) == []   # no temp leftovers
    # retraining gives other heads, hence another fingerprint
    write_heads_into_bundle(trained_like(seed=1), bundle_dir, {"captions": 8})
    assert load_bundle(bundle_dir).heads_fingerprint != after.heads_fingerprint
    loaded, meta = load_heads(bundle_dir / HEADS_WEIGHTS)
    assert meta["training"]["captions"] == 8


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_heads_safetensors_gets_the_mode_of_every_other_bundle_file(tmp_path, monkeypatch, umask):
    """Issue 19 item 8: safetensors created heads.safetensors 0600 while the bundle's other files were 0644."""
    import os
    import stat

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle_dir = make_bundle(tmp_path / "bundle")
    old = os.umask(umask)
    try:
        write_heads_into_bundle(trained_like(), bundle_dir, {})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in bundle_dir.iterdir()}
    assert modes[HEADS_WEIGHTS] == modes["head_a.onnx"] == modes["manifest.json"] == 0o666 & ~umask, modes


def test_heads_of_other_dimensions_are_refused_by_the_bundle(tmp_path):
    bundle_dir = make_bundle(tmp_path / "bundle", d_multi=384)
    with pytest.raises(HeadsError, match="multilingual encoder gives 384-d features but the heads take 12-d"):
        write_heads_into_bundle(trained_like(), bundle_dir, {})
    assert json.loads((bundle_dir / "manifest.json").read_text())["files"].keys() == {
        IMAGE_ENCODER, TEXT_MULTILINGUAL, TOKENIZER_MULTILINGUAL}
