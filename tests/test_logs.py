"""``--log-format json``: one JSON object per line, saying which connection a line concerns."""

import io
import json
import logging
import subprocess
import sys

import pytest

from activitynet import logs


def logger_to(stream, format):  # noqa: A002
    """A private logger with the handler ``configure`` would install, so pytest's stay untouched."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter() if format == "json" else logging.Formatter(logs.TEXT_FORMAT))
    logger = logging.getLogger(f"activitynet.test-logs-{format}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_record_is_one_json_object_with_time_level_logger_and_message():
    stream = io.StringIO()
    logger = logger_to(stream, "json")
    logger.info("listening on %s:%d", "127.0.0.1", 3780)
    logger.warning("two\nlines")
    first, second = lines(stream)
    assert first["message"] == "listening on 127.0.0.1:3780" and first["level"] == "info"
    assert first["logger"] == "activitynet.test-logs-json" and first["thread"] == "MainThread"
    assert first["time"].endswith("Z") and len(first["time"]) == len("2026-12-02T16:40:00.123Z")
    assert "conn" not in first and "peer" not in first
    assert second["message"] == "two\nlines", "a newline in a message stays inside its line"


def test_the_connection_and_peer_a_line_concerns_are_fields():
    stream = io.StringIO()
    log = logs.for_connection(logger_to(stream, "json"), "conn-7", "127.0.0.1:51000")
    log.info("closing: %s", "line too long")
    log.info("with more", extra={"peer": "127.0.0.1:3781"})
    first, second = lines(stream)
    assert (first["conn"], first["peer"], first["message"]) == ("conn-7", "127.0.0.1:51000", "closing: line too long")
    assert second["peer"] == "127.0.0.1:3781", "a call's own extra wins"


def test_a_traceback_is_one_field_of_the_same_line():
    stream = io.StringIO()
    logger = logger_to(stream, "json")
    try:
        1 / 0
    except ZeroDivisionError:
        logger.exception("error serving conn-3")
    [entry] = lines(stream)
    assert entry["level"] == "error" and "ZeroDivisionError" in entry["exception"]


def test_configure_sends_json_lines_to_the_stream_in_a_real_process():
    code = ("import logging, sys; from activitynet import logs; logs.configure('info', 'json', sys.stderr); "
            "logging.getLogger('activitynet.server').info('hello'); logging.getLogger('x').debug('hidden'); "
            "logs.configure('info', 'json', sys.stderr); logging.getLogger('activitynet.server').info('once')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["message"] for e in entries] == ["hello", "once"], "configured twice: still one handler"
    assert entries[0]["logger"] == "activitynet.server"


def test_text_stays_the_format_people_read():
    stream = io.StringIO()
    logger_to(stream, "text").info("listening")
    assert " INFO [MainThread] activitynet.test-logs-text: listening" in stream.getvalue()


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="log format must be one of text, json, not 'xml'"):
        logs.configure("info", "xml", io.StringIO())
