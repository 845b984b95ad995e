"""Credentials the storage refuses are one line naming the URI and what to check, exit 2, in seconds, nothing
written (issue 38): moto's S3 server with its authentication enforced from the first request
(INITIAL_NO_AUTH_ACTION_COUNT=0), which knows no access key, so the tests' fake ones are refused."""

from __future__ import annotations

import time

import pytest
from s3server import S3Server

from tl_ray import cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        server = S3Server(tmp_path_factory.mktemp("strict")).start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["inspect", "--data", "{data}"], "--data: cannot read s3://some/data?"),
        (["train", "--data", "{local}", "--storage", "{storage}"], "--storage: cannot write to s3://some/runs?"),
    ],
)
def test_refused_credentials_are_one_line_naming_what_to_check(strict_server, tmp_path, capsys, command, expected):
    (tmp_path / "train").mkdir()  # a local --data: the storage is what is refused
    argv = [
        part.format(data=strict_server.uri("some/data"), storage=strict_server.uri("some/runs"), local=tmp_path)
        for part in command
    ]
    started = time.monotonic()
    code = cli.main(argv)
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"tl-ray: error: {expected}")
    assert "check the credentials" in lines[0] and ("ACCESS_DENIED" in lines[0] or "INVALID_ACCESS_KEY" in lines[0])
    assert seconds < 20
