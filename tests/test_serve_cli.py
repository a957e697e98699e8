"""`uclip serve` as a user runs it: a real process with uvicorn on a real socket, raw HTTP from a socket
(what a test client would not send), Ctrl-C, a taken port, a missing index."""
from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest

from cli_helpers import invoke_uclip, run_uclip, uclip_env
from image_fixtures import jpeg_bytes, photo_like
from serve_helpers import needs, serve_process

needs("uvicorn", "the serve extra: pip install '.[serve]'")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bundle):
    home = tmp_path_factory.mktemp("serve_cli")
    photos = home / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes(photo_like(100, 80, seed=500 + i)))
    env = uclip_env(home, bundle=tiny_bundle, index=home / "index")
    env.pop("PYTHONUNBUFFERED", None)          # the URL line must reach a pipe without it
    invoke_uclip(["index", photos, "--no-progress"], env).ok()
    return env


def raw_request(base: str, data: bytes) -> bytes:
    """What the server answers to `data` (b"" when it cuts the connection before we read the answer)."""
    host, port = base.split("//")[1].split(":")
    out = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass     # refused mid-request (uvicorn answers 400 and closes while we still send)
    return out


def status_line(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def test_serve_answers_refuses_garbage_and_stops_on_ctrl_c(env):
    with serve_process(env) as server:
        assert server.url.startswith("http://127.0.0.1:") and "token" not in server.url
        status = json.loads(urllib.request.urlopen(server.base + "/api/status", timeout=10).read())
        assert status["index"]["photos"] == 3
        page = urllib.request.urlopen(server.base + "/", timeout=10).read().decode()
        assert "/static/app.js" in page

        port = server.base.rsplit(":", 1)[1]
        huge = raw_request(server.base, b"GET /api/search?q=" + b"x" * 200_000 + b" HTTP/1.1\r\nHost: 127.0.0.1:"
                           + port.encode() + b"\r\nConnection: close\r\n\r\n")
        assert huge == b"" or 400 <= status_line(huge) < 500
        assert status_line(raw_request(server.base, b"\x00\x01\x02 not http\r\n\r\n")) == 400
        rebinding = raw_request(server.base, b"GET /api/status HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n")
        assert status_line(rebinding) == 403
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.base + "/api/search?q=%22unclosed", timeout=10)
        assert refused.value.code == 400 and "never closed" in json.loads(refused.value.read())["error"]
        assert json.loads(urllib.request.urlopen(server.base + "/api/status", timeout=10).read())   # still up
        code, stderr = server.stop()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "stopped" in stderr


def test_a_taken_port_a_missing_index_and_a_remote_address_are_one_line_errors(env, tmp_path):
    with serve_process(env) as server:
        port = server.base.rsplit(":", 1)[1]
        message = run_uclip(["serve", "--port", port], env).one_line_error()
        assert f"port {port}" in message and "--port" in message
    message = run_uclip(["serve", "--index", tmp_path / "nowhere"], env).one_line_error()
    assert "no index" in message and "uclip index" in message
    assert "--allow-remote" in run_uclip(["serve", "--host", "192.168.0.10"], env).one_line_error()


def test_beyond_loopback_every_request_needs_the_token(env):
    with serve_process(env, "--host", "0.0.0.0", "--allow-remote") as server:
        assert "?token=" in server.url
        token = server.url.split("?token=")[1]
        base = server.base.replace("0.0.0.0", "127.0.0.1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "/api/status", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(base + "/api/status", headers={"Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(request, timeout=10).read())["index"]["photos"] == 3
