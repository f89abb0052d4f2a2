"""Log lines: the request id on every one, text or JSON (`serve --log-format json`), bounded length.

Rules:
- Every record gets `request_id`: the id of the request whose task logged it (the contextvar the
  app sets per request, inherited by the tasks a request spawns), "-" outside any request. It is
  set by a LogRecord factory, so records of every logger carry it, whatever handler prints them.
- A line is at most MAX_LINE characters, traceback included: a 1 MB model name echoed in a message
  makes a clipped line that says how much was cut, never a 1 MB line.
- JSON lines: {"ts", "level", "logger", "request_id", "message"} (+ "exception"), one object a line.
- Secrets never reach a log line: the gateway logs no headers and no bodies (app.py, formats).
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

from proxy.server.exchange import request_id_var

MAX_LINE = 2000
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def clip_line(line: str, limit: int = MAX_LINE) -> str:
    if len(line) <= limit:
        return line
    return f"{line[:limit]}... [{len(line) - limit} chars cut]"


def install_request_ids() -> None:
    """Every LogRecord made from now on carries `request_id` (once per process; idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "adds_request_id", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = request_id_var.get()
        return record

    factory.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class BoundedFormatter(logging.Formatter):
    """The text format, each line cut at MAX_LINE."""

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return clip_line(super().format(record))


class JSONFormatter(logging.Formatter):
    """One JSON object per line; the message (and traceback) cut so the line stays near MAX_LINE."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": self._time(record), "level": record.levelname, "logger": record.name,
                "request_id": getattr(record, "request_id", "-"),
                "message": clip_line(record.getMessage(), MAX_LINE - 200)}
        if record.exc_info:
            line["exception"] = clip_line(self.formatException(record.exc_info), MAX_LINE // 2)
        return orjson.dumps(line).decode()

    @staticmethod
    def _time(record: logging.LogRecord) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def configure(log_format: str = "text", level: str = "INFO") -> None:
    """The process's logging: one stderr handler in `log_format`, request ids on every record."""
    if log_format not in FORMATS:
        raise ValueError(f"--log-format {log_format!r}: expected one of {', '.join(FORMATS)}")
    install_request_ids()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else BoundedFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
