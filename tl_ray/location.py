"""Where things are: one notion of a location for every option that names a place.

``--data``, ``--storage``, ``--cache``, ``--weights``, ``--checkpoint``, ``--out`` and ``tl-ray report`` each take a
local path or a URI that pyarrow opens (``s3://``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://``), its query
kept: ``s3://results/tl-ray?endpoint_override=127.0.0.1:9000&scheme=http`` reaches an on-prem MinIO as well as
``AWS_ENDPOINT_URL`` does (pyarrow reads that, and the standard credential chain, itself).

A location is resolved once, by ``resolve``, into a pyarrow filesystem and a path inside it. Children are joined
to that path (``Location.join``), never to the URI's text, whose query would otherwise swallow them; the URI a
location prints (``Location.uri``) is the same one with the children added before the query, so a user can paste
it back. The filesystem object travels with the location (Ray Train's and Tune's ``storage_filesystem``, Ray Data
tasks), so every process writes where the driver decided, with the endpoint the driver resolved.
"""

from __future__ import annotations

import datetime
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from tl_ray import retries
from tl_ray.errors import TlRayError, UsageError

# How long one request to object storage may keep trying before it fails, so an endpoint that cannot be reached (no
# route to Google, a firewall that drops packets) is one line within a minute, not a command silent for ten: S3 as
# pyarrow's S3FileSystem makes it (AWS's standard retries, 3 attempts, each given up after AWS's 1 s connect and 3 s
# without a byte; ``FileSystem.from_uri`` uses the SDK's older 10-attempt policy), GCS's client 20 s of retries
# (its own default: 15 minutes) unless the URI's ``retry_limit_seconds`` says otherwise.
S3_ATTEMPTS = 3
GCS_RETRY_S = 20.0
# The first request to a location (``Location.info``, ``check_writable``) is also given up after this long: GCS's
# client bounds its retries but not one request to an endpoint that accepts and never answers, nor Azure's any.
FIRST_ANSWER_S = 30.0
UPLOAD_CHUNK = 8 << 20  # bytes a local file is read in while it is written to storage
# The schemes whose URI is scheme://<the filesystem's path>: a path inside them maps back to a URI by itself.
_PATH_IS_URI = ("s3", "gs", "gcs")


@dataclass(frozen=True)
class Location:
    """A place: ``filesystem`` and ``path`` inside it, and how to print it (``uri``).

    ``base`` is the URI's text before its query (a local location: its absolute path) and ``query`` the query
    without its ``?``; ``join`` extends ``path`` and ``base`` alike.
    """

    filesystem: pafs.FileSystem = field(compare=False)
    path: str
    base: str
    query: str = ""

    @property
    def uri(self) -> str:
        """What the user sees and can pass back: the local path, or the URI with its query."""
        return f"{self.base}?{self.query}" if self.query else self.base

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> Location:
        """A location under this one: ``parts`` are added to the path (and to the URI before its query)."""
        tail = "/".join(part.strip("/") for part in parts if part.strip("/"))
        if not tail:
            return self
        return Location(self.filesystem, _join(self.path, tail), _join(self.base, tail), self.query)

    def parent(self) -> Location:
        """The folder holding this location (for a file: the folder it lands in)."""
        path, base = self.path.rstrip("/").rsplit("/", 1)[0], self.base.rstrip("/").rsplit("/", 1)[0]
        return Location(self.filesystem, path or "/", base, self.query)

    def at(self, path: str) -> Location:
        """The location of ``path``, a path inside this location's filesystem (as Ray Train and Tune report
        their folders and checkpoints), printed with this location's scheme and query."""
        path = path.rstrip("/")
        mine = self.path.rstrip("/")
        if path == mine:
            return self
        if path.startswith(mine + "/"):
            return self.join(path[len(mine) + 1 :])
        if self.is_local:
            return Location(self.filesystem, path, path, self.query)
        scheme = self.base.split("://", 1)[0]
        if scheme in _PATH_IS_URI:
            return Location(self.filesystem, path, f"{scheme}://{path.lstrip('/')}", self.query)
        return Location(self.filesystem, path, path, self.query)  # no URI known for it: its path at least

    def info(self, option: str) -> pafs.FileInfo:
        """This location's file info; a filesystem that cannot be reached is one line naming ``option``."""
        try:
            return answered(lambda: self.filesystem.get_file_info(self.path))
        except (OSError, ValueError) as error:
            raise TlRayError(f"{option}: cannot read {self.uri}: {describe(error)}{unreachable_hint(error)}") from error


