"""Rate-limited logging for what peers can trigger at will (bad messages, refused kinds): at
most one line per key per interval, with a count of what was held back, so a hostile or
broken peer cannot flood the log. The table of keys is bounded. `few` shortens long lists."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

MAX_KEYS = 256


class RateLimitedLog:
    """`log(key, fmt, *args)`: logs at `level` unless `key` logged within `interval_s`."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.WARNING
    ) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.level = level
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last logged, held back since)

    def log(self, key: str, fmt: str, *args: object, now: float | None = None) -> bool:
        """Log one line (whether it was logged, or only counted)."""
        now = time.monotonic() if now is None else now
        last, held = self._last.get(key, (-float("inf"), 0))
        if now - last < self.interval_s:
            self._last[key] = (last, held + 1)
            return False
        if len(self._last) >= MAX_KEYS and key not in self._last:
            self._last.clear()
        more = f" (and {held} more like it in {now - last:.0f} s)" if held else ""
        self.logger.log(self.level, "%s%s", fmt % args if args else fmt, more)
        self._last[key] = (now, 0)
        return True


def few(items: Iterable[object], n: int = 8, sep: str = ", ") -> str:
    """At most `n` items joined by `sep`, then "(and K more)": a log line or an error about
    thousands of tenants names a few, not all of them (one line of 100 kB helps no one)."""
    items = list(items)
    head = sep.join(map(str, items[:n]))
    return f"{head}{sep}(and {len(items) - n} more)" if len(items) > n else head
