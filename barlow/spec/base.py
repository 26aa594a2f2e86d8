"""The base of every spec section, and the checks several sections share: URLs a run reads or writes, Kubernetes
quantities."""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

# fsspec protocols a run may read from or write to, those the installed filesystems serve (GCS and Azure through
# their S3-compatible endpoints); others are rejected early with a clear message.
WRITABLE_SCHEMES = {"", "file", "s3", "memory"}
READABLE_SCHEMES = WRITABLE_SCHEMES | {"http", "https"}


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# schemes a user may mean (served or not): a local path that starts like one of them is a mistyped URL
KNOWN_SCHEMES = READABLE_SCHEMES - {""} | {"s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "ftp", "sftp"}
_MISTYPED_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)(?::/?(?!/)|//)")


def _check_url(url: str, schemes: set[str]) -> str:
    url = url.strip()
    if not url:
        raise ValueError("must not be empty")
    mistyped = _MISTYPED_URL.match(url) if "://" not in url else None
    if mistyped and mistyped["scheme"].lower() in KNOWN_SCHEMES:
        scheme = mistyped["scheme"].lower()
        meant = f"{scheme}://{'/' if scheme == 'file' else ''}{url[mistyped.end():]}"
        raise ValueError(f"'{url}' is neither a URL nor a plain path: write {meant} (a URL has '://' after its "
                         f"scheme), or ./{url} for a local folder of that name")
    if "://" in url and re.search(r"\s", url.split("://", 1)[1].split("/", 1)[0]):
        raise ValueError(f"'{url}' has white space in its bucket or host name, which never holds any")
    scheme = urlparse(url).scheme if "://" in url else ""
    if scheme not in schemes:
        raise ValueError(f"unsupported URL scheme '{scheme}://' (use a local path or one of: "
                         + ", ".join(sorted(s + "://" for s in schemes if s)) + ")")
    if scheme and not urlparse(url).netloc and scheme not in ("file", "memory"):
        raise ValueError(f"'{url}' has no bucket or host after '{scheme}://'")
    return url


def check_url(url: str, *, write: bool) -> str:
    """A URL as the spec accepts it for reading (data.*) or writing (output.url); raises ValueError naming the problem."""
    return _check_url(url, WRITABLE_SCHEMES if write else READABLE_SCHEMES)


ReadURL = Annotated[str, Field(min_length=1)]


def _quantity_text(v: Any) -> Any:
    # `cpu: 8` is a YAML int; a Kubernetes quantity is its decimal text (bool is an int too, and no quantity)
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")


def _check_quantity(v: str) -> str:
    if not QUANTITY.fullmatch(str(v)):
        raise ValueError(f"'{v}' is not a Kubernetes quantity (e.g. 8, 500m, 32Gi)")
    return str(v)


Quantity = Annotated[str, BeforeValidator(_quantity_text), AfterValidator(_check_quantity)]  # cpu: 8 or memory: 32Gi
