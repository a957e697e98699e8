"""Where a command's CPU goes: CPU seconds of every process started while it runs, and cores busy over time.

    python bench/cpu_by_process.py -- uclip embed DIR --out OUT --threads 2 --shard-size 32 --no-progress
    python bench/cpu_by_process.py -- uclip index DIR --index IDX --threads 2 --workers 2 --no-progress

Samples /proc every 0.2 s: each process that started after the command (the command itself, Ray's daemons,
its worker processes, ...) with its niceness and user+system CPU seconds, grouped by role (Ray titles its
workers `ray::<actor or task>`), then the cores each role kept busy in each 2-second window: start-up, idle
gaps and who competes with whom show there. A process that ends between two samples loses at most its last
0.2 s. The figures include whatever else started on the machine meanwhile: run it on a quiet machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
ROLES = ("_EncodeShards", "_decode_shard", "ray::IDLE", "_AutoscalingCoordinatorActor", "_StatsActor",
         "ActorLocationTracker", "DashboardAgent", "RuntimeEnvAgent", "raylet", "gcs_server", "log_monitor",
         "dashboard/dashboard.py", "autoscaler", "uclip embed", "uclip index", "uclip")


def read_process(pid: int) -> dict | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()   # after "pid (comm) ": state ppid ... utime stime ...
    return {"command": command, "cpu": (int(fields[11]) + int(fields[12])) / TICKS, "nice": int(fields[16]),
            "start": int(fields[19])}


def role(command: str) -> str:
    return next((r for r in ROLES if r in command), command.split(" ")[0].rsplit("/", 1)[-1] or "?")


def main() -> None:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    if not command:
        sys.exit(__doc__)
    since = float(Path("/proc/uptime").read_text().split()[0]) * TICKS - 1
    me, started = os.getpid(), time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, dict] = {}
    samples: list[tuple[float, dict[int, float]]] = []
    while child.poll() is None:
        now: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me:
                info = read_process(int(entry))
                if info and info["start"] >= since:
                    seen[int(entry)] = info
                    now[int(entry)] = info["cpu"]
        samples.append((time.monotonic() - started, now))
        time.sleep(0.2)
    output = child.communicate()[0]
    wall = time.monotonic() - started
    by_role: Counter[str] = Counter()
    print(f"{' '.join(command)}\nwall {wall:.1f} s, exit {child.returncode}")
    for pid, info in sorted(seen.items(), key=lambda kv: -kv[1]["cpu"]):
        by_role[role(info["command"])] += info["cpu"]
        if info["cpu"] >= 0.05:
            print(f"  pid {pid:7d}  nice {info['nice']:3d}  {info['cpu']:7.2f} CPU-s  {info['command'][:90]}")
    print(f"CPU seconds by role (total {sum(by_role.values()):.1f}):")
    for name, cpu in by_role.most_common():
        if cpu >= 0.05:
            print(f"  {cpu:7.2f}  {name}")
    print("cores busy per window:")
    last_t, last = 0.0, {}
    for t, cpu in samples:
        if t - last_t >= 2.0:
            window: Counter[str] = Counter()
            for pid, c in cpu.items():
                window[role(seen[pid]["command"])] += c - last.get(pid, 0.0)
            busy = ", ".join(f"{name} {v / (t - last_t):.2f}" for name, v in window.most_common(4) if v / (t - last_t) >= 0.02)
            print(f"  {last_t:6.1f}-{t:6.1f} s  {sum(window.values()) / (t - last_t):4.2f}  {busy}")
            last_t, last = t, cpu
    print("output (end):\n" + output[-1500:])


if __name__ == "__main__":
    main()
