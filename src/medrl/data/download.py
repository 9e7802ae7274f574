"""Shared helpers for the real-data ingest (ISIC 2019, MIMIC-CXR-JPG).

* :func:`fetch` downloads one URL into a cache folder with ``pooch.retrieve`` (hash check,
  temp file, atomic move) through :class:`ResumableDownloader`, a pooch downloader built on
  ``requests`` that keeps an interrupted transfer as ``<file>.part`` and continues it with an
  HTTP ``Range`` request on the next call (``If-Range`` guards against the file having
  changed on the server in between).
* :func:`verify_file` checks a local file against a pinned hash.
* :func:`verify_image` fully decodes an image (JPEG at 1/8 scale, which still reads every
  byte of the entropy-coded stream) so a truncated or corrupt file fails early, naming it.
* :func:`link_or_copy` hard-links (cheap for a 9 GB dataset) and falls back to a copy.

Credentials: callers pass ``auth`` as a ``requests`` auth object; it travels only in the
``Authorization`` header of requests. URLs, log lines and error messages never contain it.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
from pathlib import Path
from typing import IO, Any, Mapping, Optional
from urllib.parse import urlsplit

import pooch
import requests
import urllib3
from PIL import Image, UnidentifiedImageError
from requests.auth import HTTPBasicAuth

from medrl.errors import DataError
from medrl.progress import progress
from medrl.redact import redact, redact_url

log = logging.getLogger(__name__)

_HASH_RE = re.compile(r"^(?:(sha256):)?([0-9a-fA-F]{64})$|^(md5):([0-9a-fA-F]{32})$|^(sha1):([0-9a-fA-F]{40})$")
_CHUNK = 1 << 20


class RedactedBasicAuth(HTTPBasicAuth):
    """HTTP basic auth whose repr never shows the password (safe in logs and tracebacks)."""

    def __repr__(self) -> str:
        return f"RedactedBasicAuth(username={self.username!r}, password='***')"


def check_known_hash(value: str, what: str) -> str:
    """Validate a pinned hash string (``sha256:<64 hex>``, bare 64 hex, ``md5:``/``sha1:``)."""
    if not isinstance(value, str) or not _HASH_RE.match(value.strip()):
        raise DataError(
            f"{what}: pinned hash {value!r} is not valid; expected 'sha256:<64 hex digits>' "
            "(or 'md5:<32 hex>' / 'sha1:<40 hex>')"
        )
    return value.strip().lower()


def check_base_url(base_url: str, what: str) -> str:
    """Reject base URLs that are not http(s) or that embed credentials (they would end up in
    logs and params); the message deliberately does not echo the URL."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DataError(f"{what}: base_url must be an http(s) URL, got scheme {parts.scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise DataError(
            f"{what}: base_url must not contain credentials (user:password@host); "
            "pass them through the environment instead"
        )
    return base_url.rstrip("/")


def is_loopback_host(host: Optional[str]) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves this machine."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_credentials_url(url: str, what: str) -> str:
    """Refuse to send credentials anywhere but https:// (plain http only to a loopback host,
    as in tests): basic auth over http travels in clear text."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname)):
        return url
    raise DataError(
        f"{what}: refusing to send credentials to {redact_url(url)}: it is not an https:// URL, so the "
        "password would travel in clear text (plain http:// is accepted only for a loopback host: "
        "127.0.0.0/8, localhost, ::1); use https://"
    )


# ----------------------------------------------------------------------------- downloads


class ResumableDownloader:
    """pooch-compatible downloader: resumes ``part`` with an HTTP Range request.

    pooch gives each call a fresh temporary ``output_file``; the bytes are accumulated in the
    stable ``part`` file instead, which survives an interrupted run, and moved onto
    ``output_file`` only once complete. pooch then checks the hash and renames into place.
    """

    def __init__(
        self,
        part: Path,
        *,
        auth: Any = None,
        session: Optional[requests.Session] = None,
        progressbar: bool = True,
        timeout: float = 60.0,
        desc: str = "",
    ) -> None:
        self.part = Path(part)
        self.validator = self.part.with_name(self.part.name + ".validator")
        self.auth = auth
        self.session = session
        self.progressbar = progressbar
        self.timeout = timeout
        self.desc = desc or self.part.name.removesuffix(".part")

    def __call__(self, url: str, output_file: Any, pooch_obj: Any = None, check_only: bool = False) -> Optional[bool]:
        session = self.session or requests.Session()
        try:
            if check_only:
                r = session.head(url, auth=self.auth, timeout=self.timeout, allow_redirects=True)
                return r.status_code == 200
            self._download(session, url)
        finally:
            if self.session is None:
                session.close()
        out = output_file if isinstance(output_file, (str, os.PathLike)) else None
        if out is None:  # pooch may hand an open file object; copy into it
            with open(self.part, "rb") as f:
                shutil.copyfileobj(f, output_file)
            self._clear()
        else:
            os.replace(self.part, out)
            self._clear(part_too=False)
        return None

    def _clear(self, part_too: bool = True) -> None:
        for p in ([self.part] if part_too else []) + [self.validator]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def _download(self, session: requests.Session, url: str, _retry: bool = True) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        offset = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Accept-Encoding": "identity"}  # byte offsets must refer to the stored bytes
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if self.validator.exists():
                headers["If-Range"] = self.validator.read_text().strip()
        with session.get(url, headers=headers, auth=self.auth, stream=True, timeout=self.timeout) as r:
            if r.status_code == 416 and offset:
                total = _content_range_total(r.headers.get("Content-Range", ""))
                if total is not None and total == offset:
                    return  # the part file already holds every byte
                if _retry:  # the part is longer than the resource: start over
                    self._clear()
                    return self._download(session, url, _retry=False)
            r.raise_for_status()
            if r.status_code == 206:
                start = _content_range_start(r.headers.get("Content-Range", ""))
                if start != offset:
                    raise requests.exceptions.InvalidHeader(
                        f"server answered Range bytes={offset}- with Content-Range starting at {start}"
                    )
                mode = "ab"
            else:  # 200: the server ignored the range (or the file changed); restart
                offset, mode = 0, "wb"
            encoding = r.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise requests.exceptions.InvalidHeader(f"server sent Content-Encoding {encoding!r}; expected identity")
            length = r.headers.get("Content-Length")
            total = offset + int(length) if length is not None and length.isdigit() else None
            validator = r.headers.get("ETag") or r.headers.get("Last-Modified")
            if validator and not validator.startswith("W/"):
                self.validator.write_text(validator)
            elif mode == "wb":
                with contextlib.suppress(FileNotFoundError):
                    self.validator.unlink()
            if offset:
                log.info("resuming %s at byte %d", self.desc, offset)
            bar = progress(
                desc=self.desc, total=total, initial=offset, unit="B", unit_scale=True,
                unit_divisor=1024, disable=not self.progressbar, leave=False,
            )
            try:
                with open(self.part, mode) as f:
                    # read1 hands over whatever has arrived, so an interrupted transfer keeps
                    # every received byte (iter_content drops its last partial chunk).
                    while chunk := r.raw.read1(_CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
            except urllib3.exceptions.ReadTimeoutError as e:
                raise requests.exceptions.ConnectionError(f"read timed out ({e})") from None
            except urllib3.exceptions.HTTPError as e:
                raise requests.exceptions.ChunkedEncodingError(f"connection broken ({e})") from None
            finally:
                bar.close()
        size = self.part.stat().st_size
        if total is not None and size != total:
            raise requests.exceptions.ChunkedEncodingError(f"received {size} of {total} bytes")


def _content_range_start(value: str) -> Optional[int]:
    m = re.match(r"bytes\s+(\d+)-\d+/(?:\d+|\*)", value.strip())
    return int(m.group(1)) if m else None


def _content_range_total(value: str) -> Optional[int]:
    m = re.match(r"bytes\s+(?:\*|\d+-\d+)/(\d+)", value.strip())
    return int(m.group(1)) if m else None


def fetch(
    url: str,
    dest: str | Path,
    *,
    known_hash: Optional[str],
    auth: Any = None,
    session: Optional[requests.Session] = None,
    progressbar: bool = True,
    auth_hint: str = "",
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` (resumable) unless a copy matching ``known_hash`` is there.

    ``known_hash=None`` skips the check (only for files with no published hash). Every failure
    is a :class:`DataError` naming the file and what went wrong; an interrupted transfer leaves
    ``<dest>.part`` so the next call resumes it; a hash mismatch leaves nothing behind.
    """
    dest = Path(dest)
    if auth is not None:
        check_credentials_url(url, dest.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    downloader = ResumableDownloader(
        part, auth=auth, session=session, progressbar=progressbar, timeout=timeout, desc=dest.name
    )
    try:
        pooch.retrieve(url, known_hash, fname=dest.name, path=dest.parent, downloader=downloader)
    except requests.exceptions.HTTPError as e:
        code = e.response.status_code if e.response is not None else "?"
        reason = e.response.reason if e.response is not None else ""
        hint = ""
        if code in (401, 403):
            hint = f"; {auth_hint}" if auth_hint else "; the server refused access"
        elif code == 404:
            hint = "; expected the file at this URL (check base_url)"
        raise DataError(f"{dest.name}: HTTP {code} {reason} from {redact_url(url)}{hint}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError, requests.exceptions.InvalidHeader) as e:
        have = part.stat().st_size if part.exists() else 0
        raise DataError(
            f"{dest.name}: download from {redact_url(url)} interrupted ({type(e).__name__}: {_safe(e)}); "
            f"{have} bytes kept in {part}, the next run resumes from there"
        ) from None
    except requests.exceptions.RequestException as e:
        raise DataError(f"{dest.name}: download from {redact_url(url)} failed ({type(e).__name__})") from None
    except DataError:
        raise
    except ValueError as e:  # pooch: hash mismatch (the downloaded temp file is already gone)
        raise DataError(f"{dest}: checksum mismatch: {redact(e)}; nothing was kept, re-run to download again "
                        "or correct the pinned hash") from None
    return dest


def _safe(e: BaseException) -> str:
    """Short exception text, redacted; requests' messages carry URLs but never the auth header."""
    text = redact(e)
    return text if len(text) < 300 else text[:300] + "..."


def verify_file(path: str | Path, known_hash: Optional[str]) -> None:
    """Raise DataError if ``path`` does not match ``known_hash`` (no-op when it is None)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if known_hash is None:
        return
    alg, _, want = known_hash.rpartition(":")
    got = pooch.file_hash(str(path), alg=alg or "sha256")
    if got.lower() != want.lower():
        raise DataError(f"{path}: checksum mismatch: {alg or 'sha256'} is {got}, expected the pinned {want}")


def parse_sha256sums(path: str | Path) -> dict[str, str]:
    """Read a PhysioNet-style ``SHA256SUMS.txt`` (``<hex>  <relative path>`` per line)."""
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise DataError(f"{path}: line {n} is not '<sha256>  <path>'")
        out[parts[1].strip().lstrip("*").removeprefix("./")] = parts[0].lower()
    return out


# ----------------------------------------------------------------------------- files & images


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """Hard-link ``src`` to ``dst`` (same filesystem), else copy it."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def verify_image(src: str | Path | IO[bytes], name: str | Path) -> tuple[str, tuple[int, int]]:
    """Decode the whole image (JPEG in draft mode at 1/8 scale); DataError naming ``name``
    if it cannot be read. Returns (mode, size)."""
    try:
        with Image.open(src) as im:
            mode, size = im.mode, im.size
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: unreadable image ({e}); expected a readable JPEG") from None
    return mode, size


def pinned(registry: Mapping[str, Optional[str]], overrides: Optional[Mapping[str, Optional[str]]], name: str) -> Optional[str]:
    """Hash for ``name``: the caller's override wins over the module registry."""
    if overrides and name in overrides:
        return overrides[name]
    return registry.get(name)
