"""`uclip serve`: a local page and a JSON API over one index, with the models kept warm.

Rooms:
    live.py        the bundle + index the server answers from, kept current while other processes
                   index, re-project and train (snapshots, reference counts, warm encoders)
    api.py         what each request does: checked parameters in, dicts out (no HTTP)
    originals.py   which bytes /image and /thumb may send: the indexed content, inside the roots, an image
    thumbnails.py  thumbnails and large views made on demand, cached on disk by content id
    app.py         HTTP: routes, the guard (Host, token, headers), errors as one-line JSON
    connections.py who may hold a connection: a deadline for request heads, caps per peer and in all
    static/        the page: one HTML, one CSS and one JavaScript file, no build step, no CDN

Safe by default: `run_server` listens on loopback only. Another address needs `allow_remote` and then
a token that every request must carry (one is made up when none is given); the index is opened
read-only; photos are served by id only, from the paths the catalogue holds, and only while such a file
still holds the indexed content inside the indexed folders.

Starlette and uvicorn are the `serve` extra, imported only here, only by this command.
"""
from __future__ import annotations

import ipaddress
import secrets
import socket
from pathlib import Path
from typing import Callable

from ..errors import UclipError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MIN_TOKEN_CHARS = 16


class ServeSetupError(UclipError):
    """`uclip serve` cannot start as asked; the message says which option to change."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_serve_extra() -> None:
    """Starlette and uvicorn, or one line with the pip command."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        from ..extras import install_command

        raise ServeSetupError(f"uclip serve needs the serve extra: {install_command('serve')}") from None


def check_address(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token requests must carry (None on loopback without --token); refuses unsafe combinations."""
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ServeSetupError(f"--token: use at least {MIN_TOKEN_CHARS} characters (or leave it out to get a random one)")
    if is_loopback(host):
        return token
    if not allow_remote:
        raise ServeSetupError(f"--host {host} is not a loopback address: other machines could reach your photos. "
                              "Add --allow-remote to listen there (every request then needs a token)")
    return token or secrets.token_urlsafe(24)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line that says why not (port taken, address not on this machine)."""
    address = "127.0.0.1" if host == "localhost" else host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP. Without it, a
    # response written as headers then body waits for the client's delayed ACK on every keep-alive request
    # (+40 ms per query and per thumbnail in a browser); the listening socket's option is inherited too.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((address, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == 98:   # EADDRINUSE
            raise ServeSetupError(f"port {port} on {host} is taken (another uclip serve?): pass --port") from None
        raise ServeSetupError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --host or --port") from None
    sock.set_inheritable(True)
    return sock


def server_config(app, gate=None):
    """uvicorn's settings for `app`: uvicorn's h11 protocol behind a connection Gate (connections.py: a deadline
    for request heads, caps per peer and in all that evict the oldest idle connection), no
    `limit_concurrency` (it counted idle sockets: 256 of them locked everyone out), keep-alive 30 s."""
    import uvicorn

    from .connections import Gate

    gate = gate or Gate()
    return uvicorn.Config(app, http=gate.protocol(), log_level="warning", access_log=False, lifespan="on",
                          limit_concurrency=None, timeout_keep_alive=30, server_header=False)


def run_server(
    *,
    index_path: Path,
    bundle_path: Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    allow_remote: bool = False,
    token: str | None = None,
    sessions=None,
    thumbnail_workers: int | None = None,
    ready: Callable[[str], None] = lambda _: None,
    log: Callable[[str], None] = lambda _: None,
) -> None:
    """Serve until Ctrl-C (or SIGTERM). `ready(url)` is called once the socket listens (the URL carries the token)."""
    token = check_address(host, allow_remote, token)
    require_serve_extra()
    import uvicorn

    from ..config import cache_dir
    from .app import create_app, loopback_hosts
    from .live import Library
    from .thumbnails import Thumbnails

    library = Library(index_path, bundle_path, sessions, log=log).open()
    try:
        sock = bind(host, port)
    except BaseException:
        library.close()
        raise
    port = sock.getsockname()[1]
    thumbnails = Thumbnails(cache_dir() / "thumbnails", workers=thumbnail_workers)
    app = create_app(library, thumbnails, hosts=loopback_hosts(port) if is_loopback(host) else None, token=token)
    shown = "127.0.0.1" if host == "localhost" else (f"[{host.strip('[]')}]" if ":" in host else host)
    ready(f"http://{shown}:{port}/" + (f"?token={token}" if token else ""))
    try:
        uvicorn.Server(server_config(app)).run(sockets=[sock])
    except KeyboardInterrupt:   # uvicorn shuts down on Ctrl-C, then raises the signal again: a normal stop
        pass
