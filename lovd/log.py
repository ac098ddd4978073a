"""Logging to journald's native protocol (structured fields) or readable stderr.

Under systemd, stderr is connected to the journal and $JOURNAL_STREAM names it;
then records are sent as native journal entries so fields like SESSION_ID and
REQUEST_ID are queryable (``journalctl -u lovd SESSION_ID=…``). Otherwise plain
lines go to stderr. ``LOVD_DEBUG=lovd.sessions,lovd.runner`` (or ``1`` for all)
turns on debug logging per module.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import sys
import traceback

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELDS = ("SESSION_ID", "REQUEST_ID", "UNIT", "CONTAINER_ID", "CODE")
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        if rid and not getattr(record, "REQUEST_ID", None):
            record.REQUEST_ID = rid
        return True


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    def __init__(self, identifier: str = "lovd", path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            parts = [
                _field("MESSAGE", msg),
                _field("PRIORITY", str(_PRIORITY.get(record.levelno, 6))),
                _field("SYSLOG_IDENTIFIER", self.identifier),
                _field("LOGGER", record.name),
                _field("CODE_FILE", record.pathname),
                _field("CODE_LINE", str(record.lineno)),
                _field("CODE_FUNC", record.funcName),
            ]
            for name in FIELDS:
                value = getattr(record, name, None)
                if value:
                    parts.append(_field(name, str(value)))
            self.sock.sendto(b"".join(parts), self.path)
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


class StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(
            f"{n.lower()}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None)
        )
        return f"{line} [{extras}]" if extras else line


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(StderrFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    debug = os.environ.get("LOVD_DEBUG", "")
    if debug in ("1", "all", "*"):
        logging.getLogger("lovd").setLevel(logging.DEBUG)
    else:
        for name in filter(None, (d.strip() for d in debug.split(","))):
            logging.getLogger(name).setLevel(logging.DEBUG)
