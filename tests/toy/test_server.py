"""serve_folder serves files over loopback and misbehaves on the /_fault/ paths."""

import http.client
import time
import urllib.error
import urllib.request

import pytest

from sd_distill.toy.server import fault_url, serve_folder


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"\x89PNG" + bytes(range(200)))
    return tmp_path


def _get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def test_serves_files_and_stops_on_exit(folder):
    with serve_folder(folder) as base:
        status, ctype, body = _get(f"{base}/images/a.png")
        assert status == 200 and ctype == "image/png" and body == (folder / "images" / "a.png").read_bytes()
    with pytest.raises(urllib.error.URLError):
        _get(f"{base}/images/a.png", timeout=1)


def test_fault_paths_misbehave_as_documented(folder):
    with serve_folder(folder) as base:
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(fault_url(base, "404", "images/a.png"))
        assert e.value.code == 404
        status, ctype, body = _get(fault_url(base, "html", "images/a.png"))
        assert ctype.startswith("text/html") and body.startswith(b"<!doctype html>")
        status, ctype, body = _get(fault_url(base, "truncated", "images/a.png"))
        assert body == (folder / "images" / "a.png").read_bytes()[:102]
        t0 = time.perf_counter()
        _get(fault_url(base, "slow", "images/a.png", seconds=0.3))
        assert time.perf_counter() - t0 >= 0.3
        with pytest.raises(http.client.IncompleteRead):
            _get(fault_url(base, "cut", "images/a.png"))


def test_paths_outside_the_folder_are_not_served(folder):
    with serve_folder(folder / "images") as base:
        with pytest.raises(urllib.error.HTTPError):
            _get(fault_url(base, "text", "../../etc/passwd"))


def test_serve_folder_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        with serve_folder(tmp_path / "nope"):
            pass
