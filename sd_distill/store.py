"""Content-addressed stage store (docs/design.md, "The stage store").

Every stage writes into ``<root>/<stage>/<key>/`` where ``key`` hashes the stage
name, its parameters, the keys of its upstream manifests and a code version.
A stage is built in a temporary folder and renamed into place only when it is
complete, so a crash never leaves a half-written folder that looks finished;
two identical builds racing each other end with one winner and an intact folder.

``root`` is a local path (the normal case) or any fsspec URL (``s3://bucket/x``,
``memory://``...). Remote stores build locally, upload the files, then the manifest: a folder is
finished when its manifest exists.

Usage::

    store = StageStore("runs/store")
    with store.build("curate/score", params, upstream=[downloaded]) as b:
        ...write files under b.path...
        b.counts["kept"] = 12
    manifest = b.manifest            # also store.find("curate/score", b.key)
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import fsspec

from sd_distill import __version__

MANIFEST = "manifest.json"


def _jsonable(obj: Any) -> Any:
    """Parameters as plain JSON (pydantic models, paths, tuples) for hashing and manifests."""
    if hasattr(obj, "model_dump"):
        return _jsonable(obj.model_dump(mode="json"))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    raise TypeError(f"stage parameter of type {type(obj).__name__} cannot be hashed: {obj!r}")


def stage_key(stage: str, params: Any, upstream: Sequence["Manifest"] = (), code_version: str = "1") -> str:
    """Hash of everything that determines a stage's output (hex, 16 chars)."""
    payload = {
        "stage": stage,
        "params": _jsonable(params),
        "upstream": [f"{m.stage}/{m.key}" for m in upstream],
        "code_version": code_version,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """What a finished stage folder holds; handed between stages instead of data."""

    stage: str
    key: str
    uri: str  # where the folder is: a local path or an fsspec URL
    params: dict[str, Any] = field(default_factory=dict)
    upstream: list[dict[str, str]] = field(default_factory=list)
    code_version: str = "1"
    package_version: str = __version__
    created: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The folder as a local path: the folder itself, or for a remote store (``s3://...``) a local copy.

        Stage folders never change once written (their name is the hash of their inputs), so a remote
        folder is downloaded once into the stage cache (``$SD_DISTILL_CACHE``, default
        ``~/.cache/curate-and-distill/stages``), checked against the manifest's sha256 sums, and reused.
        """
        if "://" in self.uri and not self.uri.startswith("file://"):
            return cached_copy(self)
        return Path(self.uri.removeprefix("file://"))

    def upstream_key(self, stage: str) -> str:
        """The key of the one upstream stage named ``stage``; an error naming the upstream stages otherwise."""
        keys = [u["key"] for u in self.upstream if u.get("stage") == stage]
        if len(keys) != 1:
            found = [u.get("stage") for u in self.upstream]
            raise ValueError(f"{self.stage}/{self.key} has {len(keys)} upstream stages named {stage!r}, "
                             f"expected one; its upstream: {found}")
        return keys[0]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        missing = {"stage", "key", "uri"} - set(data)
        if missing:
            raise ValueError(f"manifest is missing fields {sorted(missing)}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a finished stage folder (local path or fsspec URL), checked on load."""
    fs, path = fsspec.core.url_to_fs(str(folder))
    target = f"{str(path).rstrip('/')}/{MANIFEST}"
    if not fs.exists(target):
        raise FileNotFoundError(f"{folder} is not a finished stage folder: it has no {MANIFEST}")
    with fs.open(target, "r") as f:
        return Manifest.from_dict(json.load(f))


@dataclass
class StageBuild:
    """A stage being built: write files under ``path``; set ``counts`` / ``extra``."""

    stage: str
    key: str
    path: Path
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    manifest: Manifest | None = None
    reused: bool = False


def stage_cache_dir() -> Path:
    """Where remote stage folders are copied to (``$SD_DISTILL_CACHE`` or ``~/.cache/curate-and-distill/stages``)."""
    return Path(os.environ.get("SD_DISTILL_CACHE", Path.home() / ".cache" / "curate-and-distill" / "stages"))


def cached_copy(manifest: Manifest) -> Path:
    """A verified local copy of a remote stage folder, downloaded on first use (atomic rename, one winner)."""
    fs, remote = fsspec.core.url_to_fs(manifest.uri)
    # the URL's hash keeps two stores' folders apart even when stage and key agree
    target = stage_cache_dir() / hashlib.sha256(manifest.uri.encode()).hexdigest()[:12] / manifest.stage / manifest.key
    if (target / MANIFEST).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{manifest.key}.tmp-", dir=target.parent))
    try:
        fs.get(remote.rstrip("/") + "/", str(tmp) + "/", recursive=True)
        for entry in manifest.files:
            p = tmp / entry["path"]
            if not p.is_file() or p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
                raise OSError(f"{manifest.uri}/{entry['path']}: missing or not the file the manifest lists "
                              "(size / sha256 differ); the remote stage folder was changed or is incomplete")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MANIFEST).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


class LocalBackend:
    """A store in a folder on this machine: temporary folders beside their final place, renamed into place
    (atomic on one filesystem), locks under ``<root>/_locks/``."""

    is_local = True

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, os.path.abspath(root)
        self.url = self.root

    def uri(self, folder: str) -> str:
        return folder

    def reused_path(self, manifest: Manifest) -> Path:
        """Where a reused build's files are: the stage folder itself."""
        return manifest.path

    @contextmanager
    def local_copy(self, manifest: Manifest, folder: str) -> Iterator[Path]:
        yield manifest.path

    def temp_folder(self, stage: str, key: str) -> Path:
        os.makedirs(f"{self.root}/{stage}", exist_ok=True)
        # called under the key's lock, so another <key>.tmp-* is the leftover of a killed build (SIGKILL skips cleanup)
        for stale in Path(f"{self.root}/{stage}").glob(f"{key}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=f"{self.root}/{stage}"))

    def lock_file(self, stage: str, key: str, folder: str) -> str:
        os.makedirs(f"{self.root}/_locks/{stage}", exist_ok=True)
        return f"{self.root}/_locks/{stage}/{key}.lock"

    def publish(self, tmp: Path, final: str, files: list[dict[str, Any]], finished) -> None:
        """Rename the finished temporary folder into place; if another build won the rename, keep the winner's."""
        try:
            os.rename(tmp, final)  # atomic on one filesystem; fails if another build won
        except OSError:
            if not finished():
                raise


class ObjectStoreBackend:
    """A store behind an fsspec URL (``s3://``, ``memory://``...): builds happen in a local temporary folder and are
    uploaded file by file, the manifest last; locks are per machine (a lock file in the local temp folder)."""

    is_local = False

    def __init__(self, fs, root: str, url: str):
        self.fs, self.root, self.url = fs, root, url

    def uri(self, folder: str) -> str:
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{proto}://{folder}"

    def reused_path(self, manifest: Manifest) -> Path:
        """No local files for a reused remote build until ``Manifest.path`` copies them."""
        return Path()

    @contextmanager
    def local_copy(self, manifest: Manifest, folder: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            self.fs.get(folder + "/", tmp + "/", recursive=True)
            yield Path(tmp)

    def temp_folder(self, stage: str, key: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"stage-{key}-"))

    def lock_file(self, stage: str, key: str, folder: str) -> str:
        digest = hashlib.sha256(folder.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"sd-distill-{digest}.lock")

    def publish(self, tmp: Path, final: str, files: list[dict[str, Any]], finished) -> None:
        """Object stores have no atomic folder rename: upload the files into place, then the manifest last.
        A folder counts as finished only once its manifest exists, so a crash mid-upload never looks done."""
        if finished():
            return
        for entry in files:
            self.fs.put_file(str(tmp / entry["path"]), f"{final}/{entry['path']}")
        self.fs.put_file(str(tmp / MANIFEST), f"{final}/{MANIFEST}")


class StageStore:
    """The stage folders under ``root``, a local path or an fsspec URL; the backend (``LocalBackend`` or
    ``ObjectStoreBackend``) does what differs between the two."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        fs, path = fsspec.core.url_to_fs(root)
        self.backend = LocalBackend(fs, path) if _is_local(fs) else ObjectStoreBackend(fs, path, root)
        self.fs, self.root, self.url = self.backend.fs, self.backend.root, self.backend.url
        self.fs.makedirs(self.root, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return self.backend.is_local

    # -- lookup ---------------------------------------------------------------
    def folder(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def uri(self, stage: str, key: str) -> str:
        return self.backend.uri(self.folder(stage, key))

    def find(self, stage: str, key: str) -> Manifest | None:
        """The manifest of a finished stage, or None when it has not been built."""
        path = f"{self.folder(stage, key)}/{MANIFEST}"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as f:
            return Manifest.from_dict(json.load(f))

    def manifests(self, stage: str) -> list[Manifest]:
        """Every finished build of a stage, oldest first."""
        base = f"{self.root}/{stage}"
        if not self.fs.exists(base):
            return []
        found = []
        for entry in self.fs.ls(base, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".") or ".tmp-" in name:
                continue
            m = self.find(stage, name)
            if m is not None:
                found.append(m)
        return sorted(found, key=lambda m: m.created)

    @contextmanager
    def local_copy(self, manifest: Manifest) -> Iterator[Path]:
        """A local folder with the stage's files (the folder itself for local stores)."""
        with self.backend.local_copy(manifest, self.folder(manifest.stage, manifest.key)) as folder:
            yield folder

    def verify(self, manifest: Manifest) -> list[str]:
        """Files whose size or sha256 no longer match the manifest (empty when intact)."""
        bad = []
        with self.local_copy(manifest) as folder:
            for entry in manifest.files:
                p = folder / entry["path"]
                if not p.exists():
                    bad.append(f"{entry['path']}: missing")
                elif p.stat().st_size != entry["size"] or sha256_file(p) != entry["sha256"]:
                    bad.append(f"{entry['path']}: changed")
        return bad

    # -- build ----------------------------------------------------------------
    @contextmanager
    def build(
        self,
        stage: str,
        params: Any,
        upstream: Sequence[Manifest] = (),
        code_version: str = "1",
    ) -> Iterator[StageBuild]:
        """Build a stage atomically, or reuse it when the same key is already stored.

        When the stage exists, the yielded build has ``reused=True`` and ``manifest``
        set; callers check ``b.reused`` and skip their work.
        """
        key = stage_key(stage, params, upstream, code_version)
        existing = self.find(stage, key)
        if existing is not None:
            yield StageBuild(stage, key, self.backend.reused_path(existing), manifest=existing, reused=True)
            return
        with self._lock(stage, key):
            # another build of the same key may have finished while we waited for the lock
            existing = self.find(stage, key)
            if existing is not None:
                yield StageBuild(stage, key, self.backend.reused_path(existing), manifest=existing, reused=True)
                return
            tmp = self.backend.temp_folder(stage, key)
            b = StageBuild(stage, key, tmp)
            try:
                yield b
                b.manifest = self._commit(b, params, upstream, code_version)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)

    @contextmanager
    def _lock(self, stage: str, key: str) -> Iterator[None]:
        """One builder per stage key at a time (an flock on ``<root>/_locks/<stage>/<key>.lock``).

        Two identical runs started together: the second waits, then reuses the first's folder
        instead of building it again in the same work folders. Remote stores lock per machine
        (a lock file in the local temp folder); the atomic move still leaves one intact winner.
        """
        with open(self.backend.lock_file(stage, key, self.folder(stage, key)), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _commit(self, b: StageBuild, params: Any, upstream: Sequence[Manifest], code_version: str) -> Manifest:
        files = []
        for p in sorted(b.path.rglob("*")):
            if p.is_file() and p.name != MANIFEST:
                files.append({"path": p.relative_to(b.path).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)})
        manifest = Manifest(
            stage=b.stage,
            key=b.key,
            uri=self.uri(b.stage, b.key),
            params=_jsonable(params),
            upstream=[{"stage": m.stage, "key": m.key} for m in upstream],
            code_version=code_version,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            counts=_jsonable(b.counts),
            extra=_jsonable(b.extra),
            files=files,
        )
        (b.path / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
        self.backend.publish(b.path, self.folder(b.stage, b.key), files,
                             finished=lambda: self.find(b.stage, b.key) is not None)
        return self.find(b.stage, b.key)  # the winner's manifest