def _join(left: str, tail: str) -> str:
    return f"{left.rstrip('/')}/{tail}" if left.rstrip("/") else f"/{tail}" if left.startswith("/") else tail


def is_uri(text: str) -> bool:
    return "://" in text


def describe(error: BaseException) -> str:
    """An error of pyarrow's filesystems in one line (the AWS SDK's messages run over several)."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


# What pyarrow's S3 (curl), GCS and Azure clients say when an endpoint never answered.
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "curlCode",
    "UNAVAILABLE",
    "Could not resolve",
    "Connection refused",
    "no answer in",
)


# What they say when the storage answered and refused who is asking, or was asked in the wrong region.
_REFUSED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied", "Forbidden")
_WRONG_REGION = ("PermanentRedirect", "AuthorizationHeaderMalformed", "HTTP status 301", "wrong region")


def unreachable_hint(error: BaseException) -> str:
    """What to check when ``error`` says the storage never answered, refused the credentials or was asked in the
    wrong region (appended to its one line), else ""."""
    text = str(error)
    if any(sign in text for sign in _UNREACHABLE):
        return (
            " (the storage did not answer: check the endpoint, the network route to it, a proxy, and the credentials)"
        )
    if any(sign in text for sign in _WRONG_REGION):
        return " (the bucket is in another region: pass it in the URI's query, ?region=..., or AWS_REGION)"
    if any(sign in text for sign in _REFUSED):
        return (
            " (the storage refused the request: check the credentials this machine uses (AWS_ACCESS_KEY_ID,"
            " AWS_PROFILE, the instance's role), their permission on this bucket and the endpoint)"
        )
    return ""


def resolve(text: str | os.PathLike | Location, option: str) -> Location:
    """The location ``text`` names: a local path (made absolute) or a URI pyarrow's ``FileSystem.from_uri`` opens.

    A URI pyarrow refuses (an unknown scheme, a query parameter it does not know) is a UsageError naming
    ``option`` and the URI. Nothing is read here: whether it exists is for the caller to ask.
    """
    if isinstance(text, Location):
        return text
    text = os.fspath(text)
    if not is_uri(text):
        path = os.path.abspath(os.path.expanduser(text))
        return Location(pafs.LocalFileSystem(), path, path)
    base, _, query = text.partition("?")
    try:
        # Braces (a WebDataset brace pattern, shard-{000000..000009}.tar) are no URI characters: sent encoded,
        # pyarrow's path has them back.
        braced = base.replace("{", "%7B").replace("}", "%7D")
        filesystem, path = pafs.FileSystem.from_uri(f"{braced}?{query}" if query else braced)
    except (ValueError, OSError, NotImplementedError, TypeError) as error:  # pyarrow's ArrowInvalid, ...
        raise UsageError(f"{option}: cannot open {text}: {describe(error)}") from error
    if isinstance(filesystem, pafs.LocalFileSystem):  # file:///x: a local folder, printed as the user wrote it
        return Location(filesystem, path, base.rstrip("/") or base, query)
    return Location(bounded(filesystem), path.rstrip("/"), base.rstrip("/"), query)


def bounded(filesystem: pafs.FileSystem) -> pafs.FileSystem:
    """``filesystem`` remade from its own settings (as pickling remakes it in every Ray worker) with the retries
    bounded (``S3_ATTEMPTS``, ``GCS_RETRY_S``); any other filesystem as it is."""
    if isinstance(filesystem, pafs.S3FileSystem):
        settings = filesystem.__reduce__()[1][0]
        retries = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
        return pafs.S3FileSystem(**settings, retry_strategy=retries)
    if isinstance(filesystem, pafs.GcsFileSystem):
        settings = filesystem.__reduce__()[1][0]
        if settings.get("retry_time_limit") is None:
            settings["retry_time_limit"] = datetime.timedelta(seconds=GCS_RETRY_S)
        return pafs.GcsFileSystem(**settings)
    return filesystem


def write_bytes(
    filesystem: pafs.FileSystem, path: str, data: bytes | pa.Buffer, retry_seconds: float = retries.RETRY_SECONDS
) -> None:
    """``data`` as the whole file ``path``: on object storage one PUT, made again while the storage fails for a
    reason that passes (``tl_ray.retries``), so a throttled or briefly unreachable bucket costs a run's results a
    wait, not the results. Raises OSError (``retries.Exhausted`` once the retries are spent) for the caller's one
    line."""

    def put() -> None:
        with filesystem.open_output_stream(path) as stream:
            stream.write(data)

    retries.call(put, retry_seconds)


def upload(folder: str, target: Location, retry_seconds: float = retries.RETRY_SECONDS) -> None:
    """A local file, or a folder's files (its sub-folders' too), copied to ``target``, each file retried as
    ``write_bytes`` is.

    Not ``pyarrow.fs.copy_files``: it closes each object it wrote in the stream's destructor, which drops the error
    of the last part's upload ("Error ignored when destroying file"), so a PUT that the storage refused returned as
    a success and left the file missing (tests/ray/test_storage_faults.py)."""
    if not os.path.isdir(folder):
        put_file(folder, target.filesystem, target.path, retry_seconds)
        return
    for local, relative in files_under(folder):
        put_file(local, target.filesystem, target.join(relative).path, retry_seconds)


def files_under(folder: str) -> list[tuple[str, str]]:
    """A local folder's files: (path, path relative to ``folder`` with "/"), sorted."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            local = os.path.join(parent, name)
            found.append((local, os.path.relpath(local, folder).replace(os.sep, "/")))
    return sorted(found, key=lambda pair: pair[1])


