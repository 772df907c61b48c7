"""Object storage and HTTP: store URLs, the fsspec client of each scheme, retries, whole-file fetches.

A prepared store may live at `s3://bucket/prefix`, `gs://bucket/prefix`, `https://host/path` (or
`http://`) instead of a local folder (`file://` URLs are local folders). The clients are fsspec's (s3fs,
gcsfs, fsspec's aiohttp HTTP), installed by the optional extra `cloud` (`pip install 'dualpm[cloud]'`);
without it a URL is refused with one message naming the extra.

Credentials come only from each client's standard places (for S3: AWS_* environment variables,
~/.aws files, instance metadata; the endpoint of an S3-compatible service from AWS_ENDPOINT_URL; for
GCS: Google application default credentials; for HTTP: ~/.netrc). A URL that carries credentials
(user:password@, a query string) is refused, so none can reach a saved config, a manifest or a log.

`Remote.fetch` reads one object with ranged GETs of up to `RemoteOptions.block` bytes (one request for
an object smaller than that), each retried on transient failures (`is_transient`, judged over the whole
exception chain) with exponential backoff and a bound; what still fails is one DatasetError naming the
URL.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dualpm.errors import DatasetError

SCHEMES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
EXTRA_HINT = "pip install 'dualpm[cloud]'"
T = TypeVar("T")


def is_url(location: str | os.PathLike) -> bool:
    """True when `location` is a URL of a remote store (s3://, gs://, gcs://, http(s)://)."""
    return isinstance(location, str) and urllib.parse.urlsplit(location).scheme.lower() in SCHEMES


def local_path(location: str | os.PathLike) -> Path:
    """The folder of a local location: a path, or a `file://` URL."""
    text = os.fspath(location)
    if isinstance(text, str) and text.lower().startswith("file://"):
        parts = urllib.parse.urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise DatasetError(f"{text}: a file:// URL names a local path (file:///abs/path), not host "
                               f"{parts.netloc!r}")
        return Path(urllib.parse.unquote(parts.path))
    return Path(text)


def check_url(url: str) -> str:
    """`url` without a trailing '/', refused (DatasetError, which never repeats a secret) when it carries
    credentials or a query, or names no bucket/host."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.username is not None or parts.password is not None:
        shown = urllib.parse.urlunsplit((scheme, parts.hostname or "", parts.path, "", ""))
        raise DatasetError(f"{shown}: the URL carries credentials (user:password@); give them the client's "
                           "standard way instead (environment, config files, ~/.netrc), never in a URL")
    if parts.query or parts.fragment:
        shown = urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        raise DatasetError(f"{shown}: a store URL has no query or fragment (signed URLs are not supported: "
                           "they would end up in saved configs)")
    if not parts.netloc:
        raise DatasetError(f"{url}: no bucket or host in the URL")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _env_number(name: str, default: float, kind: Callable[[str], T]) -> T:
    raw = os.environ.get(name)
    if raw is None:
        return kind(str(default))
    try:
        value = kind(raw)
    except ValueError:
        raise DatasetError(f"environment {name}={raw!r}: not a number") from None
    if value < 0:  # type: ignore[operator]
        raise DatasetError(f"environment {name}={raw!r}: must be >= 0")
    return value


@dataclass(frozen=True)
class RemoteOptions:
    """How remote reads behave (environment variables DUALPM_REMOTE_* override the defaults).

    attempts: tries per request (1 = no retry); backoff: first retry delay (s), doubled per retry up to
    max_delay (s), each with +-25% jitter; timeout: connect and read timeout per request (s); block:
    bytes per ranged GET; inflight: shards fetched at once per process (and read ahead of the reader).
    """

    attempts: int = 8
    backoff: float = 0.2
    max_delay: float = 10.0
    timeout: float = 60.0
    block: int = 64 << 20
    inflight: int = 4

    @classmethod
    def from_env(cls) -> RemoteOptions:
        """Defaults, overridden by DUALPM_REMOTE_ATTEMPTS, _BACKOFF, _MAX_DELAY, _TIMEOUT, _BLOCK, _INFLIGHT."""
        d = cls()
        return cls(
            attempts=max(1, _env_number("DUALPM_REMOTE_ATTEMPTS", d.attempts, int)),
            backoff=_env_number("DUALPM_REMOTE_BACKOFF", d.backoff, float),
            max_delay=_env_number("DUALPM_REMOTE_MAX_DELAY", d.max_delay, float),
            timeout=max(0.1, _env_number("DUALPM_REMOTE_TIMEOUT", d.timeout, float)),
            block=max(1 << 16, _env_number("DUALPM_REMOTE_BLOCK", d.block, int)),
            inflight=max(1, _env_number("DUALPM_REMOTE_INFLIGHT", d.inflight, int)),
        )


_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "429"}
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETRESET}
_client_errors: tuple[type[BaseException], ...] | None = None


def _transient_client_errors() -> tuple[type[BaseException], ...]:
    """The clients' own exception types for dropped connections, truncated bodies and timeouts."""
    global _client_errors
    if _client_errors is None:
        found: list[type[BaseException]] = []
        try:
            import aiohttp
            found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ServerTimeoutError]
        except ImportError:
            pass
        try:
            import botocore.exceptions as bx
            found += [bx.HTTPClientError, bx.IncompleteReadError, bx.ResponseStreamingError,
                      bx.ConnectionError]
        except ImportError:
            pass
        try:
            from fsspec.exceptions import FSTimeoutError
            found.append(FSTimeoutError)
        except ImportError:
            pass
        _client_errors = tuple(found)
    return _client_errors


