"""One logger for every ftmem process, writing `ftmem <where>: message` lines to stderr."""

from __future__ import annotations

import logging
import sys
import time
from typing import Callable


def get_logger(where: str) -> logging.Logger:
    logger = logging.getLogger(f"ftmem.{where}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s] ftmem {where} %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class Throttled:
    """A warning that may recur in floods, logged one by one at most `burst` times per `window_s`; the rest are
    counted and their number logged once the window is over (`flush`, which the caller's loop calls). Forged peer
    frames can come from anyone who reaches the peer port: they must not fill the disk with log lines."""

    def __init__(self, logger: logging.Logger, what: str, burst: int = 20, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger, self.what, self.burst, self.window_s, self._clock = logger, what, burst, window_s, clock
        self._window_end: float | None = None
        self._logged = self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        self.flush()
        if self._window_end is None:
            self._window_end = self._clock() + self.window_s
        if self._logged < self.burst:
            self._logged += 1
            self._logger.warning(msg, *args)
        else:
            self._suppressed += 1

    def flush(self) -> None:
        if self._window_end is None or self._clock() < self._window_end:
            return
        if self._suppressed:
            self._logger.warning("%d more %s within %.0fs, not logged one by one", self._suppressed, self.what,
                                 self.window_s)
        self._window_end, self._logged, self._suppressed = None, 0, 0
