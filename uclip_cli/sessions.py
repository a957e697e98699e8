"""The one place that creates ONNX Runtime sessions.

Every session uclip makes is made by a SessionFactory that its caller passes down (a command's --device
and --threads, a query's one-shot factory, a test's recording subclass), never one a library builds for
itself: `create` (a bundle's graph, through its optimised copy), `create_graph` (a graph built in
memory), `create_as_written` (a file just written, judged on the CPU: the export's and training's parity
checks), `inspect` (a published graph's inputs and outputs) and `probe` (does each provider load).
tests/test_session_origin.py counts the sessions made anywhere else while the commands run: none.

Provider order is TensorRT -> CUDA -> CPU for `--device auto`.  onnxruntime-gpu lists CUDA and TensorRT
as *available* even where their libraries cannot load, then silently runs on the CPU; so after creating a
session we read `session.get_providers()` (what really loaded) and compare it with what was asked.
An explicitly requested GPU that did not load is an error, never a silent fallback.

uclip sends nothing anywhere. onnxruntime's official builds carry telemetry (on Linux since 1.2x: a
persistent device id under $XDG_CACHE_HOME/Microsoft/DeveloperTools, and uploads): it is switched off
before onnxruntime is first imported (`uclip_cli/__init__.py` sets ORT_DISABLE_TELEMETRY, the
documented opt-out that keeps it from initialising at all) and again at run time with
`onnxruntime.disable_telemetry_events()`.

`SessionFactory.create(path, expect=...)` compares the graph's inputs and outputs with what the bundle's
manifest says the graph takes and gives (`Bundle.signature`), so a graph swapped for another is refused
in one line before it runs.
"""
from __future__ import annotations

from .errors import UclipError

import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import cache_dir
from .onnx_bytes import FLOAT, single_node_model
from .filecache import DerivedFolder
from .threads import THREADS_ENV   # the variable is threads.py's; a factory reads it for its default

DEVICES = ("auto", "cpu", "cuda", "tensorrt")
TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-silicon")
OPTIMIZED_CACHE = "onnx-optimized"   # under cache_dir(): optimised copies of graphs for one-shot sessions
OPTIMIZED_MODEL = "model.onnx"
OPTIMIZED_WEIGHTS = "model.onnx.data"


class DeviceError(UclipError):
    """The execution provider that was asked for could not be used."""


class GraphMismatchError(UclipError):
    """A graph whose inputs or outputs are not those the bundle's manifest describes."""


def _ort():
    from . import TELEMETRY_OPT_OUT

    for name, value in TELEMETRY_OPT_OUT.items():   # in case onnxruntime was not yet imported: before it is
        os.environ.setdefault(name, value)
    try:
        import onnxruntime
        onnxruntime.InferenceSession   # noqa: B018 - a half-overwritten install imports but lacks this
    except (ImportError, AttributeError):
        from .extras import missing_extra_message

        raise DeviceError(conflicting_distributions_warning()
                          or missing_extra_message("cpu", "uclip", "onnxruntime")) from None
    disable = getattr(onnxruntime, "disable_telemetry_events", None)
    if disable is not None:
        disable()
    return onnxruntime


