"""Corpora on object storage: a prepared corpus under an fsspec URL, read through a bounded local cache.

``s3://bucket/corpus``, ``gs://bucket/corpus``, ``https://host/corpus`` (any URL fsspec opens) name a
corpus as a local folder does. :class:`ShardStore` is what reads and writes it:

- the manifest is read remotely; each shard is fetched only when a reader needs it, into a cache
  folder (``cache_dir``, one sub-folder per corpus URL) whose size is bounded (``cache_gb``): before a
  download the least recently used shards are evicted, and a shard larger than the whole budget is an
  error that says so;
- a fetched shard is checked against the manifest's sha256 before it is used (a corrupted object is
  downloaded once more, then refused with its name); downloads go to a temporary name and are renamed
  into place, so the cache never holds half a shard, and concurrent readers (DataLoader workers, ranks
  on one machine) share it;
- transient errors (a dropped connection, a timeout, a 5xx) are retried with exponential backoff; a
  missing object or refused credentials fail at once with one line naming the URL;
- :meth:`ShardStore.prefetch` fetches the shards a reader will need next in a background thread.

Credentials and endpoints come the usual way: each provider's environment variables and config files
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL`` for an S3-compatible store, ``GOOGLE_APPLICATION_CREDENTIALS``,
...), and ``storage_options`` (``data.storage_options``) for anything else fsspec's filesystem takes.
``file://`` URLs are plain local folders (no cache). fsspec and the provider's package (s3fs, gcsfs;
aiohttp for ``https://``) are the ``[cloud]`` extra.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["ShardStore", "default_cache_dir", "is_url", "local_path_of", "join_url"]

#: seconds of the first retry's wait; doubled for each further retry
BACKOFF_S = 0.5
RETRIES = 4
#: environment variables giving the cache's defaults (``data.cache_dir`` / ``data.cache_gb`` win)
CACHE_DIR_ENV, CACHE_GB_ENV = "AIOLI_CACHE_DIR", "AIOLI_CACHE_GB"
DEFAULT_CACHE_GB = 50.0
PARTIAL = ".partial-"


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local_path_of(path: str | os.PathLike) -> Path:
    """A local path for ``path``, ``file://`` URLs included."""
    text = os.fspath(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join_url(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel.lstrip("/")


def default_cache_dir() -> Path:
    """``$AIOLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/aioli_fast``, else ``~/.cache/aioli_fast``."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aioli_fast"


def _permanent(exc: BaseException) -> str | None:
    """Why ``exc`` will not go away with a retry (a missing object, refused credentials, a full cache
    disk), or None."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (
            f"cannot write the local cache ({exc.strerror}): free space on its disk, lower data.cache_gb "
            "or point data.cache_dir elsewhere"
        )
    if isinstance(exc, NotImplementedError):
        return "this store does not support the operation (an https:// store is read-only: write to s3://, gs://)"
    if isinstance(exc, FileNotFoundError):
        return "no such object"
    if isinstance(exc, PermissionError):
        return f"access denied ({exc})"
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return f"no credentials ({exc}): set the provider's environment variables or data.storage_options"
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(status, int) and status in (401, 403, 404):
        return {404: "no such object"}.get(status, f"access denied (HTTP {status})")
    return None


class ShardStore:
    """A corpus under ``url``: reads (through the cache) and writes of its files by relative path.

    Picklable (DataLoader workers and pool processes rebuild the filesystem on first use).
    """

    def __init__(
        self,
        url: str,
        *,
        cache_dir: str | os.PathLike | None = None,
        cache_gb: float | None = None,
        storage_options: dict[str, Any] | None = None,
        retries: int = RETRIES,
        backoff_s: float = BACKOFF_S,
    ):
        if not is_url(url):
            raise DataError(f"not a URL: {url!r}")
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        if cache_gb is None:
            cache_gb = float(os.environ.get(CACHE_GB_ENV) or DEFAULT_CACHE_GB)
        if not cache_gb > 0:
            raise DataError(f"data.cache_gb must be positive, got {cache_gb}")
        self.cache_bytes = int(cache_gb * 2**30)
        base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache = base / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.retries, self.backoff_s = retries, backoff_s
        self._fs = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_fs=None, _pool=None, _lock=None, _pending={}, _pid=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- plumbing

    def _after_fork(self) -> None:
        """A forked process (a DataLoader worker) inherits the parent's event loop, threads and lock,
        none of which work there: start afresh."""
        if getattr(self, "_pid", None) != os.getpid():
            self._pid = os.getpid()
            self._fs, self._pool, self._pending = None, None, {}
            self._lock = threading.Lock()

    @property
    def fs(self):
        self._after_fork()
        if self._fs is None:
            try:
                import fsspec
            except ImportError:
                raise DataError(
                    f"reading {self.url} needs fsspec and the provider's package: "
                    "pip install 'aioli-fast[cloud]'"
                ) from None
            try:
                # a private instance: fsspec's shared ones are tied to the process that made them
                options = {"skip_instance_cache": True, **self.storage_options}
                self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            except (ImportError, ValueError) as exc:
                raise DataError(f"cannot open {self.url}: {exc} (pip install 'aioli-fast[cloud]')") from exc
        return self._fs

    def _remote(self, rel: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return join_url(self._root, rel) if "://" in self._root else self._root.rstrip("/") + "/" + rel

    def _retry(self, what: str, call):
        """``call()`` with retries of transient errors; one-line DataErrors for the rest."""
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return call()
            except DataError:
                raise
            except Exception as exc:  # noqa: BLE001 - each provider raises its own transient errors
                reason = _permanent(exc)
                if reason is not None:
                    raise DataError(f"{what}: {reason}") from exc
                if attempt == self.retries:
                    raise DataError(
                        f"{what}: failed {self.retries + 1} times ({type(exc).__name__}: {exc})"
                    ) from exc
                time.sleep(delay)
                delay *= 2
                self.fs.invalidate_cache()
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------ reads

    def read_bytes(self, rel: str) -> bytes:
        """The whole object ``rel`` (small files: the manifest, part states)."""
        return self._retry(join_url(self.url, rel), lambda: self.fs.cat_file(self._remote(rel)))

    def exists(self, rel: str) -> bool:
        return self._retry(join_url(self.url, rel), lambda: self.fs.exists(self._remote(rel)))

    def sizes(self) -> dict[str, int]:
        """``{relative path: bytes}`` of the objects under the corpus URL, from one listing (empty where
        the store cannot list, as a plain HTTP server may not)."""
        root = self._remote("").rstrip("/")
        try:
            found = self.fs.find(root, detail=True)
        except Exception:  # noqa: BLE001 - no listing: the caller asks object by object
            return {}
        # a listing without sizes (an HTTP index page) says nothing: those objects are asked one by one
        return {
            name[len(root) :].lstrip("/"): int(info["size"])
            for name, info in found.items()
            if name.startswith(root) and info.get("size")
        }

    def size(self, rel: str) -> int:
        """Bytes of object ``rel`` (a DataError when it is missing)."""
        return int(self._retry(join_url(self.url, rel), lambda: self.fs.size(self._remote(rel))))

    def local(self, rel: str, sha256: str | None = None) -> Path:
        """Where ``rel`` lives in the cache (it may not be there yet). The name carries the manifest's
        sha256, so a corpus prepared again under the same URL never reads an older cached shard."""
        path = self.cache / rel
        return path.with_name(f"{path.name}.{sha256[:16]}") if sha256 else path

    def fetch(self, rel: str, sha256: str | None = None, size: int | None = None) -> Path:
        """Shard ``rel`` in the cache, downloaded (and checked against ``sha256``) when absent."""
        self._after_fork()
        path = self.local(rel, sha256)
        if path.is_file():
            try:
                os.utime(path)  # most recently used
            except OSError:
                pass
            return path
        pending = self._pending.get(rel)
        if pending is not None:
            pending.result()  # a prefetch of it is under way: wait for it (it raises what it raised)
            if path.is_file():
                return path
        return self._download(rel, sha256, size)

    def _download(self, rel: str, sha256: str | None, size: int | None) -> Path:
        path = self.local(rel, sha256)
        url = join_url(self.url, rel)
        if size is not None:
            self.make_room(size, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in (1, 2):
            tmp = path.with_name(f"{PARTIAL}{os.getpid()}-{threading.get_ident()}-{path.name}")
            try:
                self._retry(url, lambda tmp=tmp: self.fs.get_file(self._remote(rel), str(tmp)))
                digest = _sha256(tmp) if sha256 else None
                if digest is not None and digest != sha256:
                    if attempt == 2:
                        raise DataError(
                            f"{url}: sha256 {digest[:16]}... differs from the manifest's {sha256[:16]}... "
                            "(a corrupted or replaced object; prepare the corpus again or restore it)"
                        )
                    continue
                os.replace(tmp, path)
                return path
            except OSError as exc:
                raise DataError(f"{url}: cannot write the cache {self.cache} ({exc})") from exc
            finally:
                if tmp.exists():
                    tmp.unlink()
        raise AssertionError("unreachable")

    def download_unchecked(self, rel: str) -> Path:
        """A fresh download of ``rel`` to a temporary file beside the cache (not in it; unchecked),
        for ``aioli-fast verify``, which checks it itself; the caller deletes it."""
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.cache / f"{PARTIAL}verify-{os.getpid()}-{Path(rel).name}"
        self._retry(join_url(self.url, rel), lambda: self.fs.get_file(self._remote(rel), str(tmp)))
        return tmp

    def make_room(self, need: int, rel: str = "") -> None:
        """Evict the least recently used cached shards until ``need`` more bytes fit the budget."""
        if need > self.cache_bytes:
            raise DataError(
                f"{join_url(self.url, rel)} has {need / 2**20:.1f} MiB, more than the whole cache "
                f"(data.cache_gb = {self.cache_bytes / 2**30:g}): raise data.cache_gb"
            )
        if not self.cache.is_dir():
            return
        files = []
        for p in self.cache.rglob("*"):
            if p.is_file() and not p.name.startswith(PARTIAL):
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total + need <= self.cache_bytes:
                break
            try:
                p.unlink()
                total -= size
            except FileNotFoundError:
                total -= size

    def prefetch(self, items: Iterable[tuple[str, str | None, int | None]]) -> None:
        """Fetch ``(rel, sha256, size)`` shards in the background (errors surface on :meth:`fetch`)."""
        self._after_fork()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aioli-prefetch")
            for rel, sha, size in items:
                if rel in self._pending or self.local(rel, sha).is_file():
                    continue
                future = self._pool.submit(self._download, rel, sha, size)
                self._pending[rel] = future
                future.add_done_callback(lambda _f, rel=rel: self._pending.pop(rel, None))

    # ----------------------------------------------------------------------------------------- writes

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._retry(join_url(self.url, rel), lambda: self.fs.pipe_file(self._remote(rel), data))

    def upload(self, local: Path, rel: str) -> None:
        self._retry(join_url(self.url, rel), lambda: self.fs.put_file(str(local), self._remote(rel)))

    def remove(self, rel: str) -> None:
        try:
            self._retry(join_url(self.url, rel), lambda: self.fs.rm(self._remote(rel), recursive=True))
        except DataError:
            pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
