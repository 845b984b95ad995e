"""The S3 test server itself: pyarrow's S3 client reaches it in both endpoint forms, and its requests are counted."""

from __future__ import annotations

from pyarrow import fs


def test_pyarrow_reads_and_writes_through_both_endpoint_forms(s3_server, monkeypatch):
    s3_server.create_bucket("fixture")
    start = s3_server.mark()
    filesystem, path = fs.FileSystem.from_uri(s3_server.uri("fixture/a.txt"))
    with filesystem.open_output_stream(path) as out:
        out.write(b"hello")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    from_env, path = fs.FileSystem.from_uri("s3://fixture/a.txt")
    with from_env.open_input_stream(path) as stream:
        assert stream.read() == b"hello"
    requests = s3_server.requests(since=start)
    assert all(r.status < 300 or r.method == "HEAD" for r in requests)
    assert {r.bucket for r in requests} == {"fixture"}
    assert any(r.method == "PUT" and r.path == "/fixture/a.txt" for r in requests)
    assert any(r.method == "GET" and r.path == "/fixture/a.txt" and r.status in (200, 206) for r in requests)
