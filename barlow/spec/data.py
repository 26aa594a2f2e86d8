"""data.*: where the images are and how they are read, with the two-view augmentation and the S3 connection; a labelled
set beside unlabelled data (eval.data, monitor.data)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator

from barlow.spec.base import READABLE_SCHEMES, ReadURL, Section, _check_url
from barlow.spec.plugins import DATA_FORMATS


class S3Spec(Section):
    """How to reach an S3-compatible store. Credentials never go here: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or, on a cluster, from the Secret named in `cluster.s3_secret`."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://minio:9000; unset for AWS.")
    region: str | None = Field(None, description="Region name; unset for the store's default.")
    addressing_style: Literal["auto", "virtual", "path"] = Field("auto", description="Bucket addressing style.")
    retries: int = Field(10, ge=0, le=100, description="Attempts for throttled (503 SlowDown) or transient errors.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and urlparse(v).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if v is not None and "@" in urlparse(v).netloc:
            raise ValueError("must not contain credentials (use the environment or a Secret)")
        return v


class AugmentSpec(Section):
    """BYOL's two asymmetric views (view 1, view 2): the one place their rules are checked
    (barlow.augment.ViewsConfig.from_augment builds the views from this section)."""

    min_scale: float = Field(0.08, gt=0, le=1, description="Smallest crop area fraction of RandomResizedCrop.")
    flip_prob: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability (both views).")
    jitter_prob: float = Field(0.8, ge=0, le=1, description="ColorJitter(0.4, 0.4, 0.2, 0.1) probability (both views).")
    grayscale_prob: float = Field(0.2, ge=0, le=1, description="Grayscale probability (both views).")
    blur_prob: list[float] = Field([1.0, 0.1], description="Gaussian blur probability of view 1 and view 2.")
    solarize_prob: list[float] = Field([0.0, 0.2], description="Solarize probability of view 1 and view 2.")

    @field_validator("blur_prob", "solarize_prob")
    @classmethod
    def _probs(cls, v: list[float]) -> list[float]:
        if len(v) != 2:
            raise ValueError(f"must have 2 values, one per view (got {len(v)})")
        if not all(0.0 <= p <= 1.0 for p in v):
            raise ValueError("each probability must be between 0 and 1")
        return v


class DataSpec(Section):
    """Where the images are and how they are read."""

    format: Literal[tuple(DATA_FORMATS)] = Field(  # type: ignore[valid-type]
        "imagefolder", description="imagefolder: a folder of images (any layout; labels: data.labels); shards: the JSON "
        "index written by `barlow data shard`; webdataset: tar shards other tools wrote (a sample is the members sharing "
        "a key; image: the first of jpg, jpeg, png, webp; label: .cls or .json's label/cls, else none); parquet: an image "
        "column as Hugging Face datasets writes it (struct<bytes, path>), an optional integer label column.")
    train: ReadURL = Field(description="Training images: a folder (imagefolder), an index.json URL (shards), or a "
                           "brace pattern (s3://b/x/shard-{000000..000099}.tar) or folder of .tar (webdataset), a folder or glob of "
                           ".parquet (parquet).")
    val: ReadURL | None = Field(None, description="Validation images, same format as train; needed by eval.")
    image_size: int = Field(224, ge=8, le=1024, description="Side of the square crops fed to the model, in pixels.")
    channels: Literal[1, 3] = Field(3, description="Channels the model sees: 3 (RGB) or 1 (grayscale).")
    workers: int = Field(4, ge=0, le=64, description="Data-loader worker processes per training process.")
    shuffle_buffer: int = Field(1000, ge=0, le=1_000_000, description="Samples held for shuffling shards (0: none).")
    on_corrupt: Literal["skip", "fail"] = Field("skip", description="What an undecodable image does: skipped and counted, or fail the run.")
    labels: Literal["auto", "folders", "none"] = Field(
        "auto", description="Labels of an image folder. auto: from the folders only in the class layout (every image "
        "exactly one folder below data.train, in at least two such folders); any other layout (flat, nested by date or "
        "camera) is unlabelled. folders: each image's top folder is its class. none: unlabelled.")
    decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where training images are decoded: cpu (loader workers decode the crops), gpu (workers only "
        "read bytes and choose crops; the GPU decodes the batch; needs a CUDA device), auto: gpu when the run is on CUDA.")
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="The two-view augmentation.")
    s3: S3Spec = Field(default_factory=S3Spec, description="S3 connection settings for s3:// URLs.")

    @field_validator("train", "val")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else _check_url(v, READABLE_SCHEMES)

    def format_problems(self) -> list[tuple[str, str]]:
        # format shards' rule (barlow.data.shardreader): its data.train is the index `barlow data shard` wrote
        if self.format == "shards" and not self.train.endswith(".json"):
            return [("data.train", "must point at the shards' index .json when data.format is shards")]
        return []


class LabelledDataSpec(Section):
    """A labelled image set beside unlabelled pretraining data (the other data.* settings are data's)."""

    format: Literal[tuple(DATA_FORMATS)] = Field("imagefolder", description="As data.format.")  # type: ignore[valid-type]
    train: ReadURL = Field(description="Labelled training images (class folders, or a shard index).")
    val: ReadURL = Field(description="Labelled validation images, same format.")

    @field_validator("train", "val")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_url(v, READABLE_SCHEMES)

    def over(self, data: DataSpec) -> DataSpec:
        """data.* with this set's format and URLs, labels from its folders."""
        return data.model_copy(update={"format": self.format, "train": self.train, "val": self.val, "labels": "auto"})
