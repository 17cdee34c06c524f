import hashlib
import http.server
import io
import os
import threading

import pytest

from pneumoscope.data.download import fetch_pneumoniamnist


@pytest.fixture
def server(tmp_path):
    payload = b"npz-bytes" * 1000
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "p.npz").write_bytes(payload)
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payload
    httpd.shutdown()


def test_download_verifies_and_caches(server, tmp_path):
    base, payload = server
    md5 = hashlib.md5(payload).hexdigest()
    path = fetch_pneumoniamnist(tmp_path / "cache", url=f"{base}/p.npz", md5=md5)
    assert path.read_bytes() == payload
    # cached: a second call does not need the server
    again = fetch_pneumoniamnist(tmp_path / "cache", url=f"{base}/missing.npz", md5=md5)
    assert again == path


def test_wrong_checksum_keeps_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(ValueError, match="MD5"):
        fetch_pneumoniamnist(tmp_path / "cache", url=f"{base}/p.npz", md5="0" * 32)
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_server_says_what_to_do(tmp_path):
    with pytest.raises(ConnectionError, match="DATA=path"):
        fetch_pneumoniamnist(tmp_path / "cache", url="http://127.0.0.1:9/p.npz", md5="0" * 32, timeout=2)


def test_importing_the_downloader_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, pneumoscope.data.download; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["022", "077"])
def test_the_download_is_staged_under_a_pid_name_and_follows_the_umask(umask, server, tmp_path, monkeypatch):
    """Before issue 21 the file kept mkstemp's 0600 whatever the umask, under a name no later run cleaned up."""
    from pathlib import Path

    from pneumoscope import outputs

    base, payload = server
    seen, replace = [], os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: seen.append(Path(src).name) or replace(src, dst))
    old = os.umask(umask)
    try:
        path = fetch_pneumoniamnist(tmp_path / "cache", url=f"{base}/p.npz", md5=hashlib.md5(payload).hexdigest())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert len(seen) == 1 and seen[0].startswith(outputs.partial_name(path)) and seen[0].endswith(".part")


def test_a_full_disk_while_downloading_names_the_file_and_keeps_nothing(server, tmp_path, monkeypatch):
    """A disk error is not a network error: it names the file and its fix, not "run with a network"."""
    import errno

    from pneumoscope.cli.main import error_line
    from pneumoscope.data import download

    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download, "open", lambda *a, **kw: Full(), raising=False)
    base, payload = server
    with pytest.raises(OSError) as err:
        fetch_pneumoniamnist(tmp_path / "cache", url=f"{base}/p.npz", md5=hashlib.md5(payload).hexdigest())
    assert not isinstance(err.value, ConnectionError)
    line = error_line(err.value)
    assert str(tmp_path / "cache" / "pneumoniamnist.npz") in line and "no space left" in line and "DATA=path" not in line
    assert list((tmp_path / "cache").iterdir()) == []