def installed_ort_distributions() -> dict[str, str]:
    """name -> version of every onnxruntime distribution installed (more than one breaks them all)."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def conflicting_distributions_warning() -> str | None:
    found = installed_ort_distributions()
    if len(found) > 1:
        names = ", ".join(f"{k} {v}" for k, v in found.items())
        from .extras import install_command

        return (f"several onnxruntime distributions are installed ({names}); they share one folder and break each "
                f"other: pip uninstall {' '.join(found)}, then install only one: {install_command('cpu')} "
                f"or {install_command('gpu')}")
    return None


def requested_providers(device: str) -> list[str]:
    """The provider chain to ask for, in priority order."""
    if device not in DEVICES:
        raise DeviceError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU]
    available = set(_ort().get_available_providers())
    if device in ("cuda", "tensorrt"):
        primary = CUDA if device == "cuda" else TENSORRT
        if primary not in available:
            installed = ", ".join(f"{k} {v}" for k, v in installed_ort_distributions().items()) or "no onnxruntime"
            from .extras import install_command

            raise DeviceError(f"--device {device}: this onnxruntime ({installed}) has no {primary}: "
                              f"pip uninstall onnxruntime, then {install_command('gpu')} (onnxruntime-gpu); "
                              "or use --device cpu")
        return [TENSORRT, CUDA, CPU] if device == "tensorrt" else [CUDA, CPU]
    return [p for p in (TENSORRT, CUDA, CPU) if p in available or p == CPU]


def _provider_options(provider: str) -> dict[str, Any]:
    if provider == TENSORRT:
        engines = cache_dir() / "tensorrt"
        engines.mkdir(parents=True, exist_ok=True)
        return {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engines),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(engines),
            "trt_fp16_enable": False,
        }
    return {}


@dataclass
class OrtModel:
    """A loaded ONNX graph and the providers that really run it."""

    name: str
    session: Any
    providers: list[str]
    input_names: list[str] = field(default_factory=list)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, feeds)[0]


def optimized_copy(ort: Any, source: Path, options: Any, *, thorough: bool = False) -> Path | None:
    """An optimised copy of the graph at `source` in the user's cache dir (written on first use), or None.

    onnxruntime saves it itself, optimised up to ORT_ENABLE_EXTENDED (not hardware-specific; the layout
    level is applied again at load) with every weight in a separate file, which it memory-maps at load:
    a later session parses no weights and reads only the pages it touches (a query touches a few rows
    of a 384 MB embedding table). See filecache.DerivedFolder for keying and atomic publishing.
    """
    try:
        folder = DerivedFolder.of(OPTIMIZED_CACHE, source, ort.__version__)
    except OSError:
        return None

    def write(tmp: Path) -> None:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(tmp / OPTIMIZED_MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPTIMIZED_WEIGHTS)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(folder.source), sess_options=options, providers=[CPU])

    if folder.ready(thorough):
        return folder.file(OPTIMIZED_MODEL)
    folder.discard()   # absent, or damaged since it was written: build it afresh
    return folder.file(OPTIMIZED_MODEL) if folder.build(write) else None


def _discard_optimized_copy(ort: Any, source: Path) -> None:
    try:
        DerivedFolder.of(OPTIMIZED_CACHE, source, ort.__version__).discard()
    except OSError:
        pass


@dataclass
class SessionFactory:
    """Creates sessions for one device choice; inject a different factory in tests.

    On the CPU every session loads the graph's optimised copy (`optimized_copy`, written on first use),
    and idle threads sleep instead of spinning on cores that decoding threads or the search need.
    one_shot: the sessions serve a short-lived process (a query): skip weight prepacking, which pays
    off only over many runs.
    thorough_cache: check the optimised copy's sha256 before using it, not only its sizes (default: unless
    one_shot; a read-only query takes the size check, every command whose output is kept the full one).
    requests: the sessions answer one request at a time, as `uclip serve` and `uclip query` do: a run's
    threads wait for its next kernel by spinning and stop spinning when the run ends (onnxruntime's
    force_spinning_stop), so the search after the text tower has the cores to itself. A 17-token call of
    a 12-layer multilingual tower on 2 threads: 14.9 -> 14.3 ms (2-core AVX2 EPYC, issue 22).
    """

    device: str = "auto"
    threads: int | None = None
    log: Callable[[str], None] | None = None
    one_shot: bool = False
    thorough_cache: bool | None = None
    requests: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise DeviceError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.threads is None and os.environ.get(THREADS_ENV):
            try:
                self.threads = int(os.environ[THREADS_ENV])
            except ValueError:
                raise DeviceError(f"${THREADS_ENV}={os.environ[THREADS_ENV]!r} is not a whole number") from None

    def create(self, path: Path, expect: dict | None = None) -> OrtModel:
        """A session for the graph at `path`; `expect` ({"inputs"|"outputs": {name: (type, shape)}}, None = any
        size) is checked against the graph's own inputs and outputs (GraphMismatchError naming the file)."""
        ort = _ort()
        wanted = requested_providers(self.device)
        providers = [(p, _provider_options(p)) for p in wanted]
        session = None
        thorough = (not self.one_shot) if self.thorough_cache is None else self.thorough_cache
        copy = optimized_copy(ort, Path(path), self._options(ort), thorough=thorough) if wanted == [CPU] else None
        if copy is not None:
            try:
                session = ort.InferenceSession(str(copy), sess_options=self._options(ort), providers=providers)
            except Exception:  # noqa: BLE001 - a damaged copy: drop it and load the bundle's own graph
                _discard_optimized_copy(ort, Path(path))
        if session is None:
            try:
                session = ort.InferenceSession(str(path), sess_options=self._options(ort), providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                conflict = conflicting_distributions_warning()
                raise DeviceError(f"cannot load {path} with {', '.join(wanted)}: {first}"
                                  + (f"; {conflict}" if conflict else "")) from None
        actual = list(session.get_providers())
        self._check(path, wanted, actual)
        if expect is not None:
            check_signature(session, expect, Path(path))
        return OrtModel(Path(path).name, session, actual, [i.name for i in session.get_inputs()])

    def create_graph(self, graph: bytes, name: str) -> OrtModel:
        """A CPU session for a graph built in memory (the exact search's integer kernel, onnx_bytes).

        Always the CPU provider (such graphs serve CPU-side work), no optimised copy (nothing to save).
        Raises DeviceError when onnxruntime is missing or cannot load the graph.
        """
        ort = _ort()
        try:
            session = ort.InferenceSession(graph, sess_options=self._options(ort), providers=[CPU])
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeviceError(f"cannot load the built-in graph {name}: {first}") from None
        return OrtModel(name, session, list(session.get_providers()), [i.name for i in session.get_inputs()])

    def create_reference(self, graph: bytes, name: str) -> OrtModel:
        """A CPU session that runs a graph built in memory exactly as written: no graph optimisation (no fusion,
        no constant folding), for the float64 reference of a published graph (onnx_rounding.py).
        Raises DeviceError when onnxruntime is missing or cannot load the graph."""
        ort = _ort()
        options = self._options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(graph, sess_options=options, providers=[CPU])
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeviceError(f"cannot load {name}: {first}") from None
        return OrtModel(name, session, list(session.get_providers()), [i.name for i in session.get_inputs()])

    def create_as_written(self, path: Path) -> OrtModel:
        """A CPU session on the graph file at `path` itself: no optimised copy, no provider choice.

        For the checks of a graph just written (export's parity against PyTorch and int8 against fp32,
        a trained head against its float64 twin): they judge that very file's arithmetic on the CPU,
        whatever --device the run was given, and an optimised copy of a staging file would be cached
        for nothing. Raises DeviceError when onnxruntime is missing or cannot load the file.
        """
        ort = _ort()
        try:
            session = ort.InferenceSession(str(path), sess_options=self._options(ort), providers=[CPU])
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DeviceError(f"cannot load {path}: {first}") from None
        return OrtModel(Path(path).name, session, list(session.get_providers()), [i.name for i in session.get_inputs()])

    def probe(self, providers: tuple[str, ...] | None = None) -> dict[str, str]:
        """Each provider onnxruntime lists (among `providers` when given), and whether it really loads a trivial
        graph: "ok" or the reason (`uclip doctor`; each provider is tried alone, whatever this factory's device)."""
        ort = _ort()
        graph = _identity_model_bytes()
        result = {}
        for provider in ort.get_available_providers():
            if providers is not None and provider not in providers:
                continue
            try:
                s = ort.InferenceSession(graph, sess_options=self._options(ort),
                                         providers=[(provider, _provider_options(provider))])
                got = s.get_providers()
                result[provider] = "ok" if provider in got else f"listed, but falls back to {got[0]}"
            except Exception as e:  # onnxruntime raises its own exception types
                result[provider] = f"fails: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        return result

    def inspect(self, path: Path) -> dict[str, list[tuple[str, str, list[int | str | None]]]]:
        """A graph's inputs and outputs as (name, element type, dims), read by a CPU session that is not kept
        (graphs published by others are read before a manifest can describe them: assemble.py)."""
        ort = _ort()
        options = self._options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=[CPU])
        except Exception as e:  # onnxruntime raises its own exception types
            raise DeviceError(f"cannot load {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        return {kind: [(arg.name, arg.type, list(arg.shape or [])) for arg in args]
                for kind, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs()))}

    def _options(self, ort: Any) -> Any:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if self.requests:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            options.add_session_config_entry("session.force_spinning_stop", "1")
        else:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.one_shot:
            options.add_session_config_entry("session.disable_prepacking", "1")
        return options

    def _check(self, path: Path, wanted: list[str], actual: list[str]) -> None:
        primary = wanted[0]
        if primary in actual:
            return
        if self.device in ("cuda", "tensorrt"):
            raise DeviceError(
                f"--device {self.device} was asked for but onnxruntime loaded only {', '.join(actual)} for {Path(path).name} "
                "(missing CUDA/cuDNN/TensorRT libraries, or the CPU-only onnxruntime package): run `uclip doctor`, or use --device cpu"
            )
        if self.log:
            self.log(f"note: {Path(path).name} runs on {actual[0]} ({primary} was listed but did not load)")


