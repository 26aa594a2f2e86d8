"""What listing a big S3 prefix costs, and what keeping the listing saves: time and S3 requests.

    PYTHONPATH=. .venv/bin/python bench/listing.py                      # 100,000 objects on the test server
    PYTHONPATH=. .venv/bin/python bench/listing.py --objects 20000 --json runs/bench-listing.json

Starts the tests' S3 server (SeaweedFS, tests/support/s3server.py) on loopback, writes `--objects` small .jpg objects under
one prefix, nested by date as a camera roll is (`2024/<month>/<day>/img<i>.jpg`), then, through a counting
proxy in front of the server (every request passes; `tests/support/s3server.SlowDownProxy` with no failures):
- list: `barlow.data.listing.list_folder` (s3fs's paginated `find`: ListObjectsV2 pages of 1,000 keys);
- index: `barlow data index URL`'s work: the listing written beside the images as barlow-index.json;
- reopen: what every later start and every other rank does: read the kept listing (no listing) and label it;
each timed with its request count. The upload is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # the tests' S3 server and proxy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from s3server import S3Server

    server = S3Server(Path(tempfile.mkdtemp(prefix="barlow-bench-listing-")))
    server.start()
    try:
        result = run(server, args.objects)
    finally:
        server.stop()
    print(f"{args.objects:,} objects under one S3 prefix (SeaweedFS on loopback):")
    for what in ("list", "index", "reopen"):
        r = result[what]
        print(f"  {what:7} {r['s']:7.2f} s  {r['requests']:5d} requests")
    print(f"  kept listing: {result['index_bytes'] / 2**20:.1f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def run(server, objects: int) -> dict:
    import s3fs
    from s3server import SlowDownProxy

    from barlow import storage
    from barlow.data.listing import INDEX_NAME, labelled_images, list_folder, listing_of

    os.environ.update(server.env)
    url = f"s3://{server.bucket}/photos"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.endpoint_url})
    names = {f"{server.bucket}/photos/2024/{1 + i % 12:02d}/{1 + i % 28:02d}/img{i:07d}.jpg": b"\xff\xd8 not decoded"
             for i in range(objects)}
    items = list(names.items())
    for start in range(0, len(items), 5000):  # not timed: the camera roll being there
        fs.pipe(dict(items[start:start + 5000]), batch_size=64)

    out: dict = {"objects": objects}
    with SlowDownProxy(int(server.endpoint_url.rsplit(":", 1)[1]), fail=0) as proxy:
        s3 = storage.S3Settings(endpoint_url=proxy.url, retries=10)
        for what in ("list", "index", "reopen"):
            s3fs.S3FileSystem.clear_instance_cache()  # no listing cached in a client: each step starts cold
            before, t0 = proxy.passed, time.perf_counter()
            if what == "list":
                listing = list_folder(url, s3)
                assert len(listing.files) == objects, len(listing.files)
            elif what == "index":
                listing = list_folder(url, s3)
                storage.write_text(storage.join(url, INDEX_NAME), listing.to_json(), s3)
            else:  # what a source's open does before its first batch (barlow.data.imagefolder)
                _, images = labelled_images(listing_of(url, s3))
                assert len(images) == objects
            out[what] = {"s": time.perf_counter() - t0, "requests": proxy.passed - before}
        out["index_bytes"] = storage.size(storage.join(url, INDEX_NAME), s3)
    return out


if __name__ == "__main__":
    sys.exit(main())
