"""The default model's heads, fitted on this machine in closed form from the captions uclip ships.

No torch: the towers run under ONNX Runtime (encoders.py), the fit is numpy (closed_form.py,
subspaces.py), the heads are written as ONNX graphs by hand (head_graphs.py). The function is
`uclip train`'s closed-form default, so a later `uclip train` starts from the same kind of heads:

    Head_A(x) = normalise(normalise(x - x Q Qᵀ) E)      Q: span of the English and 35 language means,
                                                         E: the multilingual space embedded in the shared one
    Head_B(v) = normalise((z L + k(z) W + b) E),  z = normalise(v)
                                                         L, W, b: kernel ridge regression of the anchors'
                                                         Head_A space on their CLIP text features

Anchors: the English captions of the shipped half of XM3600 (1,800), each through both text towers;
the language means: `foreign_per_language` captions of each other language (of the same shipped
images: the method never uses which caption pairs with which, and the means need no pairing).
Each graph is compared with its exact float64 function on the anchors before it is installed.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import bundle as B
from .captions import SOURCE, shipped_captions, shipped_languages
from .closed_form import fit_kernel_map, landmarks_of, shared_embedding
from .head_graphs import KernelHead, LinearHead, check_graph
from .subspaces import language_directions

Log = Callable[[str], Any]
ENCODE_CHUNK = 64


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _remove(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    return _unit(x - (x @ basis) @ basis.T)


def fit_heads(english_clip: np.ndarray, english_multi: np.ndarray, foreign: np.ndarray, foreign_language: np.ndarray,
              *, d_shared: int = 512, landmarks_per_dim: int = 2,
              kernel_scale: float = 1.0) -> tuple[LinearHead, KernelHead, dict[str, Any]]:
    """Both heads from the anchors' features in the two text spaces and a foreign memory grouped by language
    (kernel_scale: closed_form.fit_kernel_map's)."""
    e_I, e_K = _unit(english_clip), _unit(english_multi)
    removed = language_directions(e_K, foreign, foreign_language).astype(np.float64)
    prepared = _remove(e_K, removed)                         # Head_A's input after the language subspace
    embed = shared_embedding(prepared, d_shared)
    head_a = LinearHead(removed, embed)
    count = min(landmarks_per_dim * e_I.shape[1], len(e_I))
    centres = e_I[landmarks_of(np.arange(len(e_I)), count)]
    fitted = fit_kernel_map(e_I, prepared, centres, kernel_scale)
    head_b = KernelHead(None, centres, fitted["gamma"], fitted["linear"] @ embed, fitted["kernel"] @ embed,
                        fitted["bias"] @ embed)
    info = {"language_directions": int(removed.shape[1]), "landmarks": int(count),
            **{k: float(fitted[k]) for k in ("gamma", "lambda_linear", "lambda_kernel")}}
    return head_a, head_b, info


def _encode(encode, texts: list[str], label: str, progress: bool) -> np.ndarray:
    from .progress import Progress

    bar = Progress(label, len(texts), unit="captions", enabled=progress)
    order = np.argsort([len(t) for t in texts], kind="stable")   # similar lengths together: less padding
    out = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        out.append(encode([texts[i] for i in order[start:start + ENCODE_CHUNK]]))
        bar.advance(len(out[-1]))
    bar.close()
    features = np.empty((len(texts), out[0].shape[1]), np.float32)
    features[order] = np.concatenate(out)
    return features


def fit_and_install_heads(destination: Path, recipe, sessions, *, progress: bool, log: Log) -> dict[str, Any]:
    """Encode the shipped captions with the bundle's towers, fit both heads, check and install them."""
    from .encoders import Encoders

    plan = recipe.heads
    started = time.monotonic()
    bundle = B.load_bundle(destination, verify="full")
    encoders = Encoders(bundle, sessions)
    anchors = shipped_captions(plan.anchor_language)
    languages = [lang for lang in shipped_languages() if lang != plan.anchor_language]
    foreign_texts = {lang: shipped_captions(lang)[:plan.foreign_per_language] for lang in languages}
    log(f"fitting the heads: {len(anchors):,} English captions through both text towers, "
        f"{sum(map(len, foreign_texts.values())):,} captions in {len(languages)} other languages ({SOURCE})")
    english_clip = _encode(encoders.clip_text_features, anchors, "encode English captions (CLIP text tower)", progress)
    foreign_all = [t for lang in languages for t in foreign_texts[lang]]
    multi = _encode(encoders.multilingual_features, anchors + foreign_all, "encode captions (multilingual tower)", progress)
    english_multi, foreign = multi[:len(anchors)], multi[len(anchors):]
    labels = np.repeat(np.arange(len(languages)), [len(foreign_texts[lang]) for lang in languages])
    head_a, head_b, fitted = fit_heads(english_clip, english_multi, foreign, labels, d_shared=plan.d_shared,
                                       landmarks_per_dim=plan.landmarks_per_dim)
    parity = {}
    with tempfile.TemporaryDirectory(dir=destination, prefix=".heads-") as tmp:
        files = {}
        for name, head, inputs in ((B.HEAD_A, head_a, english_multi), (B.HEAD_B, head_b, english_clip)):
            graph = head.graph(name.removesuffix(".onnx"))
            model = sessions.create_graph(graph, name)
            try:
                parity[name] = check_graph(head, lambda x, m=model, n=model.input_names[0]: m.run({n: x}), inputs[:64])
            except ValueError as e:
                raise B.BundleError(f"the fitted {name} {e}: not installed; please report this") from None
            files[name] = Path(tmp) / name
            files[name].write_bytes(graph)
        training = {
            "method": "closed form (uclip's default without the modality projection), fitted when the default model "
                      "was assembled",
            "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": {"captions": f"{SOURCE}: {plan.anchor_language} captions",
                       "foreign_memory": f"{SOURCE}: up to {plan.foreign_per_language} captions per language"},
            "sizes": {"captions": len(anchors), "foreign_memory": len(foreign_all)},
            "foreign_languages": {lang: len(foreign_texts[lang]) for lang in languages},
            "start": {"head_a": "multilingual space, language subspace removed", "head_b": "kernel", **fitted},
            "encoders": {name: bundle.files[name] for name in (B.IMAGE_ENCODER, B.TEXT_CLIP, B.TEXT_MULTILINGUAL)},
            "onnx_parity": parity,
            "device": ", ".join(sorted({p for ps in encoders.loaded_providers().values() for p in ps[:1]})),
            "seconds": round(time.monotonic() - started, 1),
        }
        B.install_files(destination, files, extra={"training": training})
    log(f"heads fitted and installed in {time.monotonic() - started:.0f} s: queries in any language from now on")
    return training

