"""Hostile URL lists and a hostile server: http(s) only, the internal-network guard, stable reject codes.

The server (``tests/_fixtures_hostile.py``) runs on 127.0.0.1, stops by itself, and counts every request,
so the tests can prove what was never fetched. The guard is on in every test here, with 127.0.0.1/32 (the
server) as the one allowed network: everything else on loopback, private or link-local is refused.
"""

from __future__ import annotations

import http.client
import json

import pandas as pd
import pytest

from sd_distill.curate import netguard
from sd_distill.curate.collect import SAMPLES_FILE, collect_sources
from sd_distill.curate.config import CurateParams, DownloadParams, SourceSpec
from sd_distill.curate.download import DOWNLOADED_FILE, download_images
from sd_distill.curate.reasons import REASONS, classify_download_error
from sd_distill.curate.schema import read_rejects, rejects_frame, write_rejects
from tests._fixtures_curate import color_image, png_bytes, write_coco_json, write_hpdv2, write_image_folder
from tests._fixtures_hostile import KINDS, hostile_server

# what urllib raises for a refused, failed or malformed fetch (URLError, HTTPError, timeouts and TLS errors are OSErrors)
FETCH_ERRORS = (OSError, http.client.HTTPException)

GUARD = netguard.Guard(allowed_networks=("127.0.0.1/32",), max_bytes=1_000_000)