def put_file(local: str, filesystem: pafs.FileSystem, path: str, retry_seconds: float = retries.RETRY_SECONDS) -> None:
    """The local file ``local`` written whole to ``path`` (streamed: a checkpoint is not held in memory), made again
    while the storage fails for a reason that passes. The stream is closed inside, where a refused upload raises."""

    def put() -> None:
        if isinstance(filesystem, pafs.LocalFileSystem):
            filesystem.create_dir(path.rsplit("/", 1)[0] or "/", recursive=True)
        with open(local, "rb") as source, filesystem.open_output_stream(path) as stream:
            while chunk := source.read(UPLOAD_CHUNK):
                stream.write(chunk)

    retries.call(put, retry_seconds)


def check_writable(location: Location, option: str) -> None:
    """Refuse an output location that cannot be written (no such bucket, no permission, a read-only mount), in one
    line naming ``option``, before any work starts: a probe object is written under it and deleted."""
    probe = location.join(f".tl-ray-probe-{uuid.uuid4().hex[:12]}")
    try:
        if location.is_local:
            location.filesystem.create_dir(location.path, recursive=True)
        answered(lambda: _write_probe(probe))
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{option}: cannot write to {location.uri}: {describe(error)}{unreachable_hint(error)}"
        ) from error
    try:
        location.filesystem.delete_file(probe.path)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{option}: {location.uri} can be written but not deleted from ({describe(error)}); tl-ray replaces"
            " checkpoints and reports, so it needs both"
        ) from error


def _write_probe(probe: Location) -> None:
    with probe.filesystem.open_output_stream(probe.path) as stream:
        stream.write(b"tl-ray checks it can write here; this file is deleted at once\n")


def answered(call: Callable[[], object], seconds: float = FIRST_ANSWER_S):
    """``call()``'s result, or TimeoutError when it has not returned within ``seconds``: the call goes on in a
    daemon thread, which the process does not wait for (the command is about to end with one line)."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread, whatever it is
            outcome["error"] = error

    worker = threading.Thread(target=run, name="tl-ray-first-request", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer in {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def forbid_world_writable_files() -> None:
    """Clear the umask's "others may write" bit in this process, whatever the shell set.

    A world-writable checkpoint or report is one anybody on the machine can replace.
    Called by every process tl-ray runs code in: the CLI, training workers, sweep trials.
    """
    os.umask(os.umask(0o022) | 0o002)