_ELEMENT_TYPES = {"float": "tensor(float)", "int64": "tensor(int64)", "int32": "tensor(int32)"}


def check_signature(session: Any, expect: dict, path: Path) -> None:
    """GraphMismatchError unless the session's inputs and outputs are the expected names, types and sizes."""
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        wanted = expect.get(kind, {})
        got = {arg.name: arg for arg in actual}
        if set(got) != set(wanted):
            raise GraphMismatchError(
                f"{path} has {kind} {sorted(got)}, but the bundle's manifest says {path.name} has {sorted(wanted)}: "
                "its graphs are swapped or damaged; pull or export the bundle again")
        for name, (element, shape) in wanted.items():
            arg = got[name]
            dims = list(arg.shape or [])
            ok = arg.type == _ELEMENT_TYPES[element] and len(dims) == len(shape) and all(
                want is None or not isinstance(dim, int) or dim == want for dim, want in zip(dims, shape))
            if not ok:
                shown = ["?" if d is None else d for d in shape]
                raise GraphMismatchError(
                    f"{path}: {kind[:-1]} {name} is {arg.type} {dims}, but the bundle's manifest says {element} {shown}: "
                    "its graphs are swapped or the manifest does not describe them; pull or export the bundle again")


USED_PROVIDERS = (TENSORRT, CUDA, CPU)   # the providers --device can pick; others (Azure, ...) never run uclip's graphs


def _identity_model_bytes() -> bytes:
    """A minimal ONNX graph, y = x + x, for probing providers without the bundle."""
    return single_node_model("Add", [("x", FLOAT, [1]), ("x", FLOAT, [1])], ("y", FLOAT, [1]), "probe")
