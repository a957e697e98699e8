"""What the `uclip serve` tests share: a bundle with heads, an indexed photo folder, the app in-process,
and a real `uclip serve` process."""
from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


from cli_helpers import copy_bundle, environment  # noqa: F401  (the serve tests import it from here)
from optional import needs  # noqa: F401  (the serve tests import it from here)

PORT = 8765            # what the in-process client calls itself (no socket is opened)
BASE_URL = f"http://127.0.0.1:{PORT}"


def bundle_with_heads(tiny_bundle: Path, destination: Path, *, seed: int = 0, d_shared: int = 16) -> Path:
    """A copy of the tiny bundle with random trained-shaped heads written as `uclip train` writes them."""
    from uclip_cli import bundle as B

    if not destination.exists():
        copy_bundle(tiny_bundle, destination)
    write_random_heads(destination, seed=seed, d_shared=d_shared)
    assert B.load_bundle(destination).has_heads
    return destination


def write_random_heads(bundle: Path, *, seed: int, d_shared: int = 16) -> None:
    import torch

    from uclip_cli import bundle as B
    from uclip_cli.train.heads import UCLIPHeads, write_heads_into_bundle

    dims = B.load_bundle(bundle, verify=False).dims
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        heads = UCLIPHeads(dims["multilingual"], dims["clip"], d_shared=d_shared).eval()
        write_heads_into_bundle(heads, bundle, {"note": f"random heads, seed {seed}, for tests"})
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def served(index: Path, bundle: Path, cache: Path, *, token: str | None = None, hosts="loopback",
           workers: int = 1) -> Iterator[tuple]:
    """(TestClient, Library, Thumbnails) over the app in this process; the server's shutdown runs at exit."""
    from starlette.testclient import TestClient

    from uclip_cli.serve.app import create_app, loopback_hosts
    from uclip_cli.serve.live import Library
    from uclip_cli.serve.thumbnails import Thumbnails
    from uclip_cli.sessions import SessionFactory

    library = Library(index, bundle, SessionFactory(threads=1)).open()
    thumbnails = Thumbnails(cache / "thumbnails", workers=workers)
    app = create_app(library, thumbnails, hosts=loopback_hosts(PORT) if hosts == "loopback" else hosts, token=token)
    with TestClient(app, base_url=BASE_URL, raise_server_exceptions=False) as client:
        yield client, library, thumbnails


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str              # as printed, with ?token=... when there is one

    @property
    def base(self) -> str:
        return self.url.split("?")[0].rstrip("/")

    def stop(self) -> tuple[int, str]:
        """Ctrl-C, as a user stops it: (exit code, everything it wrote to stderr)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode, self.process.stderr.read().decode("utf-8", "replace")


@contextlib.contextmanager
def serve_process(env: dict[str, str], *args: str, timeout: float = 90) -> Iterator[ServerProcess]:
    """`uclip serve --port 0 ARGS` in a new process; waits for the line with its URL."""
    process = subprocess.Popen([sys.executable, "-m", "uclip_cli.cli", "serve", "--port", "0", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = None
    try:
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if line or process.poll() is not None:
                break
        found = re.search(r"(http://\S+)", line.decode("utf-8", "replace"))
        if not found:
            code = process.wait(timeout=10)
            raise AssertionError(f"uclip serve did not start (exit {code}): {line!r}\n{process.stderr.read().decode()}")
        server = ServerProcess(process, found.group(1))
        yield server
    finally:
        if server is not None:
            server.stop()
        elif process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def listening(index: Path, bundle: Path, cache: Path, *, token: str | None = None, gate=None) -> Iterator[int]:
    """A real uvicorn server, set up as `uclip serve` runs it (server_config), in a thread on 127.0.0.1; yields
    its port. Connections come from real sockets, so the connection gate (connections.py) is in the path."""
    import threading

    import uvicorn

    from uclip_cli.serve import bind, server_config
    from uclip_cli.serve.app import create_app, loopback_hosts
    from uclip_cli.serve.live import Library
    from uclip_cli.serve.thumbnails import Thumbnails
    from uclip_cli.sessions import SessionFactory

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    library = Library(index, bundle, SessionFactory(threads=1)).open()
    app = create_app(library, Thumbnails(cache / "thumbnails", workers=1), hosts=loopback_hosts(port), token=token)
    server = uvicorn.Server(server_config(app, gate))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
