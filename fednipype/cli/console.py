"""What the commands print while they work: log levels (quiet by default), each warning once,
and a progress line on terminals.

By default only warnings and errors are printed; ``-v`` adds fednipype's INFO lines and
Nipype's warnings (with node tracebacks), ``-vv`` everything at DEBUG and Nipype's INFO.
Identical messages are printed once per run. Nipype's own stdout handler is removed so its
records go to stderr once, through the same handler.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

#: Marks the handler installed by :func:`setup_logging` (replaced on the next call).
_HANDLER_FLAG = "_fednipype_console"
#: Nipype's loggers and the level they get per verbosity (0, 1, 2+).
_NIPYPE_LEVELS = ("CRITICAL", "WARNING", "INFO")
_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)


class OnceFilter(logging.Filter):
    """Let each distinct (level, logger, message) through once.

    >>> f = OnceFilter()
    >>> record = logging.LogRecord("x", logging.WARNING, "", 0, "same", None, None)
    >>> f.filter(record), f.filter(record)
    (True, False)
    """

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[int, str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


class _Formatter(logging.Formatter):
    """``prog: warning: message``; with ``-v`` the logger's name too."""

    def __init__(self, prog: str, verbose: int) -> None:
        super().__init__()
        self._prog, self._verbose = prog, verbose

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower()
        where = f" [{record.name}]" if self._verbose else ""
        text = f"{self._prog}: {level}{where}: {record.getMessage()}"
        if record.exc_info and self._verbose:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(prog: str, verbose: int = 0, *, stream: TextIO | None = None) -> None:
    """Configure logging for one command run (safe to call again, e.g. in tests).

    Parameters
    ----------
    prog : str
        Command name, first on each line.
    verbose : int
        0: warnings and errors; 1: also INFO (and Nipype's warnings); 2: DEBUG, Nipype's INFO.
    stream : file-like, optional
        Where to print (default: the current ``sys.stderr``).
    """
    verbose = max(0, min(int(verbose), 2))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_FLAG, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_FLAG, True)
    handler.setFormatter(_Formatter(prog, verbose))
    handler.addFilter(OnceFilter())
    root.addHandler(handler)
    root.setLevel(_LEVELS[verbose])
    logging.captureWarnings(True)
    for name in ("fednipype", "py.warnings"):
        logging.getLogger(name).setLevel(_LEVELS[verbose])
    # pybids and its schema tools announce defaults at INFO: only with -vv.
    for name in ("bids", "bidsschematools"):
        logging.getLogger(name).setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    if "nipype" in sys.modules:
        configure_nipype(verbose)


def configure_nipype(verbose: int = 0) -> None:
    """Route Nipype's loggers through the root handler (no second handler) at the verbosity's
    level: CRITICAL by default (node failures are reported by fednipype, one line each),
    WARNING with ``-v`` (node tracebacks), INFO with ``-vv``.

    Call it once Nipype is imported (importing Nipype installs its own stdout handler).
    """
    # Imported here: fednipype-meta uses this module and must run without Nipype.
    from nipype import config
    from nipype import logging as nipype_logging

    level = _NIPYPE_LEVELS[max(0, min(int(verbose), 2))]
    config.update_config(
        {
            "logging": {
                "workflow_level": level,
                "interface_level": level,
                "utils_level": level,
                "filemanip_level": level,
            }
        }
    )
    nipype_logging.update_logging(config)
    top = logging.getLogger("nipype")
    for handler in list(top.handlers):
        top.removeHandler(handler)
    top.propagate = True


class Progress:
    """``subjects done/total, failed, elapsed`` on one rewritten line of a terminal.

    Silent when ``stream`` is not a terminal (logs, CI, pipes). Usable as Nipype's
    ``status_callback`` (:meth:`node_status`).

    Parameters
    ----------
    total : int
        Units of work (subject/session images).
    label : str
        What is counted.
    stream : file-like, optional
        Default: the current ``sys.stderr``.
    enabled : bool, optional
        Default: whether ``stream`` is a terminal.
    count_node : str
        Name of the node whose completion finishes one unit.

    Examples
    --------
    >>> import io
    >>> out = io.StringIO()
    >>> p = Progress(2, "subjects", stream=out, enabled=True)
    >>> p.advance(); p.advance(failed=True); p.close()
    >>> out.getvalue().splitlines()[-1].split(",")[0].strip()
    'participant: 2/2 subjects done (1 failed)'
    """

    def __init__(
        self,
        total: int,
        label: str = "subjects",
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        count_node: str = "ds_features",
    ) -> None:
        self.total, self.label, self.count_node = total, label, count_node
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.done = self.failed = 0
        self._started = time.monotonic()
        self._shown = False

    def advance(self, *, failed: bool = False) -> None:
        """Count one finished unit and redraw."""
        self.done += 1
        self.failed += int(failed)
        self._draw()

    def node_status(self, node: Any, status: str) -> None:
        """Nipype ``status_callback``: a unit ends when ``count_node`` ends or any node fails."""
        name = getattr(node, "name", "")
        if status == "end" and name == self.count_node:
            self.advance()
        elif status == "exception":
            self.advance(failed=True)

    def _draw(self) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._started
        failed = f" ({self.failed} failed)" if self.failed else ""
        line = (
            f"participant: {min(self.done, self.total)}/{self.total} {self.label} done{failed}, "
            f"{elapsed:.0f} s elapsed"
        )
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        """End the progress line (a newline, if anything was drawn)."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
