"""The contract of a shared-tier store, and what every backend shares: URLs, redaction, errors.

A backend (:mod:`dynkv.tiers.shared.redis`, :mod:`dynkv.tiers.shared.mooncake`)
is the only importer of its store's client library. It stores opaque values
under string keys, in batches: :meth:`StoreBackend.exists`,
:meth:`StoreBackend.put` and :meth:`StoreBackend.get`. A value is given and
read as two parts (its page header, from a batch's headers lying side by
side, then the page itself in the host pool), so a backend that can send
from and receive into several buffers per value does so without joining them
first. Every call returns within the backend's timeout or
raises :class:`StoreUnavailable`; what a value holds, and whether it may be
used, is :mod:`dynkv.tiers.shared.tier`'s business.

URLs may carry credentials (``redis://user:secret@host:6379/0``); every
message that names a store shows it through :func:`redact`.

Page checksums are CRC-32C from the ``crc32c`` package (:func:`crc32c`), a
dependency of dynkv that only this tier needs: without it an engine with no
``remote_url`` still starts, and a shared tier refuses to open
(:func:`require_crc32c`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = ["GOT", "MISSING", "SCHEMES", "WRONG_SIZE", "StoreBackend", "StoreUnavailable", "crc32c", "redact",
           "require_crc32c", "scheme_of"]

try:
    from crc32c import crc32c
except ImportError as _missing:
    _CRC32C_MISSING: ImportError | None = _missing

    def crc32c(data: Any, value: int = 0) -> int:
        """Stand-in while the package is missing: every call says so."""
        raise _no_crc32c()
else:
    _CRC32C_MISSING = None


def _no_crc32c() -> ImportError:
    err = ImportError("dynkv's shared tier (remote_url) checksums every page with the crc32c package, which is "
                      "not installed: pip install crc32c (a dependency of dynkv)")
    err.__cause__ = _CRC32C_MISSING
    return err


def require_crc32c() -> None:
    """Raise ``ImportError`` naming the package if ``crc32c`` is not installed."""
    if _CRC32C_MISSING is not None:
        raise _no_crc32c()

# get() outcome of one key
GOT = 0  # the value filled its parts exactly
MISSING = 1  # no such key (never stored, or evicted by the store)
WRONG_SIZE = 2  # a value of another length: not a page of this geometry

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "mooncake")

_USERINFO = re.compile(r"(?<=://)[^/@]*@")


class StoreUnavailable(ConnectionError):
    """The store did not answer in time, refused the connection, or failed the call."""


def redact(url: str) -> str:
    """``url`` without its credentials: ``redis://u:secret@h:1/0`` -> ``redis://***@h:1/0``."""
    return _USERINFO.sub("***@", url)


def scheme_of(url: str) -> str:
    """The URL's scheme, checked against :data:`SCHEMES`.

    Raises
    ------
    ValueError
        Another scheme, or no ``host:port`` after it; the message shows the URL redacted.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"{redact(str(url))!r} is not a store URL: expected SCHEME://HOST:PORT with SCHEME one of "
                         f"{', '.join(SCHEMES)}")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{redact(url)!r}: unknown scheme {scheme!r}, expected one of {', '.join(SCHEMES)}")
    rest = urlsplit(url)
    netloc = rest.netloc.rsplit("@", 1)[-1]
    for hostport in netloc.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{redact(url)!r}: {hostport!r} is not HOST:PORT (every address needs its port)")
    return scheme


class StoreBackend(Protocol):
    """Batched access to one store; thread-safe (the shared tier calls it from several threads).

    Keys are ASCII strings. The value of ``keys[i]`` is its header, the
    ``i``-th of ``len(keys)`` equal slices of ``heads``, then ``pages[i]``:
    writable (get) or readable (put) contiguous buffers.
    Every method raises :class:`StoreUnavailable` when the store cannot
    answer within the backend's timeout.
    """

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored (one round trip for the batch)."""
        ...

    def put(self, keys: Sequence[str], heads: memoryview, pages: Sequence[memoryview]) -> list[bool]:
        """Store each key's value, its header then its page; False where the store refused one (full)."""
        ...

    def get(self, keys: Sequence[str], heads: memoryview, pages: Sequence[memoryview]) -> list[int]:
        """Read each key's value into its header and page: :data:`GOT`, :data:`MISSING` or :data:`WRONG_SIZE`
        per key."""
        ...

    def remove(self, keys: Sequence[str]) -> None:
        """Delete keys (values that failed their checks, so the next write replaces them)."""
        ...

    def register(self, buf: memoryview) -> None:
        """Memory that pages and headers will often lie in (the host pool): a backend that can send from it in place does."""
        ...

    def close(self) -> None: ...
