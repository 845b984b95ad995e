"""What listing class folders in object storage asks of it (moto's S3 server, its request log): ROOT's folders
are listed once, and that one LIST answers train/, the val folder and test/ (issue 38)."""

from __future__ import annotations

import collections
from urllib.parse import parse_qs

from tl_ray.inputs.sources import class_folders


def test_the_dataset_root_is_listed_once_for_its_split_folders(s3_server):
    s3_server.create_bucket("roots")
    bucket = s3_server.filesystem()
    for split in ("train", "val", "test"):
        for name in ("ant", "bee"):
            for index in range(2):
                with bucket.open_output_stream(f"roots/data/{split}/{name}/{index}.png") as stream:
                    stream.write(b"png")

    since = s3_server.mark()
    layout = class_folders.discover(s3_server.uri("roots/data"))
    requests = s3_server.requests(since)

    assert (len(layout.train), len(layout.val), len(layout.test)) == (4, 4, 4)
    # Folders listed, by prefix (the probe whether ROOT is a folder, a LIST of one key, left out).
    listed = collections.Counter(
        parse_qs(request.query).get("prefix", [""])[0]
        for request in requests
        if "list-type" in request.query and parse_qs(request.query).get("max-keys") != ["1"]
    )
    assert listed["data/"] == 1, listed  # train/, val/ and test/ found by one LIST of the root
    assert not any(request.method == "HEAD" and request.path.endswith("/data/train") for request in requests)
    assert not [request for request in requests if request.path.endswith(".png")]  # no image asked for
