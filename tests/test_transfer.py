"""`uclip bundle pack`, `uclip pull` (hub repo, https URL, archive, folder) and `uclip bundle info`.

The hub is a local HTTP server (tests/fake_hub.py) that answers what huggingface_hub asks, with
HF_ENDPOINT pointed at it; nothing leaves the machine. Every failure must end in one line and leave the
bundle that was installed before exactly as it was.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from cli_helpers import copy_bundle, flip_one_byte, invoke_uclip, run_uclip, uclip_env
from fake_hub import FakeHub, Server
from uclip_cli import bundle as B

REPO = "someone/uclip-tiny"


def snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file in a folder (what 'left exactly as it was' compares)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An environment whose Hugging Face cache is private to the test (in this process and in subprocesses)."""
    import huggingface_hub.constants as constants

    env = uclip_env(tmp_path / "home")
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return env


@pytest.fixture
def installed(tiny_bundle, tmp_path):
    """A bundle already installed where the pulls go: it must survive every failed pull."""
    destination = copy_bundle(tiny_bundle, tmp_path / "installed")
    return destination, snapshot(destination)


def pull(env: dict, *args) -> "object":
    return invoke_uclip(["pull", *map(str, args), "--no-progress"], env)


# ------------------------------------------------------------------------------------------- pack

def test_pack_then_pull_the_archive_gives_the_same_bundle(tiny_bundle, tmp_path):
    env = uclip_env(tmp_path / "home")
    archive = tmp_path / "tiny.tar"
    out = invoke_uclip(["bundle", "pack", archive, "--bundle", tiny_bundle], env).ok().stdout
    assert "packed 5 files" in out
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert names[0] == B.MANIFEST and sorted(names[1:]) == sorted(B.load_bundle(tiny_bundle).files)
    first = archive.read_bytes()
    invoke_uclip(["bundle", "pack", archive, "--bundle", tiny_bundle], env).ok()
    assert archive.read_bytes() == first                      # the same bundle packs to the same bytes
    destination = tmp_path / "pulled"
    out = pull(env, archive, "--bundle", destination).ok().stdout
    assert "installed the bundle" in out and "every checksum verified" in out
    pulled = B.load_bundle(destination)
    assert pulled.files == B.load_bundle(tiny_bundle).files
    assert pulled.fingerprint == B.load_bundle(tiny_bundle).fingerprint
    assert pulled.manifest["origin"]["kind"] == "archive"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no staging left


def test_pack_gz_and_pull_a_folder(tiny_bundle, tmp_path, installed):
    destination, _ = installed
    env = uclip_env(tmp_path / "home")
    invoke_uclip(["bundle", "pack", tmp_path / "tiny.tar.gz", "--bundle", tiny_bundle], env).ok()
    with tarfile.open(tmp_path / "tiny.tar.gz", "r:gz") as tar:
        assert tar.getnames()[0] == B.MANIFEST
    assert "replaced the bundle" in pull(env, tiny_bundle, "--bundle", destination).ok().stdout
    assert B.load_bundle(destination).files == B.load_bundle(tiny_bundle).files


