"""Who may call the server and how often: API keys kept as hashes, per-key rate limits, security headers.

The key file (``tansuo serve --api-key-file FILE``; ``tansuo apikey FILE NAME`` adds a key and prints it
once) holds one key per line, never the key itself::

    # NAME  sha256:HEX  [RATE]      RATE: 10/s, 600/min or 5000/h, optionally :BURST (10/s:20)
    alice   sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  5/s
    batch   sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752

A file holding one bare token (the older format) is still read, as a key named ``default``, with a warning.
A request's key is hashed and compared with every stored hash in constant time. Rate limits are token
buckets per key name (per client address when the server has no keys), answered with 429 and Retry-After.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tansuo.atomic import atomic_write_text
from tansuo.errors import TansuoError

log = logging.getLogger(__name__)

_RATE = re.compile(r"^(\d+(?:\.\d+)?)/(s|sec|second|min|minute|h|hour)(?::(\d+))?$")
_SECONDS = {"s": 1, "sec": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
HEADER = "# NAME  sha256:HEX  [RATE]   (written by tansuo apikey; the keys themselves are not kept)"


@dataclass(frozen=True)
class Rate:
    """``per_second`` requests a second on average, at most ``burst`` at once (by default the N of N/min)."""

    per_second: float
    burst: int
    text: str

    @classmethod
    def parse(cls, text: str) -> Rate:
        m = _RATE.match(text.strip())
        if m is None or float(m.group(1)) <= 0:
            raise TansuoError(
                f"rate {text!r} is not understood; write requests per time, as 10/s, 600/min or 5000/h, "
                "optionally with the most at once after a colon (10/s:20)"
            )
        per_second = float(m.group(1)) / _SECONDS[m.group(2)]
        burst = int(m.group(3)) if m.group(3) else max(1, math.ceil(float(m.group(1))))  # N per window
        return cls(per_second, burst, text.strip())


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str  # hex digest of the key
    rate: Rate | None = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_key_file(path: str | Path) -> list[ApiKey]:
    """The keys a key file names (see the module's docstring).

    Raises:
        TansuoError: The file is unreadable or empty, or a line is not ``NAME sha256:HEX [RATE]`` (the
            error names the line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TansuoError(f"cannot read --api-key-file {path}: {e}") from e
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise TansuoError(f"--api-key-file {path} holds no key; add one with `tansuo apikey {path} NAME`")
    if len(lines) == 1 and len(lines[0][1].split()) == 1 and not lines[0][1].startswith("sha256:"):
        log.warning(
            "%s holds a key in plain text; `tansuo apikey FILE NAME` writes keys as hashes (with names)", path
        )
        return [ApiKey("default", hash_key(lines[0][1]))]
    keys: dict[str, ApiKey] = {}
    for n, line in lines:
        parts = line.split()
        where = f"--api-key-file {path}, line {n}"
        if len(parts) not in (2, 3) or not parts[1].startswith("sha256:"):
            raise TansuoError(f"{where}: expected 'NAME sha256:HEX [RATE]', got {line[:40]!r}")
        name, digest = parts[0], parts[1].removeprefix("sha256:").lower()
        if not _NAME.match(name):
            raise TansuoError(f"{where}: the name {name!r} may hold letters, digits and _ . @ - only")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise TansuoError(f"{where}: the sha256 of a key is 64 hexadecimal digits")
        if name in keys:
            raise TansuoError(f"{where}: the name {name!r} is used twice; names tell keys apart in the log")
        try:
            rate = Rate.parse(parts[2]) if len(parts) == 3 else None
        except TansuoError as e:
            raise TansuoError(f"{where}: {e}") from None
        keys[name] = ApiKey(name, digest, rate)
    return list(keys.values())


def add_key(path: str | Path, name: str, rate: str | None = None) -> str:
    """Append a new random key named ``name`` to the key file (created if missing; atomically) and return it:
    the only time the key itself is seen."""
    path = Path(path)
    if not _NAME.match(name):
        raise TansuoError(f"the key name {name!r} may hold letters, digits and _ . @ - only (at most 64)")
    if rate is not None:
        Rate.parse(rate)
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    if existing.strip():
        if "sha256:" not in existing:
            raise TansuoError(f"{path} holds a plain-text key; move it away and add keys to a new file")
        if any(k.name == name for k in read_key_file(path)):
            raise TansuoError(f"{path} already has a key named {name!r}; choose another name")
    key = "tsk-" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    lines = existing.rstrip("\n").splitlines() if existing.strip() else [HEADER]
    lines.append(f"{name} sha256:{hash_key(key)}" + (f" {rate}" if rate else ""))
    atomic_write_text(path, "\n".join(lines) + "\n")
    path.chmod(0o600)
    return key


class KeyRing:
    """The server's keys: which one a request's bearer token is, compared in constant time."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    def match(self, given: str) -> ApiKey | None:
        digest = hash_key(given).encode()
        found = None
        for key in self.keys:  # every key compared, found or not
            if hmac.compare_digest(digest, key.sha256.encode()):
                found = key
        return found


class RateLimiter:
    """Token buckets by name: ``allow(name, rate)`` takes one token or says how long until one is there."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, time)
        self._lock = threading.Lock()

    def allow(self, name: str, rate: Rate) -> float:
        """0 when the request may go; else the seconds to wait."""
        with self._lock:
            now = self.clock()
            tokens, then = self._buckets.get(name, (float(rate.burst), now))
            tokens = min(float(rate.burst), tokens + (now - then) * rate.per_second)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / rate.per_second


# ------------------------------------------------------------------------------------------ headers
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def content_security_policy(html: str) -> str:
    """A policy for a page of this server: scripts only from this server or inline ones of exactly this
    page (by hash), nothing loaded from anywhere else, no framing."""
    hashes = [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode("utf-8")).digest()).decode() + "'"
        for body in re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", html, flags=re.S)
    ]
    return "; ".join(
        [
            "default-src 'self'",
            "script-src 'self' " + " ".join(hashes),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data: blob:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
        ]
    )
