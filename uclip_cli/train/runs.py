"""Training runs: the same command resumes its run; changed settings or inputs start a new run beside it.

    runs_dir/
        targets.safetensors               soft-retrieval targets (derived: keyed by inputs + retrieval settings)
        <run id>/run.json                 what the run is: settings, inputs fingerprint, when it started, and
                                          once it ends, why it stopped
        <run id>/step-NNNNNNNNN.*         its newest complete checkpoint (trainer.save_checkpoint)

A run's id is a digest of every setting that changes what is computed and of the inputs' fingerprint,
so an identical command finds its own run (and resumes it, or reuses it when it had finished), and any
other command gets a run of its own. Nothing is refused and nothing is deleted: the run a changed
command replaces stays on disk, and the message names what changed and where the old run is.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig

RUN_FILE = "run.json"
# settings that do not change what is computed: a run may be resumed with other values
RESUMABLE_CHANGES = ("device", "amp", "amp_dtype", "retrieval_query_chunk", "retrieval_memory_chunk")


def run_settings(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}


def run_id(config: TrainConfig, fingerprint: str) -> str:
    key = json.dumps({"settings": run_settings(config), "inputs": fingerprint}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class RunChoice:
    run_id: str
    path: Path
    status: str          # "new" | "resume" (a checkpoint of this run exists; it may have finished)
    message: str         # for a new run: why it is new (what changed since the latest run)


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return record if isinstance(record, dict) and "id" in record else None
    except (OSError, ValueError):
        return None


def _runs(runs_dir: Path) -> list[dict]:
    """Every run recorded under runs_dir, oldest first."""
    found = [r for p in runs_dir.glob(f"*/{RUN_FILE}") if (r := _read(p))]
    return sorted(found, key=lambda r: (r.get("started", 0), r["id"]))


def _show(value: Any) -> str:
    return "auto" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def describe_change(old: dict, settings: dict, fingerprint: str) -> str:
    """'settings changed (epochs 5 -> 20)', 'inputs changed', or both."""
    before = old.get("settings", {})
    changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    parts = []
    if changed:
        parts.append("settings changed (" + ", ".join(f"{k} {_show(before.get(k))} -> {_show(settings.get(k))}"
                                                    for k in changed) + ")")
    if old.get("inputs") != fingerprint:
        parts.append("inputs changed (other captions, memories or feature files)")
    return " and ".join(parts) or "same settings and inputs"


def choose_run(runs_dir: Path, config: TrainConfig, fingerprint: str) -> RunChoice:
    """The run this command trains: its own earlier run when one exists, else a new one (recorded now)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    ident = run_id(config, fingerprint)
    path = runs_dir / ident
    mine = _read(path / RUN_FILE)
    if mine is not None and any(path.glob("step-*.json")):
        return RunChoice(ident, path, "resume", f"resuming run {ident}")
    earlier = [r for r in _runs(runs_dir) if r["id"] != ident]
    if mine is not None:     # no checkpoint: a closed-form run (none are written), or one stopped before its first
        message = f"run {ident} again (same settings and inputs)"
    elif earlier:
        latest = earlier[-1]
        message = (f"{describe_change(latest, run_settings(config), fingerprint)}: starting a new run {ident} "
                   f"(run {latest['id']} stays in {runs_dir / latest['id']})")
    else:
        message = f"starting run {ident} in {path}"
    path.mkdir(parents=True, exist_ok=True)
    write_run_record(path, {"id": ident, "settings": run_settings(config), "inputs": fingerprint,
                            "started": time.time(), "state": "running"})
    return RunChoice(ident, path, "new", message)


def write_run_record(path: Path, record: dict) -> None:
    tmp = path / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, path / RUN_FILE)


def finish_run(path: Path, **fields: Any) -> None:
    """Record how a run ended (state, step, stop reason) in its run.json."""
    record = _read(path / RUN_FILE) or {"id": path.name}
    record.update(state="finished", finished=time.time(), **fields)
    write_run_record(path, record)
