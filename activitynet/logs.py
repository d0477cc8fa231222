"""Logging set-up for the commands: lines for people (``text``) or for machines (``json``).

``configure(level, format, stream)`` is called once by a command's ``main``; modules only ever
``logging.getLogger(__name__)``. With ``--log-format json`` each record is one JSON object on one
line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``thread``, ``message``,
then ``conn`` and ``peer`` when the record concerns a connection, and ``exception`` (the
traceback text) when there is one. Code says which connection a line is about with
``for_connection(log, name, peer)`` (a ``LoggerAdapter``) or ``extra={"conn": ..., "peer": ...}``.
"""

import json
import logging
import time

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(threadName)s] %(name)s: %(message)s"
CONTEXT = ("conn", "peer")  # record attributes that say which connection a line concerns


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped)."""

    def format(self, record):
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        for key in CONTEXT:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value if isinstance(value, (str, int, float)) else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class ConnectionLog(logging.LoggerAdapter):
    """A logger whose records say which connection (and peer address) they concern."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **kwargs.get("extra", {})}
        return msg, kwargs


def for_connection(logger, conn, peer=None):
    """``logger`` for lines about connection ``conn`` (its name) with ``peer`` ("host:port")."""
    return ConnectionLog(logger, {"conn": conn, "peer": peer})


def configure(level, format, stream):  # noqa: A002 (the flag's name)
    """Send every activitynet record of ``level`` or above to ``stream`` in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {format!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.activitynet = True
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "activitynet", False)]:
        root.removeHandler(old)  # configured again (tests run commands in-process): replace ours only
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
