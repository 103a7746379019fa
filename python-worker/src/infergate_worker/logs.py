"""How a worker writes its log records: as text for a person at a terminal,
or one JSON object per line for the gateway that spawned it, which forwards
each as one record of its own with these fields (a traceback stays in its
record instead of becoming a line each)."""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any

from infergate_worker.context import current_context

#: Exit status of a worker whose model's ``load()`` raised: the gateway
#: counts these towards marking the pool failed instead of starting.
EXIT_LOAD_FAILED = 3

_FIELDS = ("request_id", "trace_id", "model")


class CallFields(logging.Filter):
    """Puts the current call's request id, trace id and model on every log
    record (``-`` outside a call) unless the record names its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_context()
        for key, value in zip(_FIELDS, (ctx.request_id, ctx.trace_id, ctx.model), strict=True):
            if not getattr(record, key, ""):
                setattr(record, key, value or "-")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``level``, ``logger``, ``message``, the
    call's fields when there are any, ``traceback`` when the record has one,
    ``event`` when it tells the gateway something (``loaded``,
    ``load_failed``)."""

    _plain = logging.Formatter()

    @classmethod
    def fields(cls, record: logging.LogRecord) -> dict[str, str]:
        """The record's fields beside its message."""
        out: dict[str, str] = {}
        for key in (*_FIELDS, "event"):
            value = getattr(record, key, "")
            if value and value != "-":
                out[key] = str(value)
        if record.exc_info:
            out["traceback"] = cls._plain.formatException(record.exc_info)
        elif record.stack_info:
            out["traceback"] = cls._plain.formatStack(record.stack_info)
        return out

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields(record),
        }
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(levelname)s %(name)s [request_id=%(request_id)s trace_id=%(trace_id)s] %(message)s"


def configure(level: str, fmt: str) -> None:
    """Send every record to stderr in ``fmt`` (``text`` or ``json``), and
    log what would otherwise reach stderr as a bare traceback (an exception
    no one caught, on any thread) as one record."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallFields())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    log = logging.getLogger("infergate_worker")

    def uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        log.critical("uncaught %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb))

    def uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None:
            return
        name = args.thread.name if args.thread else "?"
        log.error(
            "uncaught %s in thread %s: %s",
            args.exc_type.__name__,
            name,
            args.exc_value,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    sys.excepthook = uncaught
    threading.excepthook = uncaught_in_thread
