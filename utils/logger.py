"""One logging set-up for the whole codebase; only rank 0 speaks.

Modules log through `logging.getLogger(__name__)` (the entry points through the
`comoe` logger). `setup_logger` sends all of them, and Python warnings, with
timestamps to the console and to the run's log file. Console lines go through
`tqdm.write`, which lifts a live progress bar out of the way and redraws it
after the line; progress bars are drawn only when stderr is a terminal.

A run's log file only exists once its start-up has succeeded (a failed start
leaves no run folder), but the start-up logs too: config warnings, data
generation, weight downloads, the image cache. Until a file is set up, rank 0
keeps those records (`StartupRecords`) and writes them to the first log file it
is given; a start that fails drops them with its process.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from .errors import UserInputWarning

LOGGER_NAME = "comoe"
# Loggers of this codebase (module loggers are children of their package's) that
# log at INFO; other libraries' loggers keep Python's default level, WARNING.
PACKAGE_LOGGERS = (LOGGER_NAME, "datasets", "model", "processor", "solver", "utils")
FORMAT = logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")

_installed: list[logging.Handler] = []  # the root handlers of the current set-up
_SHOW_WARNING = warnings.showwarning


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` replacement: Python warnings become log records. A warning
    about the user's input names the key or value itself; the line of code that raised
    it would only mislead."""
    if issubclass(category, UserInputWarning):
        text = f"{category.__name__}: {message}"
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line)
    logging.getLogger("py.warnings").warning("%s", text.rstrip())


class TqdmConsoleHandler(logging.StreamHandler):
    """A console handler that never writes into a live tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise; report as logging does
            self.handleError(record)


class StartupRecords(logging.Handler):
    """Keeps the records logged before the run's log file exists (see the module
    docstring); `setup_logger` hands them on to the next set-up."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_logger(output_dir: str | Path | None, rank: int = 0,
                 filename: str = "train.log") -> logging.Logger:
    """Route this codebase's loggers and Python warnings to the console and to
    `output_dir/filename` (rank 0; other ranks stay silent). Calling it again
    replaces the previous set-up. Without `output_dir`, rank 0 keeps the records
    for the next set-up, and the first one with a file writes them there first.
    Returns the `comoe` logger."""
    pending = [record for handler in _installed if isinstance(handler, StartupRecords)
               for record in handler.records]
    close_logger()
    root = logging.getLogger()
    for name in PACKAGE_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = True
    warnings.showwarning = _log_warning
    log_file = None
    if rank != 0:
        handlers: list[logging.Handler] = [logging.NullHandler()]
    elif output_dir is None:
        handlers = [TqdmConsoleHandler(sys.stdout), StartupRecords(pending)]
    else:
        log_file = logging.FileHandler(Path(output_dir) / filename, mode="a", encoding="utf-8")
        handlers = [TqdmConsoleHandler(sys.stdout), log_file]
    for handler in handlers:
        handler.setFormatter(FORMAT)
        root.addHandler(handler)
        _installed.append(handler)
    if log_file is not None:
        for record in pending:
            log_file.handle(record)
    return logging.getLogger(LOGGER_NAME)


def close_logger() -> None:
    """Undo `setup_logger`: remove and close its handlers and give Python warnings back
    their own display (e.g. between runs in one process)."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    warnings.showwarning = _SHOW_WARNING


class Progress:
    """Progress of a loop on rank 0: a tqdm bar when stderr is a terminal, otherwise
    (no bar frames in a redirected stderr) a log line at most every `every` seconds,
    or none when `every` is None."""

    def __init__(self, total: int, desc: str, initial: int = 0, rank: int = 0,
                 every: float | None = None) -> None:
        self.total, self.desc, self.done = total, desc, initial
        self.every = every if rank == 0 else None
        self.bar = None
        if rank == 0 and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False,
                            dynamic_ncols=True, file=sys.stderr)
        self._last_line = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.every is not None and time.perf_counter() - self._last_line >= self.every:
            self._last_line = time.perf_counter()
            logging.getLogger(LOGGER_NAME).info("%s: %d/%d", self.desc, self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def log_to_file(level: int, message: str, exc_info=None, name: str = LOGGER_NAME) -> None:
    """A record for the log files only: for messages the console shows another way
    (an entry point prints fatal errors to stderr). It takes the path a record of
    logger `name` takes (its handlers, then its ancestors' while it propagates)."""
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 0, message, None, exc_info)
    node = logger
    while node is not None:
        for handler in node.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        node = node.parent if node.propagate else None
