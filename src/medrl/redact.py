"""Keep secrets out of messages, logs and tracebacks.

Two kinds of secret can reach text medrl prints:

* the userinfo of a URL (``https://user:password@host/...``): MLflow's exception messages
  carry the tracking URI as given in ``MLFLOW_TRACKING_URI``, credentials included;
* the literal values of secret environment variables (``PHYSIONET_PASSWORD``,
  ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN`` and the password inside
  ``MLFLOW_TRACKING_URI``), wherever they appear.

:func:`redact` replaces both; :func:`format_exception` is a redacted
``traceback.format_exception``; :func:`install_log_redaction` adds a filter that redacts
every record of the handlers that exist when it is called (root, ``mlflow``, ``urllib3``, ...).
"""
from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import Callable, Iterable, Mapping, Optional
from urllib.parse import unquote, urlsplit

SECRET_ENV = ("PHYSIONET_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
MASK = "***"
_MIN_SECRET_LEN = 4  # shorter values would mangle every message they happen to occur in
# scheme://userinfo@ : userinfo holds no '/', '?', '#', '@' or whitespace (RFC 3986)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"<>]+)@")


def secrets_from_env(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The secret values found in the environment (each also URL-decoded), longest first."""
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for k in SECRET_ENV:
        if env.get(k):
            found.add(env[k])
    for k in URI_ENV:
        uri = env.get(k) or ""
        try:
            parts = urlsplit(uri)
            userinfo = [parts.password, parts.username if parts.password is None else None]
        except ValueError:
            userinfo = []
        found.update(u for u in userinfo if u)
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if len(s) >= _MIN_SECRET_LEN), key=len, reverse=True)


def redact(text: object, secrets: Optional[Iterable[str]] = None) -> str:
    """``text`` with every ``scheme://user:pass@`` userinfo and every secret value masked."""
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", str(text))
    for s in secrets_from_env() if secrets is None else secrets:
        if s and len(s) >= _MIN_SECRET_LEN:
            out = out.replace(s, MASK)
    return out


def redact_url(url: str) -> str:
    """A URL for messages: its userinfo (if any) masked."""
    return redact(url)


def format_exception(exc: BaseException) -> str:
    """``traceback.format_exception(exc)`` (the whole chain), redacted."""
    return redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class RedactFilter(logging.Filter):
    """Handler filter: rewrites each record's message (and its exception text) redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler's error path
            return True
        red = redact(msg)
        if red != msg:
            record.msg, record.args = red, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactFilter()
LOGGERS = ("", "mlflow", "urllib3", "requests", "pooch", "medrl", "alembic", "sqlalchemy")


def install_log_redaction(names: Iterable[str] = LOGGERS) -> None:
    """Add the redacting filter to every handler of the named loggers (and to logging's
    last-resort handler). Idempotent; call again after a library (MLflow) adds handlers."""
    handlers = [logging.lastResort] if logging.lastResort is not None else []
    for name in names:
        handlers += logging.getLogger(name).handlers
    for h in handlers:
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)


def run_redacted(fn: Callable[[], int | None]) -> int:
    """Run a command's body with redacting log filters; an exception is printed redacted (its
    text may carry the tracking URI's password) and becomes exit status 1 (130 on Ctrl-C)."""
    install_log_redaction()
    try:
        return int(fn() or 0)
    except KeyboardInterrupt as e:
        print(format_exception(e), file=sys.stderr, end="")
        return 130
    except Exception as e:
        print(format_exception(e), file=sys.stderr, end="")
        return 1