def _status(err: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, S3 error code) an exception carries (aiohttp, botocore), else Nones."""
    status = getattr(err, "status", None)
    code = None
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", status)
        code = response.get("Error", {}).get("Code")
    return (status if isinstance(status, int) else None), (str(code) if code is not None else None)


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending = [err]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]


def is_transient(err: BaseException) -> bool:
    """Whether a failed request may succeed when retried, judged over `err` and every exception in its
    __cause__/__context__ chain: dropped or refused connections, truncated bodies, timeouts, HTTP 408/429/5xx
    and S3 throttling codes. A missing object or a refusal (404, 403) is not transient, even when raised
    while handling a transient one."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    clients = _transient_client_errors()
    for e in _chain(err):
        status, code = _status(e)
        if status is not None and status in (403, 404):
            return False
        if status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES:
            return True
        if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError, http.client.IncompleteRead,
                          http.client.RemoteDisconnected, EOFError)) or (clients and isinstance(e, clients)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNO:
            return True
    return False


def _missing(err: BaseException) -> bool:
    return any(isinstance(e, FileNotFoundError) or _status(e)[0] == 404 for e in _chain(err))


def _describe(err: BaseException) -> str:
    """One line for an error: its type and message (clients' messages hold no credentials)."""
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text[:300]}"


class RemoteMissing(DatasetError):
    """The object does not exist (HTTP 404, NoSuchKey)."""


@dataclass
class Counters:
    """Requests made and retried by one process (for benchmarks and tests)."""

    requests: int = 0
    retries: int = 0
    bytes: int = 0


