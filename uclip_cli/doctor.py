"""`uclip doctor`: what really runs here, and whether the bundle is intact."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import bundle as B
from .sessions import DeviceError, SessionFactory, conflicting_distributions_warning, installed_ort_distributions, probe_providers


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


def run_doctor(bundle_path: Path, device: str = "auto") -> DoctorReport:
    report = DoctorReport()
    report.add("python", True, sys.version.split()[0])
    dists = installed_ort_distributions()
    report.add("onnxruntime", bool(dists), ", ".join(f"{k} {v}" for k, v in dists.items()) or "not installed: pip install 'uclip[cpu]'")
    if warning := conflicting_distributions_warning():
        report.warnings.append(warning)
    if dists:
        for provider, state in probe_providers().items():
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
               "; ".join(f"{k}: {v}" for k, v in sorted(bad.items())) + " — re-run `uclip export`")
    report.add("heads", True, "trained: queries in any language" if bundle.has_heads else
               "not trained: English text and image queries only; run `uclip train` for other languages")
    if bad or not dists:
        return report
    try:
        factory = SessionFactory(device=device)
        model = factory.create(bundle.file(B.TEXT_MULTILINGUAL))
        report.add(f"session ({device})", True, f"{B.TEXT_MULTILINGUAL} runs on {', '.join(model.providers)}")
    except DeviceError as e:
        report.add(f"session ({device})", False, str(e))
    return report
