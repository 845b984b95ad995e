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

import os
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from tl_ray import retries
from tl_ray.errors import TlRayError, UsageError

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
            return self.filesystem.get_file_info(self.path)
        except (OSError, ValueError) as error:
            raise TlRayError(f"{option}: cannot read {self.uri}: {describe(error)}") from error


def _join(left: str, tail: str) -> str:
    return f"{left.rstrip('/')}/{tail}" if left.rstrip("/") else f"/{tail}" if left.startswith("/") else tail


def is_uri(text: str) -> bool:
    return "://" in text


def describe(error: BaseException) -> str:
    """An error of pyarrow's filesystems in one line (the AWS SDK's messages run over several)."""
    text = " ".join(str(error).split())
    return text[:300] if text else type(error).__name__


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
    return Location(filesystem, path.rstrip("/"), base.rstrip("/"), query)


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
    """A local file's or folder's files copied to ``target``, retried as ``write_bytes`` is (a repeat copies every
    file again: each is written whole)."""
    retries.call(lambda: pafs.copy_files(folder, target.path, destination_filesystem=target.filesystem), retry_seconds)


def check_writable(location: Location, option: str) -> None:
    """Refuse an output location that cannot be written (no such bucket, no permission, a read-only mount), in one
    line naming ``option``, before any work starts: a probe object is written under it and deleted."""
    probe = location.join(f".tl-ray-probe-{uuid.uuid4().hex[:12]}")
    try:
        if location.is_local:
            location.filesystem.create_dir(location.path, recursive=True)
        with location.filesystem.open_output_stream(probe.path) as stream:
            stream.write(b"tl-ray checks it can write here; this file is deleted at once\n")
    except (OSError, ValueError) as error:
        raise UsageError(f"{option}: cannot write to {location.uri}: {describe(error)}") from error
    try:
        location.filesystem.delete_file(probe.path)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{option}: {location.uri} can be written but not deleted from ({describe(error)}); tl-ray replaces"
            " checkpoints and reports, so it needs both"
        ) from error


def forbid_world_writable_files() -> None:
    """Clear the umask's "others may write" bit in this process, whatever the shell set.

    A world-writable checkpoint or report is one anybody on the machine can replace.
    Called by every process tl-ray runs code in: the CLI, training workers, sweep trials.
    """
    os.umask(os.umask(0o022) | 0o002)
