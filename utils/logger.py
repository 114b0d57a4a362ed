"""Logging to the console and `train.log`; only rank 0 speaks."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

LOGGER_NAME = "comoe"


def setup_logger(output_dir: str | Path | None, rank: int = 0, filename: str = "train.log",
                 name: str = LOGGER_NAME) -> logging.Logger:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir is not None:
        file_handler = logging.FileHandler(Path(output_dir) / filename, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


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
