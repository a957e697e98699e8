"""The one place that creates ONNX Runtime sessions: provider choice, honest fallback reporting, threads."""
from __future__ import annotations

import onnxruntime as ort
import pytest

from cli_helpers import invoke_uclip, uclip_env
from uclip_cli import bundle as B
from uclip_cli import sessions as S
from uclip_cli.extras import install_command


def test_provider_chains_follow_the_device_choice(monkeypatch):
    assert S.requested_providers("cpu") == [S.CPU]
    listed = [S.TENSORRT, S.CUDA, S.CPU]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    assert S.requested_providers("cuda") == [S.CUDA, S.CPU]
    assert S.requested_providers("tensorrt") == [S.TENSORRT, S.CUDA, S.CPU]
    assert S.requested_providers("auto") == [S.TENSORRT, S.CUDA, S.CPU]
    listed.remove(S.TENSORRT)
    with pytest.raises(S.DeviceError, match="--device tensorrt: .* has no TensorrtExecutionProvider"):
        S.requested_providers("tensorrt")
    monkeypatch.undo()
    auto = S.requested_providers("auto")
    assert auto[-1] == S.CPU
    assert all(p in ort.get_available_providers() for p in auto)   # only what this onnxruntime lists
    with pytest.raises(S.DeviceError, match="--device 'gpu'"):
        S.requested_providers("gpu")


def test_cpu_session_reports_the_provider_that_really_runs(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = S.SessionFactory(device="cpu", threads=1).create(tiny_bundle / B.TEXT_MULTILINGUAL)
    assert model.providers == [S.CPU]
    assert model.session.get_session_options().intra_op_num_threads == 1
    assert set(model.input_names) == {"input_ids", "attention_mask"}


def _cuda_works() -> bool:
    return S.CUDA in ort.get_available_providers() and S.SessionFactory(device="cpu").probe().get(S.CUDA) == "ok"


@pytest.mark.skipif(_cuda_works(), reason="this machine has a working CUDA provider")
def test_a_gpu_asked_for_and_not_obtained_is_an_error_not_a_silent_fallback(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(S.DeviceError) as raised:
        S.SessionFactory(device="cuda").create(tiny_bundle / B.TEXT_MULTILINGUAL)
    message = str(raised.value)
    assert "\n" not in message and "cuda" in message.lower()


def test_fallback_check_distinguishes_auto_from_an_explicit_gpu():
    notes: list[str] = []
    auto = S.SessionFactory(device="auto", log=notes.append)
    auto._check("m.onnx", [S.CUDA, S.CPU], [S.CPU])              # listed, did not load: said, not fatal
    assert notes and "CUDAExecutionProvider" in notes[0] and "CPUExecutionProvider" in notes[0]
    for device, wanted in (("cuda", [S.CUDA, S.CPU]), ("tensorrt", [S.TENSORRT, S.CUDA, S.CPU])):
        with pytest.raises(S.DeviceError, match=f"--device {device} was asked for"):
            S.SessionFactory(device=device)._check("m.onnx", wanted, [S.CPU])
    S.SessionFactory(device="cuda")._check("m.onnx", [S.CUDA, S.CPU], [S.CUDA, S.CPU])   # obtained: fine


def test_two_onnxruntime_distributions_are_reported(monkeypatch):
    monkeypatch.setattr(S, "installed_ort_distributions", lambda: {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"})
    warning = S.conflicting_distributions_warning()
    assert "onnxruntime 1.20.0" in warning and "onnxruntime-gpu 1.20.0" in warning
    assert install_command("cpu") in warning and install_command("gpu") in warning
    monkeypatch.setattr(S, "installed_ort_distributions", lambda: {"onnxruntime": "1.20.0"})
    assert S.conflicting_distributions_warning() is None


def test_probe_loads_a_real_graph_on_the_cpu():
    assert S.SessionFactory(device="cpu").probe()[S.CPU] == "ok"


def test_bad_thread_setting_is_a_one_line_error(tmp_path, tiny_bundle):
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    env["UCLIP_THREADS"] = "many"
    assert "UCLIP_THREADS" in invoke_uclip(["query", "a dog"], env).one_line_error()


def test_query_with_an_unavailable_gpu_fails_in_one_line(tmp_path, tiny_bundle):
    if _cuda_works():
        pytest.skip("this machine has a working CUDA provider")
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    photos = tmp_path / "photos"
    photos.mkdir()
    invoke_uclip(["index", photos, "--no-progress", "--device", "cpu"], env).ok()
    assert "cuda" in invoke_uclip(["query", "a dog", "--device", "cuda"], env).one_line_error().lower()


def test_a_factory_takes_its_default_thread_count_from_the_variable_threads_py_names(monkeypatch):
    from uclip_cli import threads as T

    monkeypatch.setenv(T.THREADS_ENV, "3")
    assert S.SessionFactory(device="cpu").threads == 3
    assert S.SessionFactory(device="cpu", threads=2).threads == 2    # an explicit count wins
    monkeypatch.setenv(T.THREADS_ENV, "lots")
    with pytest.raises(S.DeviceError, match=f"{T.THREADS_ENV}='lots' is not a whole number"):
        S.SessionFactory(device="cpu")


def test_encoders_take_the_factory_they_are_given_and_make_none_of_their_own(tiny_bundle, tmp_path, monkeypatch):
    from uclip_cli.encoders import Encoders

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bundle = B.load_bundle(tiny_bundle)
    factory = S.SessionFactory(device="cpu", threads=1)
    encoders = Encoders(bundle, factory)
    assert encoders.sessions is factory
    assert encoders.model(B.TEXT_CLIP).session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(TypeError, match="SessionFactory"):
        Encoders(bundle, None)


def test_request_sessions_spin_only_inside_a_run_and_others_never():
    """`uclip serve` and `uclip query` answer one request at a time: their threads spin between a run's kernels
    and stop when it ends, so the search after the text tower has the cores; indexing threads never spin
    (decoding threads need those cores)."""
    import onnxruntime as ort

    served = S.SessionFactory(device="cpu", requests=True)._options(ort)
    assert served.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert served.get_session_config_entry("session.force_spinning_stop") == "1"
    indexing = S.SessionFactory(device="cpu")._options(ort)
    assert indexing.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_query_asks_for_request_sessions_and_index_does_not(tmp_path, tiny_bundle, monkeypatch):
    """The CLI gives `uclip query` request sessions and `uclip index` the sleeping kind (in process: the factory
    each command made is recorded)."""
    made = []
    real = S.SessionFactory._options

    def recording(self, ort_module):
        made.append(self.requests)
        return real(self, ort_module)

    monkeypatch.setattr(S.SessionFactory, "_options", recording)
    env = uclip_env(tmp_path, bundle=tiny_bundle, index=tmp_path / "index")
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 40, 40)).save(photos / "red.jpg")
    invoke_uclip(["index", photos, "--no-progress", "--device", "cpu"], env).ok()
    indexed, made[:] = list(made), []
    invoke_uclip(["query", "a dog", "--device", "cpu"], env).ok()
    assert indexed and not any(indexed)
    assert made and all(made)