class Remote:
    """One store URL and its fsspec filesystem (made per process: DataLoader workers fork).

    Picklable: the filesystem is made again, lazily, in the process that uses it."""

    def __init__(self, url: str, options: RemoteOptions | None = None):
        self.url = check_url(url)
        self.scheme = urllib.parse.urlsplit(self.url).scheme
        self.options = options or RemoteOptions.from_env()
        self.counters = Counters()
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self.filesystem()  # the missing-extra error now, not in a worker

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "scheme": self.scheme, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["options"])

    def filesystem(self) -> Any:
        """This process's fsspec filesystem for the URL's scheme (client retries off: ours decide)."""
        with self._lock:
            if self._fs is None or self._pid != os.getpid():
                self._fs, self._pid = self._make_fs(), os.getpid()
            return self._fs

    def _make_fs(self) -> Any:
        package = SCHEMES[self.scheme]
        try:
            import fsspec
            __import__(package)
        except ImportError as err:
            missing = (err.name or package).split(".")[0]
            extra = "'gcs'" if package == "gcsfs" else "'cloud'"
            hint = "pip install 'dualpm[gcs]'" if package == "gcsfs" else EXTRA_HINT
            raise DatasetError(f"{self.url}: reading {self.scheme}:// stores needs the optional packages of "
                               f"the {extra} extra ({missing} missing): {hint}") from None
        t = self.options.timeout
        if self.scheme == "s3":
            config = {"connect_timeout": t, "read_timeout": t, "retries": {"total_max_attempts": 1, "mode": "standard"}}
            fs = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs=config)
            fs.retries = 1  # s3fs's own retry loop (a class attribute): once
            return fs
        if self.scheme in ("gs", "gcs"):
            return fsspec.filesystem("gcs", skip_instance_cache=True, requests_timeout=t)
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=None, connect=t, sock_connect=t, sock_read=t)
        return fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout,
                                                                                 "trust_env": True})

    def url_of(self, relative: str) -> str:
        """The URL of a store-relative path (posix)."""
        return f"{self.url}/{relative}"

    def _path(self, relative: str) -> str:
        url = self.url_of(relative)
        return url if self.scheme in ("http", "https") else url.split("://", 1)[1]

    def retry(self, what: str, op: Callable[[], T]) -> T:
        """`op()`, retried on transient errors with exponential backoff up to `options.attempts` tries.

        Raises RemoteMissing for a missing object, DatasetError naming `what` for anything else."""
        opts = self.options
        for attempt in range(opts.attempts):
            self.counters.requests += 1
            try:
                return op()
            except Exception as err:  # noqa: BLE001 (classified; re-raised as a DatasetError naming the URL)
                if _missing(err):
                    raise RemoteMissing(f"{what}: not found") from err
                if not is_transient(err):
                    raise DatasetError(f"{what}: {_describe(err)}") from err
                if attempt + 1 == opts.attempts:
                    raise DatasetError(f"{what}: still failing after {opts.attempts} attempts "
                                       f"({_describe(err)})") from err
                self.counters.retries += 1
                delay = min(opts.max_delay, opts.backoff * 2 ** attempt)
                time.sleep(delay * random.uniform(0.75, 1.25))
        raise AssertionError("unreachable")

    def read_bytes(self, relative: str) -> bytes:
        """The whole object at `relative` (for small files: manifest, metadata, records)."""
        _, blocks = self.fetch(relative)
        return b"".join(blocks)

    def fetch(self, relative: str) -> tuple[int, Iterator[bytes]]:
        """(size, blocks) of the object at `relative`: the first block is fetched now (RemoteMissing if the
        object is missing), the rest as the iterator is consumed, each ranged GET retried on its own."""
        fs, path, url = self.filesystem(), self._path(relative), self.url_of(relative)
        block = self.options.block

        def get(start: int, end: int) -> bytes:
            data = self.retry(url, lambda: fs.cat_file(path, start=start, end=end))
            if len(data) > end - start and start == 0:  # a server that ignores Range sent the whole object
                return data
            if len(data) > end - start:
                raise DatasetError(f"{url}: the server ignores Range requests (got {len(data)} bytes)")
            self.counters.bytes += len(data)
            return data

        first = get(0, block)
        if len(first) < block:
            return len(first), iter([first])
        size = self.retry(url, lambda: fs.size(path))

        def rest() -> Iterator[bytes]:
            yield first
            offset = len(first)
            while offset < size:
                data = get(offset, min(size, offset + block))
                if not data:
                    raise DatasetError(f"{url}: object ended at {offset} of {size} bytes")
                offset += len(data)
                yield data

        return size, rest()

    def find(self, prefix: str) -> list[str] | None:
        """Relative paths of the objects under `prefix` (None where the scheme cannot list: HTTP)."""
        if self.scheme in ("http", "https"):
            return None
        fs, base = self.filesystem(), self._path("")
        try:
            found = self.retry(self.url_of(prefix), lambda: fs.find(self._path(prefix)))
        except RemoteMissing:
            return []
        return sorted(p[len(base):] for p in found)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{relative path: size} of every object under `prefix` (listable schemes: s3, gs)."""
        if self.scheme in ("http", "https"):
            raise DatasetError(f"{self.url}: an HTTP store cannot be listed or written; use s3:// or gs://")
        fs, base = self.filesystem(), self._path("")
        try:
            found = self.retry(self.url_of(prefix), lambda: fs.find(self._path(prefix), detail=True))
        except RemoteMissing:
            return {}
        return {p[len(base):]: int(info.get("size") or 0) for p, info in sorted(found.items())}

    def put_bytes(self, relative: str, data: bytes) -> None:
        """Write the object at `relative` with one PUT (an object appears whole or not at all), retried."""
        fs, path = self.filesystem(), self._path(relative)
        self.retry(self.url_of(relative), lambda: fs.pipe_file(path, data))
        self.counters.bytes += len(data)

    def delete(self, relative: str) -> None:
        """Remove the object at `relative` (no error when it does not exist)."""
        fs, path = self.filesystem(), self._path(relative)
        try:
            self.retry(self.url_of(relative), lambda: fs.rm_file(path))
        except RemoteMissing:
            pass