def test_pack_refuses_a_damaged_bundle(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    flip_one_byte(bundle / B.TEXT_CLIP)
    message = invoke_uclip(["bundle", "pack", tmp_path / "x.tar", "--bundle", bundle], uclip_env(tmp_path)).one_line_error()
    assert str(bundle / B.TEXT_CLIP) in message and not (tmp_path / "x.tar").exists()


# ------------------------------------------------------------------------------------------- hostile archives

def manifest_first(folder: Path) -> list[Path]:
    """The bundle's files in the order `uclip bundle pack` writes them: manifest.json first."""
    return sorted(folder.iterdir(), key=lambda p: (p.name != B.MANIFEST, p.name))


def tar_with(tmp_path: Path, tiny_bundle: Path, extra: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        for path in manifest_first(tiny_bundle):
            tar.add(path, arcname=path.name)
        tar.addfile(extra, io.BytesIO(data) if data else None)
    return archive


@pytest.mark.parametrize("kind", ["parent path", "symlink", "unlisted file", "absolute path"])
def test_hostile_archives_are_refused_and_nothing_is_written_outside(tiny_bundle, tmp_path, installed, kind):
    destination, before = installed
    if kind == "symlink":
        member = tarfile.TarInfo("evil.onnx")
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive = tar_with(tmp_path, tiny_bundle, member)
    else:
        name = {"parent path": "../escaped.txt", "unlisted file": "extra.bin", "absolute path": "/tmp/escaped.txt"}[kind]
        member = tarfile.TarInfo(name)
        member.size = 4
        archive = tar_with(tmp_path, tiny_bundle, member, b"evil")
    message = pull(uclip_env(tmp_path / "home"), archive, "--bundle", destination).one_line_error()
    assert "nothing was installed" in message or "refused" in message
    assert snapshot(destination) == before
    assert not (tmp_path / "escaped.txt").exists()


class WriteSpy:
    """Records each file the pull starts writing into its staging folder, and the bytes it wrote."""

    def __init__(self, monkeypatch):
        from uclip_cli import transfer

        self.names: list[str] = []
        original = transfer._Staging.write

        def write(staging, name, chunks, **kwargs):
            self.names.append(name)
            return original(staging, name, chunks, **kwargs)

        monkeypatch.setattr(transfer._Staging, "write", write)


def pull_in_process(archive: Path, destination: Path) -> str:
    from uclip_cli.transfer import TransferError, pull_bundle

    with pytest.raises(TransferError) as refused:
        pull_bundle(str(archive), destination, progress=False)
    assert "\n" not in str(refused.value)
    return str(refused.value)


def packed_members(tmp_path: Path, tiny_bundle: Path) -> tuple[tarfile.TarInfo, bytes, list[Path]]:
    """The manifest member `uclip bundle pack` writes (with its PAX sizes), its bytes, and the other files."""
    from uclip_cli.transfer import pack_bundle

    pack_bundle(tiny_bundle, tmp_path / "good.tar")
    with tarfile.open(tmp_path / "good.tar") as tar:
        member = tar.getmember(B.MANIFEST)
        return member, tar.extractfile(member).read(), [p for p in manifest_first(tiny_bundle)[1:]]


def test_pack_lists_each_file_size_with_the_manifest(tiny_bundle, tmp_path):
    member, _, files = packed_members(tmp_path, tiny_bundle)
    assert json.loads(member.pax_headers["UCLIP.sizes"]) == {p.name: p.stat().st_size for p in files}


def test_a_member_claiming_more_than_its_listed_size_is_refused_before_a_byte_is_written(
        tiny_bundle, tmp_path, installed, monkeypatch):
    destination, before = installed
    member, manifest, files = packed_members(tmp_path, tiny_bundle)
    sizes = json.loads(member.pax_headers["UCLIP.sizes"])
    sizes[B.TEXT_CLIP] -= 1                                  # the header says one byte more than listed
    member.pax_headers = {"UCLIP.sizes": json.dumps(sizes)}
    archive = tmp_path / "bigger.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(member, io.BytesIO(manifest))
        for path in files:
            tar.add(path, arcname=path.name)
    spy = WriteSpy(monkeypatch)
    message = pull_in_process(archive, destination)
    assert f"{B.TEXT_CLIP} claims {sizes[B.TEXT_CLIP] + 1} bytes, but its manifest lists {sizes[B.TEXT_CLIP]}" in message
    assert B.TEXT_CLIP not in spy.names and snapshot(destination) == before


def test_without_listed_sizes_a_member_over_two_gib_is_refused_at_its_header(tiny_bundle, tmp_path, installed,
                                                                            monkeypatch):
    """A 4 GiB member (of zeros: a few MB of .tar.gz) in an archive packed without sizes: refused unread."""
    destination, before = installed
    archive = tmp_path / "huge.tar"
    with open(archive, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(tiny_bundle / B.MANIFEST, arcname=B.MANIFEST)
            huge = tarfile.TarInfo(B.IMAGE_ENCODER)
            huge.size = 4 << 30
            raw.write(huge.tobuf(tarfile.PAX_FORMAT))        # the header only: its data is never reached
            tar.offset = raw.tell()
    spy = WriteSpy(monkeypatch)
    message = pull_in_process(archive, destination)
    assert f"{B.IMAGE_ENCODER} claims {4 << 30} bytes" in message and spy.names == []
    assert snapshot(destination) == before


def test_a_sparse_member_is_refused(tiny_bundle, tmp_path, installed, monkeypatch):
    """A GNU sparse member (PAX 0.0 map): 4 bytes of data that tar would expand to 10 GiB of zeros."""
    destination, before = installed
    archive = tmp_path / "sparse.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tiny_bundle / B.MANIFEST, arcname=B.MANIFEST)
        sparse = tarfile.TarInfo(B.IMAGE_ENCODER)
        sparse.size = 4
        sparse.pax_headers = {"GNU.sparse.size": str(10 << 30), "GNU.sparse.numblocks": "1",
                              "GNU.sparse.offset": "0", "GNU.sparse.numbytes": "4"}
        tar.addfile(sparse, io.BytesIO(b"ONNX"))
    spy = WriteSpy(monkeypatch)
    message = pull_in_process(archive, destination)
    assert "sparse file" in message and B.IMAGE_ENCODER in message and spy.names == []
    assert snapshot(destination) == before


def test_many_unlisted_members_stop_the_pull_at_the_first(tiny_bundle, tmp_path, installed, monkeypatch):
    import time

    destination, before = installed
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tiny_bundle / B.MANIFEST, arcname=B.MANIFEST)
        for i in range(20_000):
            extra = tarfile.TarInfo(f"extra{i:05d}.bin")
            extra.size = 1
            tar.addfile(extra, io.BytesIO(b"x"))
    spy = WriteSpy(monkeypatch)
    started = time.monotonic()
    message = pull_in_process(archive, destination)
    assert "extra00000.bin, which its manifest does not list: refused before writing it" in message
    assert spy.names == [] and time.monotonic() - started < 5      # not one member written, nor read on
    assert snapshot(destination) == before


def test_an_archive_whose_first_member_is_not_the_manifest_is_refused(tiny_bundle, tmp_path, installed):
    destination, before = installed
    archive = tmp_path / "late.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(tiny_bundle.iterdir(), key=lambda p: p.name == B.MANIFEST):   # manifest last
            tar.add(path, arcname=path.name)
    message = pull(uclip_env(tmp_path / "home"), archive, "--bundle", destination).one_line_error()
    assert f"not {B.MANIFEST}" in message and "uclip bundle pack" in message
    assert snapshot(destination) == before


def test_the_write_stops_at_the_first_byte_over_the_listed_size(tmp_path):
    from uclip_cli.transfer import TransferError, _Staging

    staging = _Staging(tmp_path)
    with pytest.raises(TransferError, match="holds more than the 10 bytes its manifest lists"):
        staging.write("x.onnx", iter([b"12345", b"67890", b"1", b"more" * 1000]), limit=10)
    assert (tmp_path / "x.onnx").read_bytes() == b"1234567890"


def test_a_full_disk_while_pulling_says_disk_full(tiny_bundle, tmp_path, installed, monkeypatch):
    import builtins
    import errno

    from uclip_cli import transfer

    destination, before = installed
    env = uclip_env(tmp_path / "home")
    invoke_uclip(["bundle", "pack", tmp_path / "tiny.tar", "--bundle", tiny_bundle], env).ok()

    class Full:
        """A file on a full disk: its first write fails with ENOSPC."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return Full(f) if "x" in mode else f

    monkeypatch.setattr(transfer, "open", full_open, raising=False)
    message = pull(env, tmp_path / "tiny.tar", "--bundle", destination).one_line_error()
    assert message.startswith("disk full while writing") and "cannot be read" not in message
    assert snapshot(destination) == before


def test_a_truncated_archive_is_refused(tiny_bundle, tmp_path, installed):
    destination, before = installed
    env = uclip_env(tmp_path / "home")
    invoke_uclip(["bundle", "pack", tmp_path / "tiny.tar", "--bundle", tiny_bundle], env).ok()
    data = (tmp_path / "tiny.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    message = pull(env, tmp_path / "cut.tar", "--bundle", destination).one_line_error()
    assert str(tmp_path / "cut.tar") in message
    assert snapshot(destination) == before


# ------------------------------------------------------------------------------------------- the hub

def test_pull_from_a_hub_repo_pins_one_commit_and_uses_the_cache_offline(tiny_bundle, tmp_path, hub_home):
    hub = FakeHub()
    commit = hub.publish(REPO, tiny_bundle)
    destination = tmp_path / "bundle"
    with Server(hub) as url:
        hub_home["HF_ENDPOINT"] = url
        out = pull(hub_home, REPO, "--bundle", destination).ok().stdout
        assert commit in out
        heads = [r for r in hub.requests if r.startswith("HEAD")]
        assert {r.rsplit("/", 1)[1] for r in heads} == {B.MANIFEST, *B.load_bundle(tiny_bundle).files}
        # every file after the manifest was asked for at the commit the manifest resolved to, not at "main"
        assert all(f"/resolve/{commit}/" in r for r in heads if not r.endswith(B.MANIFEST))
        origin = B.load_bundle(destination).manifest["origin"]
        assert (origin["source"], origin["kind"], origin["revision"]) == (REPO, "hub", commit)
        assert B.load_bundle(destination).files == B.load_bundle(tiny_bundle).files
        message = pull(hub_home, REPO, "--revision", "v9", "--bundle", destination).one_line_error()
        assert "no revision 'v9'" in message
    # the server is gone: offline, the same pull comes from huggingface_hub's cache
    hub_home["HF_HUB_OFFLINE"] = "1"
    shutil.rmtree(destination)
    assert commit in pull(hub_home, REPO, "--revision", commit, "--bundle", destination).ok().stdout
    message = pull(hub_home, "someone/never-pulled", "--bundle", destination).one_line_error()
    assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    B.load_bundle(destination)


def test_pull_in_a_new_process_reads_hf_endpoint_and_hf_home(tiny_bundle, tmp_path, hub_home):
    hub = FakeHub()
    hub.publish(REPO, tiny_bundle)
    with Server(hub) as url:
        hub_home["HF_ENDPOINT"] = url
        run_uclip(["pull", f"hf://{REPO}", "--bundle", tmp_path / "bundle", "--no-progress"], hub_home).ok()
    assert list((tmp_path / "hf" / "hub").glob("models--someone--uclip-tiny/snapshots/*/manifest.json"))
    B.load_bundle(tmp_path / "bundle")


@pytest.mark.parametrize("damage", ["tampered file", "missing file", "unknown repo", "not a bundle repo"])
def test_a_bad_hub_repo_ends_in_one_line_and_the_old_bundle_stays(tiny_bundle, tmp_path, hub_home, installed, damage):
    destination, before = installed
    hub = FakeHub()
    hub.publish(REPO, tiny_bundle)
    if damage == "tampered file":
        data = bytearray(hub.repos[REPO][B.TEXT_MULTILINGUAL])
        data[len(data) // 2] ^= 1
        hub.repos[REPO][B.TEXT_MULTILINGUAL] = bytes(data)
    elif damage == "missing file":
        del hub.repos[REPO][B.TOKENIZER_CLIP]
    elif damage == "not a bundle repo":
        del hub.repos[REPO][B.MANIFEST]
    repo = "someone/nothing-here" if damage == "unknown repo" else REPO
    with Server(hub) as url:
        hub_home["HF_ENDPOINT"] = url
        message = pull(hub_home, repo, "--bundle", destination).one_line_error()
    expected = {"tampered file": f"{B.TEXT_MULTILINGUAL} from {REPO} does not match its checksum",
                "missing file": f"lacks {B.TOKENIZER_CLIP}, which its manifest lists",
                "unknown repo": "is not a model repo",
                "not a bundle repo": "not a uclip bundle repo"}[damage]
    assert expected in message
    assert snapshot(destination) == before
    assert not list(tmp_path.glob(".installed.*"))


def test_a_cut_download_resumes(tiny_bundle, tmp_path, hub_home):
    hub = FakeHub(cut_after={B.TEXT_MULTILINGUAL: 1000}, cuts={B.TEXT_MULTILINGUAL: 1})
    hub.publish(REPO, tiny_bundle)
    with Server(hub) as url:
        hub_home["HF_ENDPOINT"] = url
        pull(hub_home, REPO, "--bundle", tmp_path / "bundle").ok()
    gets = [r for r in hub.requests if r.startswith("GET") and r.endswith(B.TEXT_MULTILINGUAL)]
    assert len(gets) == 2          # the second GET resumed (Range) where the cut left off
    assert B.load_bundle(tmp_path / "bundle").files == B.load_bundle(tiny_bundle).files


def test_a_connection_that_keeps_dropping_fails_in_one_line_and_the_old_bundle_stays(tiny_bundle, tmp_path, hub_home,
                                                                                      installed):
    destination, before = installed
    hub = FakeHub(cut_after={B.IMAGE_ENCODER: 0}, cuts={B.IMAGE_ENCODER: 100})
    hub.publish(REPO, tiny_bundle)
    with Server(hub) as url:
        hub_home["HF_ENDPOINT"] = url
        message = pull(hub_home, REPO, "--bundle", destination).one_line_error()
    assert f"downloading {B.IMAGE_ENCODER} from {REPO}" in message and "failed" in message
    assert "previous bundle is unchanged" in message
    assert snapshot(destination) == before


def test_a_pull_killed_mid_download_leaves_the_old_bundle_and_the_next_pull_completes(tiny_bundle, tmp_path, hub_home,
                                                                                      installed):
    import os
    import signal
    import sys
    import time

    destination, before = installed
    hub = FakeHub(stall={B.IMAGE_ENCODER: 1000})
    hub.publish(REPO, tiny_bundle)
    with Server(hub) as url:
        hub_home["HF_ENDPOINT"] = url
        process = subprocess.Popen([sys.executable, "-m", "uclip_cli.cli", "pull", REPO, "--bundle", str(destination),
                                    "--no-progress"], env=hub_home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not any(r == f"GET /{REPO}/resolve/{hub.commits[REPO]}/{B.IMAGE_ENCODER}" for r in hub.requests):
            assert time.monotonic() < deadline and process.poll() is None, "the pull never reached the image encoder"
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGKILL)   # as a power cut or `kill -9` would
        process.wait()
        assert snapshot(destination) == before
        assert B.load_bundle(destination).files == B.load_bundle(tiny_bundle).files
        del hub.stall[B.IMAGE_ENCODER]
        pull(hub_home, REPO, "--bundle", destination).ok()
    assert B.load_bundle(destination).manifest["origin"]["kind"] == "hub"
    assert not list(tmp_path.glob(".installed.*"))   # the killed pull's staging folder was cleared


# ------------------------------------------------------------------------------------------- URLs

@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (the openssl command line), and a server context using it."""
    import ssl

    folder = tmp_path_factory.mktemp("tls")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate: apt-get install openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", folder / "key.pem", "-out", folder / "cert.pem"],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return folder / "cert.pem", context


def test_pull_an_https_archive_resuming_a_cut(tiny_bundle, tmp_path, tls):
    cert, context = tls
    env = uclip_env(tmp_path / "home")
    env["SSL_CERT_FILE"] = str(cert)   # trust the test certificate, as a company CA would be trusted
    invoke_uclip(["bundle", "pack", tmp_path / "tiny.tar.gz", "--bundle", tiny_bundle], env).ok()
    hub = FakeHub(files={"tiny.tar.gz": (tmp_path / "tiny.tar.gz").read_bytes()},
                  cut_after={"tiny.tar.gz": 2000}, cuts={"tiny.tar.gz": 1})
    with Server(hub, ssl_context=context) as url:
        assert url.startswith("https://")
        result = run_uclip(["pull", f"{url}/files/tiny.tar.gz", "--bundle", tmp_path / "bundle", "--no-progress"], env).ok()
    assert "resuming" in result.stderr
    assert [r.split()[0] for r in hub.requests] == ["GET", "GET"]
    assert B.load_bundle(tmp_path / "bundle").files == B.load_bundle(tiny_bundle).files
    assert not list((tmp_path / "home" / "cache" / "uclip" / "downloads").glob("*"))   # the partial file is gone


def test_a_tampered_archive_at_a_url_is_refused(tiny_bundle, tmp_path, installed):
    destination, before = installed
    env = uclip_env(tmp_path / "home")
    bundle = copy_bundle(tiny_bundle, tmp_path / "copy")
    flip_one_byte(bundle / B.IMAGE_ENCODER)        # the manifest still carries the good checksum
    archive = tmp_path / "tampered.tar"
    with tarfile.open(archive, "w") as tar:
        for path in manifest_first(bundle):
            tar.add(path, arcname=path.name)
    hub = FakeHub(files={"tampered.tar": archive.read_bytes()})
    with Server(hub) as url:   # plain http is accepted on the loopback interface only
        message = pull(env, f"{url}/files/tampered.tar", "--bundle", destination).one_line_error()
    assert f"{B.IMAGE_ENCODER} from {url}/files/tampered.tar does not match its checksum" in message
    assert snapshot(destination) == before


def test_plain_http_from_another_host_is_refused_before_any_connection(tmp_path):
    message = pull(uclip_env(tmp_path), "http://example.org/bundle.tar", "--bundle", tmp_path / "b").one_line_error()
    assert "only https" in message


# ------------------------------------------------------------------------------------------- no bundle, no extra, info

def test_without_a_bundle_or_network_index_and_query_say_how_to_get_one(tmp_path):
    env = uclip_env(tmp_path / "home")   # its hub is a closed port: the default model cannot be assembled
    (tmp_path / "photos").mkdir()
    message = run_uclip(["index", tmp_path / "photos", "--no-progress"], env).one_line_error()
    assert "default model cannot be downloaded" in message and "uclip pull ARCHIVE" in message and "--bundle" in message
    message = run_uclip(["query", "a cat"], env).one_line_error()   # no index yet either: nothing is downloaded for it
    assert "uclip index DIR" in message and "uclip pull" in message and "--bundle" in message


def test_without_huggingface_hub_pull_names_the_pip_command(tmp_path):
    blocker = tmp_path / "blocker" / "huggingface_hub"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed')\n", encoding="utf-8")
    env = uclip_env(tmp_path / "home")
    env["PYTHONPATH"] = str(blocker.parent)
    message = run_uclip(["pull", REPO, "--bundle", tmp_path / "bundle"], env).one_line_error()
    assert "pip install" in message and "[hub]" in message


def test_bundle_info_says_what_a_bundle_is(tiny_bundle, tmp_path):
    env = uclip_env(tmp_path / "home")
    out = invoke_uclip(["bundle", "info", "--bundle", tiny_bundle], env).ok().stdout
    manifest = B.load_bundle(tiny_bundle).manifest
    assert manifest["sources"]["clip"] in out and "clip=24" in out and "multilingual=32" in out
    assert "64 px, shortest_edge + centre crop, bicubic" in out
    assert "families" in out and "clip=clip" in out and "multilingual=bert" in out
    assert "not trained" in out and "none (float32)" in out and "not pulled" in out
    info = json.loads(invoke_uclip(["bundle", "info", "--bundle", tiny_bundle, "--json"], env).ok().stdout)
    assert info["bytes"] == sum((tiny_bundle / n).stat().st_size for n in manifest["files"])
    assert info["heads"] is None and info["dims"] == {"clip": 24, "multilingual": 32, "shared": 512}


def test_bundle_info_of_trained_heads(tiny_bundle, tmp_path):
    """The training record the trainer writes into the manifest is what info shows."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    for name in (B.HEAD_A, B.HEAD_B):   # stand-ins: info hashes nothing and opens no graph
        (bundle / name).write_bytes(b"head")
    B.update_manifest(bundle, extra={"training": {"trained_at": "2026-11-29T10:00:00Z", "sizes": {"captions": 1500},
                                                  "foreign_languages": {"cs": 700, "fi": 800},
                                                  "inputs": {"captions": "en.txt"}, "epochs": [{}, {}], "device": "cpu"}})
    out = invoke_uclip(["bundle", "info", "--bundle", bundle], uclip_env(tmp_path / "home")).ok().stdout
    assert "trained 2026-11-29T10:00:00Z, 2 epochs on cpu" in out
    assert "cs=700, fi=800" in out and "captions=en.txt" in out and "captions=1500" in out
