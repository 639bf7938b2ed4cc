"""One logger for every ftmem process, writing `ftmem <where>: message` lines to stderr."""

from __future__ import annotations

import logging
import sys


def get_logger(where: str) -> logging.Logger:
    logger = logging.getLogger(f"ftmem.{where}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s] ftmem {where} %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
