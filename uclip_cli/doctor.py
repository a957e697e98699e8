"""`uclip doctor`: what really runs here, and whether the bundle is intact."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import bundle as B
from .encoders import Encoders
from .errors import UclipError
from .extras import install_command
from .text_precision import PRECISION_ENV, text_tower_choice
from .sessions import (USED_PROVIDERS, DeviceError, SessionFactory, conflicting_distributions_warning,
                       installed_ort_distributions)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checks": [c.__dict__ for c in self.checks], "warnings": self.warnings}


def run_doctor(bundle_path: Path, device: str = "auto", sessions: SessionFactory | None = None) -> DoctorReport:
    """The report. sessions: the factory that probes the providers and loads the bundle's graphs; None: a
    one-thread CPU factory probes (each provider is tried alone anyway) and SessionFactory(device=device) loads,
    made where its errors (an unknown --device, a bad $UCLIP_THREADS) become a failed check."""
    report = DoctorReport()
    report.add("python", True, sys.version.split()[0])
    dists = installed_ort_distributions()
    report.add("onnxruntime", bool(dists), ", ".join(f"{k} {v}" for k, v in dists.items())
               or f"not installed: {install_command('cpu')}")
    if warning := conflicting_distributions_warning():
        report.warnings.append(warning)
    if dists:
        prober = sessions if sessions is not None else SessionFactory(device="cpu", threads=1)
        for provider, state in prober.probe(USED_PROVIDERS).items():   # only what --device can use
            report.add(f"provider {provider}", True, state)
    try:
        bundle = B.load_bundle(bundle_path, verify=False)
    except B.BundleError as e:
        report.add("bundle", False, str(e))
        return report
    report.add("bundle", True, f"{bundle.path} (fingerprint {bundle.fingerprint}, sources: "
               + ", ".join(f"{k}={v}" for k, v in bundle.manifest.get("sources", {}).items()) + ")")
    states = B.verify_bundle(bundle)
    bad = {k: v for k, v in states.items() if v != "ok"}
    report.add("bundle checksums", not bad, f"{len(states)} files ok" if not bad else
               "; ".join(f"{k}: {v} ({B.restore_advice(k)})" for k, v in sorted(bad.items())))
    report.add("heads", True, "trained: queries in any language" if bundle.has_heads else
               "not trained: English text and image queries only; run `uclip train` for other languages")
    if bad or not dists:
        return report
    # Every graph the bundle lists is opened as a command opens it: Encoders.model checks the graph's inputs
    # and outputs against the bundle's signature (sessions.check_signature), so another valid graph put in a
    # file's place with the manifest re-hashed fails here as it fails in `uclip query`.
    try:
        encoders = Encoders(bundle, sessions if sessions is not None else SessionFactory(device=device),
                            text_precision="auto")   # as queries run it
        loaded = True
        for graph in (g for g in (B.TEXT_MULTILINGUAL, B.IMAGE_ENCODER, B.TEXT_CLIP, B.HEAD_A, B.HEAD_B)
                      if g in bundle.files):
            try:
                providers = encoders.model(graph).providers
            except DeviceError:
                raise
            except UclipError as e:
                report.add(f"session {graph}", False, str(e))
                loaded = False
                continue
            report.add(f"session {graph}", True, f"runs on {', '.join(providers)} (--device {device})")
        if loaded and (tower := encoders.query_text_tower()):
            report.add("text tower precision", True, text_precision_detail(encoders, tower))
    except DeviceError as e:
        report.add(f"session ({device})", False, str(e))
        return report
    if not loaded:
        return report
    if bundle.has_heads:
        ok, detail = heads_trained_on_these_encoders(bundle)
        report.add("heads trained on these encoders", ok, detail)
    if bundle.has_heads and bundle.has_clip_text:
        hits, total, warning = probe_text_alignment(encoders)
        report.add("English probe alignment", True, f"{hits}/{total} probe sentences matched across the two text towers (chance: 1)")
        if warning:
            report.warnings.append(warning)
    return report


def text_precision_detail(encoders: Encoders, tower: str) -> str:
    """Which precision text queries run here and why (text_precision.py: measured once per machine, remembered)."""
    choice = encoders.text_choices.get(tower) or text_tower_choice(encoders.bundle, tower, encoders.sessions)
    detail = f"queries run {tower} in {choice.describe()}"
    if encoders.bundle.int8_twin(tower) is None:
        detail += "; `uclip export --quantize int8-beside` adds an int8 twin, used where it is faster"
    elif choice.file != tower:
        detail += f", file {choice.file}"
    return detail + f" (${PRECISION_ENV}=fp32|int8 forces one)" + fusion_detail(encoders.bundle, tower)


def fusion_detail(bundle: B.Bundle, tower: str) -> str:
    """Whether the tower's layers run as fused kernels (export/fuse.py, tower_fusion.py), from the manifest."""
    export = bundle.manifest.get("export") or {}
    records = export.get("fusion") or (export.get("assembled") or {}).get("fusion") or {}
    record = records.get(tower)
    if not record:
        return ""
    if record.get("fused"):
        return "; its layers run as fused kernels (checked within float32 rounding when the bundle was made)"
    return f"; its layers are not fused: {record.get('why', 'unknown')}"


