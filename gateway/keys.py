"""API keys: several client keys, each with a name for logs and metrics, and a separate admin key.

Where keys come from (all of them count): ``--api-key`` (repeatable), ``GATEWAY_API_KEY`` / ``api_key`` in the
config file, ``api_keys`` in the config file, and ``--api-key-file`` with one key per line. Each entry is
``NAME:KEY`` or a bare ``KEY``; a bare key is named ``key-`` + the first 8 hex digits of its SHA-256 (stable, and
no use to anyone who reads it). A key that itself contains ``:`` must be given with a name. In the file, blank
lines and lines starting with ``#`` are skipped.

Checking: the presented token's SHA-256 is compared with every key's SHA-256 with ``hmac.compare_digest``, all of
them every time, so neither the time taken nor anything else tells which key (or which length) came close.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.settings import SettingsError


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key; the key itself is not kept


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_key(entry: str, where: str) -> ApiKey:
    """``NAME:KEY`` or ``KEY`` -> an ``ApiKey``; ``where`` names the source in error messages."""
    entry = entry.strip()
    name, sep, key = entry.partition(":")
    if not sep:
        name, key = "", entry
    name, key = name.strip(), key.strip()
    if not key or any(c.isspace() for c in key):
        raise SettingsError(f"{where}: an API key must be one word without spaces (NAME:KEY or KEY)")
    if sep and not name:
        raise SettingsError(f"{where}: empty key name before ':'")
    digest = _digest(key)
    return ApiKey(name or f"key-{digest.hex()[:8]}", digest)


def read_key_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"--api-key-file {path}: {exc.strerror or exc}") from exc
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class KeyRing:
    """The client keys (``match``) and the admin key (``is_admin``). Empty: the API is open."""

    def __init__(self, keys: Iterable[ApiKey], admin_key: str | None = None) -> None:
        self.keys = tuple(keys)
        names = [k.name for k in self.keys]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SettingsError(f"API key names must be unique; repeated: {', '.join(repeated)}")
        self._admin = None if admin_key is None else _digest(admin_key)

    @classmethod
    def from_settings(cls, *, entries: Iterable[str], key_file: str | None, admin_key: str | None) -> KeyRing:
        keys = [parse_key(entry, "--api-key") for entry in entries]
        if key_file is not None:
            keys += [parse_key(line, f"--api-key-file {key_file} line {i}")
                     for i, line in enumerate(read_key_file(key_file), 1)]
        return cls(keys, admin_key)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def match(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or ``None``; compares with every key (constant time over the key set)."""
        presented = _digest(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found

    def is_admin(self, token: str) -> bool:
        return self._admin is not None and hmac.compare_digest(_digest(token), self._admin)

    @property
    def has_admin(self) -> bool:
        return self._admin is not None


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
