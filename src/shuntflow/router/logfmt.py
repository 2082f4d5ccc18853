# Structured one-line log records for the router: `ts=... level=... event=... key=value ...`.
#
# Why: the router serves untrusted clients (libraries in containers, peer routers) and must say
# exactly why it dropped one; key=value lines are greppable by tests and by operators, and one
# record per line survives interleaving. Built on stdlib logging so --log-file and stderr are
# the same code path.

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

LOGGER_NAME = "shuntflow.router"


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t\\'):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return text


def format_fields(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        fields: dict[str, Any] = {
            "ts": ts,
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        extra = getattr(record, "kv", None)
        if isinstance(extra, dict):
            fields.update(extra)
        line = format_fields(fields)
        if record.exc_info:
            exc = self.formatException(record.exc_info).replace("\n", " | ")
            line += " exc=" + _quote(exc)
        return line


class EventLogger:
    """`log.info("client_closed", client=3, reason="bad magic")` -> one key=value line."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _emit(self, level: int, event: str, exc: bool, kv: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"kv": kv}, exc_info=exc)

    def debug(self, event: str, **kv: Any) -> None:
        self._emit(logging.DEBUG, event, False, kv)

    def info(self, event: str, **kv: Any) -> None:
        self._emit(logging.INFO, event, False, kv)

    def warning(self, event: str, **kv: Any) -> None:
        self._emit(logging.WARNING, event, False, kv)

    def error(self, event: str, exc: bool = False, **kv: Any) -> None:
        self._emit(logging.ERROR, event, exc, kv)


def get_logger() -> EventLogger:
    return EventLogger(logging.getLogger(LOGGER_NAME))


def ensure_dir(directory: Path, mode: int = 0o755) -> None:
    """mkdir -p with an explicit mode for every directory created (whatever the umask)."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        os.chmod(d, mode)


def setup_logging(log_file: Path | None, level: str = "info") -> None:
    """Route the router's records to log_file (appended) or stderr, one line each."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    new: logging.Handler
    if log_file is not None:
        ensure_dir(log_file.parent)
        new = logging.FileHandler(log_file, encoding="utf-8")
    else:
        new = logging.StreamHandler(sys.stderr)
    new.setFormatter(KeyValueFormatter())
    logger.addHandler(new)
    logger.setLevel(level.upper())
    logger.propagate = False
