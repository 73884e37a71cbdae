"""Progress of long loops: a tqdm bar on a terminal; elsewhere (nohup, Slurm, a log file) a log line at a steady
interval, so a log shows the run is alive without the carriage returns of a bar."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 60.0
CONSOLE_HANDLER = "hrp-ood-console"
Item = TypeVar("Item")


def configure_console_logging() -> None:
    """The package's INFO and above to the current sys.stderr. The `hrp-ood` command may run many times in one
    process (tests, notebooks), each time with another stderr, so the handler is replaced rather than kept pointing
    at an old stream; a process started by `distributed.launch` calls it too."""
    package = logging.getLogger("hrp_ood")
    for stale in [h for h in package.handlers if h.get_name() == CONSOLE_HANDLER]:
        package.removeHandler(stale)  # not flushed or closed: its stream may be closed already
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(CONSOLE_HANDLER)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


def format_duration(seconds: float) -> str:
    """'2h05m', '4m07s', '12s'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ProgressLog:
    """Iterates over `items` like a disabled tqdm bar, and logs "<desc>: step i/total, x it/s, ETA …" once
    `interval` seconds have passed since the start or the last line. `steps_after` (steps still to run after this
    loop, e.g. the run's later epochs) adds the ETA of the whole run."""

    def __init__(
        self,
        items: Iterable[Item],
        *,
        desc: str,
        total: int,
        initial: int = 0,
        steps_after: int = 0,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.items, self.desc, self.total, self.initial = items, desc, total, initial
        self.steps_after = steps_after
        self.interval = LOG_INTERVAL_S if interval is None else interval
        self.clock = clock

    def __iter__(self) -> Iterator[Item]:
        start = last = self.clock()
        done = 0
        for item in self.items:
            yield item
            done += 1
            now = self.clock()
            if now - last >= self.interval and now > start:
                self._log(done, done / (now - start))
                last = now

    def _log(self, done: int, rate: float) -> None:
        left = self.total - self.initial - done
        eta = f"ETA {format_duration(left / rate)}"
        if self.steps_after:
            eta += f" (run {format_duration((left + self.steps_after) / rate)})"
        log.info("%s: step %d/%d, %.2f it/s, %s", self.desc, self.initial + done, self.total, rate, eta)


def progress_steps(
    items: Iterable[Item], *, bar: bool, desc: str, total: int, initial: int = 0, steps_after: int = 0
) -> Iterable[Item]:
    """A tqdm bar over `items` when `bar`, else a `ProgressLog`."""
    if bar:
        return tqdm(items, desc=desc, total=total, initial=initial, leave=False, dynamic_ncols=True)
    return ProgressLog(items, desc=desc, total=total, initial=initial, steps_after=steps_after)


@contextlib.contextmanager
def no_download_bar_off_terminal() -> Iterator[None]:
    """torchvision's download shows a tqdm bar whatever stderr is; off a terminal, turn it off for the block."""
    from torchvision.datasets import utils as download_utils

    if sys.stderr.isatty():
        yield
        return
    bar = download_utils.tqdm
    download_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        download_utils.tqdm = bar
