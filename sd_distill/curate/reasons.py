"""The reject vocabulary: every ``rejects.parquet`` row's ``reason`` is one of ``REASONS``.

``reason`` is a stable code to group and count by; ``detail`` keeps the specifics (the library's own
error text, the kept duplicate's key, the threshold...). ``classify_download_error`` turns img2dataset's
error text into a code; the network guard (``netguard.py``) tags its refusals ``[code] ...`` so they
classify exactly.
"""

from __future__ import annotations

import re

REASONS: dict[str, str] = {
    # -- collect (no network) --------------------------------------------------------------------
    "url_missing": "the row names no image (no URL, no local file)",
    "url_invalid": "the URL has no host, or holds whitespace or control characters",
    "unsupported_scheme": "not http(s): file://, ftp://, data:, ... (also a redirect to one); served:// from a source not marked `served`",
    "path_outside_root": "a file name from the source file is absolute or climbs out of images_root with `..`",
    "caption_empty": "the caption is missing or only whitespace",
    "caption_not_utf8": "the caption's bytes are not valid UTF-8",
    "caption_too_long": "more than CurateParams.max_caption_chars characters",
    "duplicate_url": "the same URL or local image as an earlier row (detail: the kept row's key)",
    "image_missing": "a WebDataset sample with no image member (jpg, jpeg, png, webp)",
    "caption_missing": "a WebDataset sample with no .txt member and no caption in its .json",
    "tar_damaged": "the WebDataset sample a truncated or corrupt shard breaks off in (the samples before it are kept)",
    # -- download: the fetch ---------------------------------------------------------------------
    "private_address": "the host is or resolves to a loopback, private, link-local, multicast or reserved address",
    "dns_error": "the host name does not resolve",
    "connection_error": "refused, reset, or closed before a full response",
    "tls_error": "the TLS handshake or certificate check failed",
    "timeout": "no complete answer within DownloadParams.timeout",
    "http_4xx": "the server answered 4xx (detail: status and message)",
    "http_5xx": "the server answered 5xx",
    "http_other": "any other non-2xx answer urllib does not follow (e.g. a 3xx without Location)",
    "redirect_loop": "redirects that loop or exceed urllib's limit of 10",
    "robots_disallowed": "an X-Robots-Tag header forbids use (noai, noimageai, noindex, noimageindex)",
    "empty_body": "a 2xx answer with no bytes",
    "local_unreadable": "a local image (folder, zip member) that is missing or unreadable",
    # -- download: the image ---------------------------------------------------------------------
    "too_large": "more than DownloadParams.max_image_bytes bytes, or more than max_image_pixels pixels",
    "too_small": "smaller than DownloadParams.min_image_size",
    "not_an_image": "the bytes do not decode as an image (HTML, text, truncated or corrupt files)",
    "duplicate_image": "the same stored image bytes (sha256) as an earlier row (detail: the kept row's key)",
    "no_result": "img2dataset reported nothing for the row (its shard failed twice)",
    "download_failed": "any other download failure (detail: img2dataset's text)",
    # -- filter and recaption --------------------------------------------------------------------
    "hps_below_threshold": "HPS score below FilterParams.threshold",
    "hps_not_in_top_fraction": "not in the best FilterParams.top_fraction by HPS score",
    "no_usable_caption": "neither the original nor the generated caption survived cleaning",
}

_TAG = re.compile(r"\[([a-z_0-9]+)\]")
_HTTP = re.compile(r"HTTP Error (\d{3})")
# (code, substrings of the error text, lower-cased); the first match wins
_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("robots_disallowed", ("x-robots-tag",)),
    ("timeout", ("timed out", "timeout")),
    ("dns_error", ("name or service not known", "nodename nor servname", "name resolution", "no address associated",
                   "getaddrinfo")),
    ("tls_error", ("ssl", "certificate")),
    ("local_unreadable", ("no such file or directory", "local image unreadable", "is a directory")),
    ("connection_error", ("connection refused", "connection reset", "remote end closed", "incompleteread",
                          "incomplete read", "badstatusline", "broken pipe", "unreachable", "no route to host",
                          "connection aborted", "eof occurred", "remotedisconnected", "line too long")),
    ("too_large", ("image area too large", "cv_io_max_image_pixels")),
    ("too_small", ("image too small",)),
    ("not_an_image", ("decod", "unreadable after resize", "aspect ratio too large", "cannot identify image")),
)


def classify_download_error(text: str | None, status: str | None = None) -> str:
    """The ``REASONS`` code of one img2dataset failure, from its ``error_message`` (and ``status``)."""
    t = (text or "").strip()
    for tag in _TAG.findall(t):
        if tag in REASONS:
            return tag
    low = t.lower()
    if "infinite loop" in low:
        return "redirect_loop"
    if "redirection to url" in low or "unknown url type" in low:
        return "unsupported_scheme"
    m = _HTTP.search(t)
    if m:
        code = int(m.group(1))
        return "http_4xx" if 400 <= code < 500 else "http_5xx" if 500 <= code < 600 else "http_other"
    for code, needles in _PATTERNS:
        if any(n in low for n in needles):
            return code
    if status == "failed_to_resize":
        return "not_an_image"  # OpenCV could not decode or resize it
    return "download_failed"


def check_reasons(reasons) -> None:
    """Raise ValueError naming any value that is not a ``REASONS`` code (writers call this)."""
    bad = sorted({str(r) for r in reasons if r not in REASONS})
    if bad:
        raise ValueError(f"unknown reject reason(s) {bad}; valid codes: {sorted(REASONS)}")
