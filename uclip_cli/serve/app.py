"""The HTTP side of `uclip serve`: routes, the guard every request passes, errors as one-line JSON.

Routes (GET and HEAD, and one POST):
    /                      the page (static/index.html; app.js, dupes.js and style.css beside it)
    /static/{name}         the page's files: a fixed list, nothing else from disk, no listing
    /api/search?q=&top=&offset=&min_score=&in=      results as JSON (api.search)
    /api/similar/{id}?top=&offset=&min_score=&in=   "more like this" (api.similar)
    /api/similar-upload?top=&offset=&min_score=&in=&...   POST: "more like this" for a photo in the body
                           (Content-Type image/* or application/octet-stream; over api.MAX_UPLOAD_BYTES: 413
                           unread; read into memory only, never to disk; api.similar_upload)
    /api/dupes?threshold=&in=&top=                  near-duplicate groups, largest first (api.dupes; computed in
                           a worker thread without the index lock, cached per snapshot: dupes_jobs.py)
    /api/tags                                       the labels of `uclip tag`, with photo counts (api.tags)
    /api/status            index size, bundle, heads trained, providers (api.status)
    /thumb/{id}            ~256 px JPEG (thumbnails.py)
    /image/{id}            the photo itself (browser formats), or a large JPEG of it (HEIC, TIFF); only while
                           the file still holds the indexed content (originals.py)

The guard (`Guard`, pure ASGI, before any route):
- Host header: on a loopback address only the loopback names of this port are answered (a web page
  that points its own domain at 127.0.0.1 — DNS rebinding — gets 403, not the API).
- Token: when the server has one (always when it listens beyond loopback), each request carries it:
  `Authorization: Bearer TOKEN`, the `uclip_token` cookie (set when the page is opened with
  `/?token=TOKEN`), or `?token=TOKEN`. Compared in constant time. Missing or wrong: 401.
- No CORS headers (another origin's script cannot read any answer), `Cross-Origin-Resource-Policy:
  same-origin` (nor embed a thumbnail), `X-Content-Type-Options: nosniff`, no referrer, no framing, and a
  Content-Security-Policy that lets the page load only its own files.
A request that passes is marked in its scope (OWNER_SCOPE_KEY): its connection is the owner's, evicted last
when connections run short (connections.py).
Every error — bad parameter, unknown id, unknown route, wrong method — is JSON `{"error": "one line"}`
with a 4xx status (503 while the index cannot be read); only a bug gives 500, whose body names no path.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
from http.cookies import SimpleCookie
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import UclipError
from . import api
from .dupes_jobs import DupesJobs
from .live import Library, NotFound, ServeError
from .thumbnails import LARGE_SIDE, THUMB_SIDE, Thumbnails

TOKEN_COOKIE = "uclip_token"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "dupes.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
OWNER_SCOPE_KEY = "uclip.owner"   # the Guard accepted this request (connections.py evicts such connections last)
REFRESH_SECONDS = 5.0      # an idle server takes up index changes this often (releases old snapshots)


def loopback_hosts(port: int) -> frozenset[str]:
    """The Host header values a browser sends for this server on a loopback address."""
    return frozenset({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"})


def create_app(library: Library, thumbnails: Thumbnails, *, hosts: frozenset[str] | None, token: str | None,
               refresh_seconds: float = REFRESH_SECONDS, dupes_jobs: DupesJobs | None = None) -> "Guard":
    """The ASGI app. `hosts`: Host header values answered (None: any, for a server with a token beyond
    loopback). The app closes `library`, `thumbnails` and `dupes_jobs` when the server shuts down."""
    handlers = Handlers(library, thumbnails, token=token, refresh_seconds=refresh_seconds,
                        dupes_jobs=dupes_jobs or DupesJobs())
    app = Starlette(routes=handlers.routes(), lifespan=handlers.lifespan,
                    exception_handlers={UclipError: error_answer, HTTPException: error_answer, Exception: error_answer})
    return Guard(app, hosts=hosts, token=token)


class Handlers:
    """One method per route (the module docstring lists them), over the Library and the thumbnails they own
    for the server's life: `lifespan` refreshes the library while the server is idle and closes both."""

    def __init__(self, library: Library, thumbnails: Thumbnails, *, token: str | None, refresh_seconds: float,
                 dupes_jobs: DupesJobs):
        self.library, self.thumbnails, self.dupes_jobs = library, thumbnails, dupes_jobs
        self.token, self.refresh_seconds = token, refresh_seconds
        self.static = {name: (resources.files(__package__) / "static" / name).read_bytes() for name in STATIC_FILES}

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/static/{name}", self.static_file, methods=["GET"]),
            Route("/api/search", self.search, methods=["GET"]),
            Route("/api/similar/{id}", self.similar, methods=["GET"]),
            Route("/api/similar-upload", self.similar_upload, methods=["POST"]),
            Route("/api/dupes", self.dupes, methods=["GET"]),
            Route("/api/tags", self.tags, methods=["GET"]),
            Route("/api/status", self.status, methods=["GET"]),
            Route("/thumb/{id}", self.thumb, methods=["GET"]),
            Route("/image/{id}", self.image, methods=["GET"]),
        ]

    def page(self, request: Request) -> Response:
        if self.token and request.query_params.get("token"):
            # opened from the printed link: keep the token in a cookie, drop it from the address bar
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, request.query_params["token"], httponly=True, samesite="strict",
                                secure=False, path="/")
            return response
        return Response(self.static["index.html"], media_type=STATIC_FILES["index.html"],
                        headers={"content-security-policy": PAGE_POLICY, "cache-control": "no-cache"})

    def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES or name == "index.html":
            raise NotFound(f"no such file: /static/{name[:100]}")
        return Response(self.static[name], media_type=STATIC_FILES[name], headers={"cache-control": "no-cache"})

    def search(self, request: Request) -> Response:
        params = request.query_params
        if "q" not in params:
            raise ServeError("q is missing: /api/search?q=TEXT (terms such as \"beach\" - \"people\" work too)")
        return _json(api.search(self.library, params["q"], api.page_options(params)))

    def similar(self, request: Request) -> Response:
        return _json(api.similar(self.library, request.path_params["id"], api.page_options(request.query_params)))

    async def similar_upload(self, request: Request) -> Response:
        page = api.page_options(request.query_params)        # a bad parameter: 400 before the body is read
        data = await read_upload(request, api.MAX_UPLOAD_BYTES)
        return _json(await run_in_threadpool(api.similar_upload, self.library, data, page))

    def dupes(self, request: Request) -> Response:
        return _json(api.dupes(self.library, request.query_params, self.dupes_jobs))

    def tags(self, request: Request) -> Response:
        return _json(api.tags(self.library))

    def status(self, request: Request) -> Response:
        return _json(api.status(self.library))

    async def thumb(self, request: Request) -> Response:
        content_id = api.check_id(request.path_params["id"])
        photo = await run_in_threadpool(api.photo, self.library, content_id)   # only indexed photos, always
        made = self.thumbnails.cached(content_id, THUMB_SIDE) or await asyncio.wrap_future(
            self.thumbnails.submit(photo, THUMB_SIDE))
        return FileResponse(made, media_type="image/jpeg", headers={"cache-control": "private, max-age=86400"})

    async def image(self, request: Request) -> Response:
        content_id = api.check_id(request.path_params["id"])
        photo = await run_in_threadpool(api.photo, self.library, content_id)
        original = await run_in_threadpool(photo.open)    # still the indexed content, inside the roots, an image
        if original.media_type is not None:
            return StreamingResponse(original.chunks(), media_type=original.media_type,
                                     headers={"content-length": str(original.size), "cache-control": "private, max-age=3600"})
        original.close()
        made = self.thumbnails.cached(content_id, LARGE_SIDE) or await asyncio.wrap_future(
            self.thumbnails.submit(photo, LARGE_SIDE))
        return FileResponse(made, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        task = asyncio.create_task(self._refresh_while_idle())
        try:
            yield
        finally:
            task.cancel()
            self.dupes_jobs.close()
            self.thumbnails.close()
            self.library.close()

    async def _refresh_while_idle(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await run_in_threadpool(self.library.refresh_idle)
            except UclipError:
                pass


class TooLarge(ServeError):
    status = 413


class WrongType(ServeError):
    status = 415


async def read_upload(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk and never past `limit` bytes (413: the rest is never read).

    Only image/* or application/octet-stream bodies (415 otherwise): a web page of another origin can send
    those only after a CORS preflight, which this server never grants, so it cannot make the server decode."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise WrongType(f"Content-Type {kind[:60]!r}: send the photo's bytes as the body with Content-Type "
                        "image/jpeg (image/png, ...) or application/octet-stream")
    too_large = TooLarge(f"the photo is larger than the {limit / (1 << 20):g} MiB this server accepts: "
                         "send a smaller copy (a JPEG of a few MB is plenty)")
    declared = request.headers.get("content-length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    parts, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large
        parts.append(chunk)
    return b"".join(parts)


def error_answer(request: Request, exc: Exception) -> Response:
    """Every error as JSON {"error": "one line"}: 4xx for what the request got wrong, 500 (naming no path) for a bug."""
    if isinstance(exc, ServeError):
        return _error(exc.status, str(exc))
    if isinstance(exc, HTTPException):
        if exc.status_code == 404:
            return _error(404, f"no such page: {request.url.path[:200]}")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed: this server only answers GET "
                               "(and POST to /api/similar-upload)")
        return _error(exc.status_code, str(exc.detail))
    if isinstance(exc, UclipError):
        return _error(400, str(exc))
    # a bug: the server logs the traceback (uvicorn does, after this answer); the client gets no paths
    return _error(500, f"internal error ({type(exc).__name__}): the server's output has the details")


def _json(payload: dict) -> Response:
    return JSONResponse(payload, headers={"cache-control": "no-store"})


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status, headers={"cache-control": "no-store"})


class Guard:
    """Host and token checks and security headers, in front of every route (see the module docstring)."""

    def __init__(self, app: Starlette, *, hosts: frozenset[str] | None, token: str | None):
        self.app = app
        self.hosts = hosts
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)
        scope[OWNER_SCOPE_KEY] = True
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope) -> Response | None:
        headers = Headers(scope=scope)
        if self.hosts is not None and headers.get("host", "").lower() not in self.hosts:
            return _error(403, "this server answers only on its loopback address (Host "
                               f"{headers.get('host', '')[:100]!r} refused): open http://{sorted(self.hosts)[0]}/")
        if self.token is not None and not self._has_token(scope, headers):
            return _error(401, "this server needs its token: open the link `uclip serve` printed (…/?token=…), "
                               "or send Authorization: Bearer TOKEN")
        return None

    def _has_token(self, scope, headers: Headers) -> bool:
        offered = []
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            offered.append(authorization[7:].strip())
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header offers no token
            pass
        if TOKEN_COOKIE in cookie:
            offered.append(cookie[TOKEN_COOKIE].value)
        offered.append(QueryParams(scope.get("query_string", b"")).get("token", ""))
        expected = self.token.encode()
        return any(hmac.compare_digest(o.encode("utf-8", "replace"), expected) for o in offered if o)