@pytest.mark.parametrize(
    "url, code",
    [
        ("file:///etc/passwd", "unsupported_scheme"),
        ("FILE:///tmp/x.png", "unsupported_scheme"),
        ("ftp://example.com/x.png", "unsupported_scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "unsupported_scheme"),
        ("gopher://example.com/", "unsupported_scheme"),
        ("served://web/x.png", "unsupported_scheme"),  # only for sources marked `served`
        ("/etc/passwd", "unsupported_scheme"),
        ("http:///etc/passwd", "url_invalid"),
        ("http://example.com/a b.png", "url_invalid"),
        ("http://example.com/a\n.png", "url_invalid"),
        ("http://[::1/x", "url_invalid"),
        ("https://example.com/a.png", None),
        ("HTTP://example.com/a.png", None),
    ],
)
def test_only_http_and_https_urls_with_a_host_pass_collect(url, code):
    problem = netguard.url_problem(url)
    assert (problem[0] if problem else None) == code


@pytest.mark.parametrize(
    "url, code",
    [
        ("http://127.0.0.1/x", "private_address"),
        ("http://localhost:8080/x", "private_address"),
        ("http://app.localhost/x", "private_address"),
        ("http://10.1.2.3/x", "private_address"),
        ("http://172.16.0.1/x", "private_address"),
        ("http://192.168.1.1/x", "private_address"),
        ("http://169.254.169.254/latest/meta-data/", "private_address"),
        ("http://100.100.100.200/", "private_address"),  # shared address space (a cloud metadata endpoint)
        ("http://0.0.0.0/", "private_address"),
        ("http://224.0.0.1/", "private_address"),
        ("http://240.0.0.1/", "private_address"),
        ("http://[::1]/x", "private_address"),
        ("http://[::ffff:10.0.0.1]/x", "private_address"),
        ("http://[fe80::1]/x", "private_address"),
        ("http://[fd00::1]/x", "private_address"),
        ("http://no-such-host.invalid/x", "dns_error"),
        ("http://8.8.8.8/x.png", None),
        ("http://example.com/x.png", None),  # a name: checked on connect, in the worker (no DNS here)
    ],
)
def test_precheck_refuses_internal_literals_and_localhost_without_dns(url, code):
    problem = netguard.precheck(url, netguard.Guard())
    assert (problem[0] if problem else None) == code
    assert netguard.precheck(url, netguard.Guard(block_private=False)) is None


def test_allowed_networks_and_the_served_endpoint_are_the_only_exemptions():
    g = netguard.Guard(allowed_networks=("10.1.0.0/16",), allowed_endpoints=("127.0.0.1:9000",))
    assert netguard.blocked("10.1.2.3", 80, g) is None and netguard.blocked("10.2.0.1", 80, g) == "10.2.0.1 is private"
    assert netguard.blocked("127.0.0.1", 9000, g) is None and netguard.blocked("127.0.0.1", 9001, g) == "127.0.0.1 is loopback"
    with pytest.raises(ValueError, match="allowed_networks.*'10.0.0.0/8'"):
        DownloadParams(allowed_networks=["intranet"])


def test_the_guarded_opener_gives_each_bad_answer_its_code():
    """Every fetch urllib makes in img2dataset's workers, redirects included, in-process and fast."""
    expected = {
        "404": "http_4xx", "403": "http_4xx", "500": "http_5xx", "503": "http_5xx", "slow": "timeout",
        "loop": "redirect_loop", "to_file": "unsupported_scheme", "to_ftp": "unsupported_scheme",
        "to_private": "private_address", "to_metadata": "private_address", "cut": "connection_error",
        "empty": "empty_body", "huge_header": "too_large", "endless": "too_large", "garbage": "connection_error",
        "hangup": "connection_error",
    }
    op = netguard.opener(GUARD)
    with hostile_server(max_seconds=30, slow_s=1.5) as srv:
        got = {}
        for kind in expected:
            with pytest.raises(FETCH_ERRORS) as err:
                with op.open(srv.url(kind), timeout=0.5) as r:
                    r.read()
            got[kind] = classify_download_error(str(err.value))
        with op.open(srv.url("good"), timeout=2) as r:
            assert r.read() == png_bytes(color_image(3))
        # https goes through the same guard: refused before connecting, or a TLS error against plain HTTP
        for url, code in ((f"https://127.0.0.2:{srv.server_address[1]}/good", "private_address"),
                          (srv.url("good").replace("http://", "https://"), "tls_error")):
            with pytest.raises(FETCH_ERRORS) as err:
                op.open(url, timeout=2)
            got[url] = classify_download_error(str(err.value))
            expected[url] = code
        requests = dict(srv.requests)
    assert got == expected
    assert "/etc/passwd" not in requests and requests["/to_private"] == 1  # the redirect target was never fetched


def test_classifier_maps_img2dataset_texts_to_codes():
    cases = {
        "HTTP Error 404: Not Found": "http_4xx",
        "HTTP Error 502: Bad Gateway": "http_5xx",
        "The read operation timed out": "timeout",
        "<urlopen error timed out>": "timeout",
        "<urlopen error [Errno -2] Name or service not known>": "dns_error",
        "<urlopen error [Errno 111] Connection refused>": "connection_error",
        "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>": "tls_error",
        "<urlopen error unknown url type: ftp>": "unsupported_scheme",
        "<urlopen error [Errno 2] No such file or directory: '/x.png'>": "local_unreadable",
        "Image decoding error": "not_an_image",
        "image area too large": "too_large",
        "image too small": "too_small",
        "OpenCV(4.10.0) ... imgcodecs: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS": "too_large",
        "Use of image disallowed by X-Robots-Tag directive": "robots_disallowed",
        "<urlopen error [private_address] 10.0.0.1 is private>": "private_address",
        "something nobody has seen": "download_failed",
    }
    assert {t: classify_download_error(t) for t in cases} == cases
    assert set(cases.values()) <= set(REASONS)


def test_a_reason_outside_the_vocabulary_fails_on_write(tmp_path):
    rows = pd.DataFrame({"key": ["k"], "source": ["s"], "url": ["http://h/x"], "caption_original": ["c"]})
    with pytest.raises(ValueError, match=r"unknown reject reason\(s\) \['HTTP Error 404: Not Found'\]; valid codes"):
        write_rejects(rejects_frame(rows, "download", "HTTP Error 404: Not Found"), tmp_path / "rejects.parquet")
    write_rejects(rejects_frame(rows, "download", "http_4xx", "HTTP Error 404: Not Found"), tmp_path / "rejects.parquet")
    assert read_rejects(tmp_path).loc[0, "detail"] == "HTTP Error 404: Not Found"


def test_a_file_url_to_a_local_png_is_rejected_at_collect_and_never_fetched(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(color_image(1)))
    lst = tmp_path / "list.csv"
    lst.write_text(f"url,caption\nfile://{secret},a local picture\nfile:///etc/passwd,passwords\n")
    params = CurateParams(sources=[SourceSpec(kind="url_list", path=str(lst))])
    counts = collect_sources(params, tmp_path / "collect")
    rejects = read_rejects(tmp_path / "collect")
    assert rejects["reason"].tolist() == ["unsupported_scheme", "unsupported_scheme"] and set(rejects["stage"]) == {"collect"}
    assert counts["samples"] == 0 and len(pd.read_parquet(tmp_path / "collect" / SAMPLES_FILE)) == 0
    # and a samples file edited by hand is checked again by the download step, before img2dataset
    samples = pd.DataFrame({"key": ["k"], "source": ["s"], "url": [f"file://{secret}"], "local_path": [None],
                            "caption_original": ["c"], "extra": ["{}"]})
    samples.to_parquet(tmp_path / "collect" / SAMPLES_FILE, index=False)
    assert download_images(params, tmp_path / "collect", tmp_path / "dl")["reasons"] == {"unsupported_scheme": 1}
    assert not list((tmp_path / "dl").rglob("input.parquet")), "img2dataset was started"


def test_file_names_that_leave_the_image_folder_are_rejected_at_collect(tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes(color_image(1)))
    names = write_image_folder(tmp_path / "coco" / "train2017", 1) + ["../../secret.png", "/etc/passwd", "a/../../x.png"]
    coco = write_coco_json(tmp_path / "coco" / "captions.json", names, [["ok"], ["up"], ["abs"], ["mid"]], None)
    hpd = write_hpdv2(tmp_path / "hpd", 2, split="test")
    data = json.loads(hpd.read_text())
    data[1]["image_path"] = ["../../secret.png", "../../secret.png"]
    hpd.write_text(json.dumps(data))
    params = CurateParams(sources=[
        SourceSpec(kind="coco_json", path=str(coco), images_root=str(tmp_path / "coco" / "train2017"), name="coco"),
        SourceSpec(kind="hpdv2", path=str(hpd), name="hpd"),
    ])
    counts = collect_sources(params, tmp_path / "collect")
    rejects = read_rejects(tmp_path / "collect")
    assert sorted(rejects["caption_original"]) == ["abs", "hpd prompt 1", "mid", "up"]
    assert set(rejects["reason"]) == {"path_outside_root"} and rejects["detail"].str.contains("leaves the image folder").all()
    assert counts["in"] == counts["samples"] + counts["rejected"] == 6


BAD_ROWS = {  # caption -> (url template, expected (stage, reason)); {base} is the hostile server
    "file url": ("file:///etc/passwd", ("collect", "unsupported_scheme")),
    "ftp url": ("ftp://127.0.0.1/x.png", ("collect", "unsupported_scheme")),
    "data url": ("data:image/png;base64,iVBORw0KGgo=", ("collect", "unsupported_scheme")),
    "served url in a third-party list": ("served://web/x.png", ("collect", "unsupported_scheme")),
    "space in url": ("{base}/good/a b", ("collect", "url_invalid")),
    "no host": ("http:///good", ("collect", "url_invalid")),
    "duplicate url": ("{base}/good", ("collect", "duplicate_url")),
    "metadata ip literal": ("http://169.254.169.254/latest/meta-data/", ("download", "private_address")),
    "private ip literal": ("http://10.0.0.1/x.png", ("download", "private_address")),
    "ipv6 loopback": ("http://[::1]:1/x.png", ("download", "private_address")),
    "decimal loopback": ("http://2130706434:1/x.png", ("download", "private_address")),  # 127.0.0.2, found on connect
    ".invalid host": ("http://images.invalid/x.png", ("download", "dns_error")),
}
SERVER_ROWS = {  # hostile-server kind -> expected download reason (None: kept)
    "good": None, "good2": None, "same_bytes": "duplicate_image", "404": "http_4xx", "403": "http_4xx",
    "500": "http_5xx", "503": "http_5xx", "slow": "timeout", "loop": "redirect_loop", "to_file": "unsupported_scheme",
    "to_ftp": "unsupported_scheme", "to_private": "private_address", "to_metadata": "private_address",
    "html": "not_an_image", "truncated": "not_an_image", "cut": "connection_error", "empty": "empty_body",
    "huge_header": "too_large", "endless": "too_large", "bomb": "too_large", "tiny": "too_small",
    "garbage": "connection_error", "hangup": "connection_error", "robots": "robots_disallowed",
}


@pytest.mark.slow  # one img2dataset run (~3 interpreters, 15-30 s on 2 busy cores)
def test_hostile_url_list_through_img2dataset_every_row_accounted_with_its_code(tmp_path):
    assert set(SERVER_ROWS) == set(KINDS)
    with hostile_server(max_seconds=150, slow_s=3.0) as srv:
        rows = [(srv.url(k), f"kind {k}") for k in SERVER_ROWS]
        rows += [(u.format(base=srv.base), cap) for cap, (u, _) in BAD_ROWS.items()]
        rows += [("http://127.0.0.1:1/x.png", ""), (None, "no url")]
        lst = tmp_path / "list.parquet"
        pd.DataFrame({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}).to_parquet(lst, index=False)
        params = CurateParams(
            sources=[SourceSpec(kind="url_list", path=str(lst), name="web")],
            download=DownloadParams(image_size=16, timeout=1.5, retries=0, threads=8, min_image_size=4,
                                    max_image_pixels=1_000_000, max_image_bytes=1_000_000,
                                    allowed_networks=["127.0.0.1/32"]),
        )
        collect = collect_sources(params, tmp_path / "collect")
        counts = download_images(params, tmp_path / "collect", tmp_path / "dl")
        requests = dict(srv.requests)

    kept = pd.read_parquet(tmp_path / "dl" / DOWNLOADED_FILE)
    rejects = pd.concat([read_rejects(tmp_path / "collect"), read_rejects(tmp_path / "dl")], ignore_index=True)
    assert collect["in"] == len(rows) == len(kept) + len(rejects)  # rows in = kept + rejected
    assert counts["in"] == collect["samples"] and counts["downloaded"] + counts["rejected"] == counts["in"]
    got = {c: (s, r) for c, s, r in zip(rejects["caption_original"], rejects["stage"], rejects["reason"])}
    want = {f"kind {k}": ("download", r) for k, r in SERVER_ROWS.items() if r}
    want.update({cap: exp for cap, (_, exp) in BAD_ROWS.items()})
    want.update({"": ("collect", "caption_empty"), "no url": ("collect", "url_missing")})
    assert got == want
    assert sorted(kept["caption_original"]) == ["kind good", "kind good2"]
    assert rejects.loc[rejects["stage"] == "download", "detail"].str.len().gt(0).all()  # the raw text is kept
    # what was never fetched: rows rejected at collect or before img2dataset, and every redirect target
    assert requests.get("/good/a b") is None and requests["/good"] == 1
    assert set(requests) == {f"/{k}" for k in SERVER_ROWS}, requests