def heads_trained_on_these_encoders(bundle: B.Bundle) -> tuple[bool, str]:
    """The heads' training record names the sha256 of the towers whose features it used."""
    training = bundle.manifest.get("training") or {}
    recorded = training.get("encoders")
    if not recorded:
        return True, "unknown: the heads' training record names no encoders"
    changed = sorted(name for name, digest in recorded.items() if bundle.files.get(name) != digest)
    if changed:
        return False, (f"the heads were trained with other {', '.join(changed)}: "
                       "run `uclip train` again with this bundle")
    sources = training.get("feature_sources") or {}
    from_files = sorted(k for k, v in sources.items() if "files" in v)
    suffix = f" (precomputed features for {', '.join(from_files)}: not checkable)" if from_files else ""
    return True, "yes: " + ", ".join(sorted(recorded)) + suffix


# English captions of everyday photos: the two text towers, through their heads, should agree on them.
PROBE_CAPTIONS = (
    "a dog running on a sandy beach", "two cats sleeping on a red sofa", "a bowl of fruit on a wooden table",
    "a man riding a bicycle in the city", "a snowy mountain under a blue sky", "children playing football in a park",
    "a plate of pasta with tomato sauce", "an old church with a tall tower", "a sailboat on a calm lake at sunset",
    "a woman reading a book in a cafe", "a red car parked on a street", "a bird sitting on a tree branch",
    "a birthday cake with candles", "a train crossing a bridge", "a horse grazing in a green field",
    "a laptop and a cup of coffee on a desk",
)


def probe_text_alignment(encoders: Encoders) -> tuple[int, int, str | None]:
    """How many English probes Head_A(multilingual(s)) pairs with Head_B(CLIP text(s)) of the same s.

    uCLIP's L_text trains exactly this match, so well-trained heads on the towers they were trained with
    pair most probes; heads trained on other encoders pair about 1 in 16, by chance. A low count is a
    warning, not a failure: heads trained briefly or on little data also score low.
    """
    captions = list(PROBE_CAPTIONS)
    multi = encoders.project_multilingual(encoders.multilingual_features(captions))
    clip = encoders.project_image(encoders.clip_text_features(captions))   # Head_B serves CLIP text and images alike
    hits = int((np.argmax(multi @ clip.T, axis=1) == np.arange(len(captions))).sum())
    warning = None
    if hits < len(captions) // 4:
        warning = (f"only {hits}/{len(captions)} English probe sentences match across the two text towers: the heads were "
                   "trained briefly, on little data, or with other encoders; multilingual search will be weak")
    return hits, len(captions), warning
