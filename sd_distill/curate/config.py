"""Parameters of the curate stage (pydantic v2, JSON-friendly: they are Prefect flow parameters).

One model per step plus ``CurateParams`` holding them all. Every default carries a comment saying
why it is what it is. Invalid values fail at construction with the field name and the valid choices.
"""

from __future__ import annotations

import ipaddress
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SOURCE_KINDS = ("laion_parquet", "coco_json", "diffusiondb", "hpdv2", "url_list", "webdataset", "toy")
URL_LIST_FORMATS = ("csv", "tsv", "parquet", "jsonl")


class _Params(BaseModel):
    # Unknown keys are errors: a typo in a YAML run file must not be silently ignored.
    model_config = ConfigDict(extra="forbid")


class SourceSpec(_Params):
    """One input dataset in its published file format."""

    kind: Literal["laion_parquet", "coco_json", "diffusiondb", "hpdv2", "url_list", "webdataset", "toy"]
    # File or folder (local path or fsspec URL); unused for kind="toy", which generates its own files.
    # webdataset: a folder of tar shards, one shard, or a brace pattern ("shards-{00000..00009}.tar").
    path: str = ""
    # Label written to the `source` column; defaults to `kind` (set it when two sources share a kind).
    name: str = ""
    # Read at most this many rows (after parsing, before de-duplication); None = all rows.
    max_rows: Optional[int] = Field(default=None, ge=1)
    # url_list: the columns holding the image URL and the caption (img2dataset's defaults).
    url_col: str = "url"
    caption_col: str = "caption"
    # url_list: file format; None = from the file extension.
    format: Optional[Literal["csv", "tsv", "parquet", "jsonl"]] = None
    # coco_json: every caption of an image becomes a sample ("all") or only its first ("first");
    # "first" keeps images unique, which is what a text-to-image training set wants by default.
    coco_captions: Literal["all", "first"] = "first"
    # coco_json / diffusiondb / hpdv2: where the image files are. A local folder means local files;
    # an http(s):// or served:// base means URLs `<images_root>/<file>`; None = the format's default
    # (COCO: each image's coco_url; DiffusionDB: the folder of metadata.parquet holding part zips;
    # HPDv2: `<json folder>/<train|test>` as the HPSv2 repository lays it out).
    images_root: Optional[str] = None
    # hpdv2: keep only each prompt's human-preferred image ("preferred") or every ranked image ("all").
    hpdv2_images: Literal["preferred", "all"] = "preferred"
    # URLs may be served://<path>: files of the collect folder on the project's own loopback server.
    # Only for sources the project writes itself (the toy world sets it; tests do); a third-party list
    # with served:// URLs is rejected row by row (unsupported_scheme) unless this is set.
    served: bool = False
    # toy: number of generated scenes, RNG seed and planted fraction of bad pairs.
    toy_n: int = Field(default=200, ge=1)
    toy_seed: int = 0
    toy_bad_fraction: float = Field(default=0.25, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "SourceSpec":
        if not self.name:
            self.name = self.kind
        if self.kind != "toy" and not self.path:
            raise ValueError(f"SourceSpec(kind={self.kind!r}) needs `path` (a file or folder)")
        return self


class DownloadParams(_Params):
    """img2dataset settings (same names as img2dataset.download where they map 1:1)."""

    # Output side in pixels; 32 is the toy world's scene size (SD 1.x training uses 512).
    image_size: int = Field(default=32, ge=8)
    # img2dataset resize modes; "center_crop" gives square training images without borders.
    resize_mode: Literal["no", "keep_ratio", "center_crop", "border", "keep_ratio_largest"] = "center_crop"
    # Lossless by default so toy images keep exact colors; "jpg"/"webp" for real data at scale.
    encode_format: Literal["jpg", "png", "webp"] = "png"
    # img2dataset encode_quality: None = 95 for jpg/webp (visually lossless) and 1 for png, where it is
    # the zlib compression level (0-9): 1 is fast and PNG stays lossless at any level.
    encode_quality: Optional[int] = Field(default=None, ge=0, le=100)
    # Seconds per request; loopback servers answer in milliseconds, the open web needs ~10.
    timeout: float = Field(default=10.0, gt=0)
    # Extra attempts per URL after the first failure (img2dataset `retries`).
    retries: int = Field(default=1, ge=0)
    # img2dataset worker processes (spawned) and download threads per process.
    processes: int = Field(default=1, ge=1)
    threads: int = Field(default=16, ge=1)
    # Samples per img2dataset shard: the unit of incremental resume after an interruption.
    shard_size: int = Field(default=1000, ge=1)
    # Decompression-bomb guard: images with more source pixels are rejected before decoding
    # (OpenCV's OPENCV_IO_MAX_IMAGE_PIXELS) and by img2dataset's max_image_area. 8192^2 ~ 67 MP.
    max_image_pixels: int = Field(default=8192 * 8192, ge=1)
    # Smaller source images are rejected (img2dataset min_image_size); 0 keeps everything.
    min_image_size: int = Field(default=0, ge=0)
    # The internal-network guard (sd_distill/curate/netguard.py): hosts of third-party URLs that are or
    # resolve to loopback, private, link-local, multicast or reserved addresses are rejected
    # (private_address), redirects included. On: a shared URL list must not reach cloud metadata
    # endpoints or internal services. Tests serving on 127.0.0.1 turn it off or allow 127.0.0.1/32.
    block_private_networks: bool = True
    # Networks exempt from the guard (CIDRs such as "10.1.2.0/24" for an internal image mirror); none by default.
    allowed_networks: list[str] = Field(default_factory=list)
    # Largest response body read, in bytes (too_large beyond): img2dataset reads whole bodies into memory,
    # so an endless body would fill it. 64 MiB is far above any real photo.
    max_image_bytes: int = Field(default=64 * 2**20, ge=1)
    # A persistent folder for img2dataset's raw shards so a retried stage resumes where it stopped
    # (the stage's own folder is temporary until it completes); None = inside the stage folder.
    resume_dir: Optional[str] = None

    @field_validator("allowed_networks")
    @classmethod
    def _networks(cls, nets: list[str]) -> list[str]:
        for n in nets:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as e:
                raise ValueError(f"allowed_networks: {n!r} is not a network like '10.0.0.0/8' or '127.0.0.1/32' ({e})") from None
        return nets

    @model_validator(mode="after")
    def _check_quality(self) -> "DownloadParams":
        if self.encode_format == "png" and self.encode_quality is not None and self.encode_quality > 9:
            raise ValueError(f"encode_quality for png is a compression level 0-9, got {self.encode_quality}")
        return self

    @property
    def quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 1 if self.encode_format == "png" else 95


class FilterParams(_Params):
    """HPSv2 scoring and the keep/reject rule."""

    # Scorer reference: toy:<name>, an open_clip folder, an HPS checkpoint file or the hub id.
    hps_model: str = "toy:hps"
    # HPSv2.1 is the current checkpoint (HPSv2 repository); v2.0 for comparison with older tables.
    hps_version: Literal["v2.0", "v2.1"] = "v2.1"
    # Images per scorer forward pass; 32 fits ViT-H-14 on one 24 GB GPU.
    batch_size: int = Field(default=32, ge=1)
    # Keep samples with score >= threshold; None = no threshold.
    threshold: Optional[float] = None
    # Keep the best fraction by score (ties broken by key); None = no rank filter. The toy world
    # plants 25% bad pairs: keeping the best 70% leaves room to drop all of them.
    top_fraction: Optional[float] = Field(default=0.7, gt=0.0, le=1.0)
    # Apply threshold / top fraction within each source (True) or over all sources pooled (False);
    # per source keeps every dataset represented even when their score scales differ.
    per_source: bool = True
    # Torch device for the scorer.
    device: str = "cpu"


class CaptionParams(_Params):
    """Recaptioning with a BLIP-family model and the choice between original and generated caption."""

    # Set False to keep the (cleaned) original captions and skip the captioner entirely.
    enabled: bool = True
    # Captioner reference: toy:<name>, a transformers model folder or a hub id (BLIP, BLIP-2, InstructBLIP...).
    captioner: str = "toy:blip"
    # Conditional-captioning prompt (e.g. "Describe this image in detail:"); None = unconditional.
    prompt: Optional[str] = None
    # Generation length; 30 tokens covers a one-sentence caption.
    max_new_tokens: int = Field(default=30, ge=1)
    # Images per generate() call.
    batch_size: int = Field(default=16, ge=1)
    # Choose between original and generated caption by the scorer's image-text similarity; False
    # always takes the generated caption when it is usable.
    choose_by_similarity: bool = True
    # The generated caption must beat the original by this similarity margin to replace it.
    margin: float = 0.0
    # Torch device for the captioner.
    device: str = "cpu"


class DaskParams(_Params):
    """The Dask cluster a partitioned run (``task_runner="dask"``) fans out on. Not part of any stage key:
    where a partition ran does not change what it wrote."""

    # An existing scheduler ("tcp://10.0.0.5:8786"); None = start a LocalCluster for the flow run.
    address: Optional[str] = None
    # LocalCluster workers; None = one per partition, at most the machine's CPU count.
    n_workers: Optional[int] = Field(default=None, ge=1)
    # LocalCluster workers as threads of the flow-run process (False) or as processes (True). Threads by
    # default: the heavy work releases the GIL (img2dataset runs in its own processes, torch and Arrow
    # release it) and threads start in milliseconds; processes pay a Python + torch import each.
    processes: bool = False
    # Tasks each worker runs at once; 1 = one partition's stage per worker (each loads its own models).
    threads_per_worker: int = Field(default=1, ge=1)
    # Serve the Dask dashboard on 127.0.0.1:8787 (needs bokeh); off = a random loopback port. Never another interface.
    dashboard: bool = False


class CurateParams(_Params):
    """Everything the curate stage needs; the Prefect flow takes this as one typed parameter."""

    # The embedded default: one toy source (generated scenes served over loopback HTTP).
    sources: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(kind="toy")])
    download: DownloadParams = Field(default_factory=DownloadParams)
    filter: FilterParams = Field(default_factory=FilterParams)
    caption: CaptionParams = Field(default_factory=CaptionParams)
    # Rows per output Parquet shard; 5000 images of 512 px JPEG are ~250 MB, a comfortable shard.
    shard_rows: int = Field(default=5000, ge=1)
    # What the curated set is written as: "parquet" (part-NNNNN.parquet, what the distill stage reads, so
    # always included) and optionally "webdataset" (webdataset/shards-NNNNN.tar: <key>.<ext>, <key>.txt,
    # <key>.json, what WebDataset loaders and diffusers' training scripts read).
    output_formats: list[Literal["parquet", "webdataset"]] = Field(default_factory=lambda: ["parquet"])
    # Samples per WebDataset tar shard; 1000 images of 512 px JPEG are ~50-100 MB, webdataset's usual size.
    webdataset_shard_size: int = Field(default=1000, ge=1)
    # Captions longer than this many characters are rejected at collection (noise, spam, prompts
    # pasted many times); SD's CLIP tokenizer sees only 77 tokens anyway.
    max_caption_chars: int = Field(default=1000, ge=1)
    # Contiguous sample ranges that download, score and recaption run over as separate stages (run in
    # parallel, cached and rerun one by one); 1 = one stage per step. The filter and the shards are
    # global, so every P gives the same dataset. Not part of the collect stage's key.
    partitions: int = Field(default=1, ge=1)
    # What runs the partitions' stages at once: "thread" = the flow run's own thread pool, "dask" = a Dask
    # cluster (prefect-dask; see `dask`). Unused when partitions == 1.
    task_runner: Literal["thread", "dask"] = "thread"
    # The Dask cluster for task_runner="dask".
    dask: DaskParams = Field(default_factory=DaskParams)

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceSpec]) -> list[SourceSpec]:
        if not sources:
            raise ValueError("CurateParams.sources is empty; give at least one SourceSpec")
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes}; set SourceSpec.name")
        return sources

    @field_validator("output_formats")
    @classmethod
    def _formats(cls, formats: list[str]) -> list[str]:
        if "parquet" not in formats:
            raise ValueError(f"output_formats must include 'parquet' (the distill stage reads it), got {formats}; "
                             "valid formats: ['parquet', 'webdataset']")
        if len(set(formats)) != len(formats):
            raise ValueError(f"output_formats lists a format twice: {formats}")
        return formats

    def shards_key(self) -> dict:
        """What the curate/shards stage is keyed on: the shard layout (WebDataset fields only when written, so a
        Parquet-only set keeps the key it had before the WebDataset output existed)."""
        key = {"shard_rows": self.shard_rows}
        if "webdataset" in self.output_formats:
            key.update(output_formats=self.output_formats, webdataset_shard_size=self.webdataset_shard_size)
        return key

    @model_validator(mode="after")
    def _check_runner(self) -> "CurateParams":
        if self.dask.address is not None and self.task_runner != "dask":
            raise ValueError(f"dask.address is set but task_runner is {self.task_runner!r}; set task_runner='dask' to use it")
        return self
