"""Progress bars that also report when nobody watches a terminal.

`tqdm` here is tqdm's bar with one change: where tqdm would switch itself off (`disable=None` and its stream is
not a terminal: a command piped to a log, a CI job), it writes plain lines instead: none for work done within
`LOG_INTERVAL_S` seconds, else one at most every `LOG_INTERVAL_S` seconds and one with the final count, each a
full line without carriage returns:

    build whitened:  38%|###7      | 3/8 [00:21<00:35,  7.1s/layer]

On a terminal it is tqdm's bar, unchanged; `disable=True` still silences it.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm as _tqdm

LOG_INTERVAL_S = 5.0  # seconds between two progress lines in a log (shorter work leaves none)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class tqdm(_tqdm):  # noqa: N801  (tqdm's own name, so that callers change only their import line)
    """tqdm's progress bar; off a terminal (`disable=None`), plain periodic lines instead of nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        stream = kwargs.get("file") or sys.stderr
        self._lines = kwargs.get("disable", False) is None and stream is not None and not _is_terminal(stream)
        if self._lines:
            kwargs.update(disable=False, mininterval=kwargs.get("mininterval", LOG_INTERVAL_S),
                          delay=kwargs.get("delay", LOG_INTERVAL_S), dynamic_ncols=False,
                          ncols=kwargs.get("ncols") or 100, ascii=True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if not getattr(self, "_lines", False):
            return super().display(msg, pos)
        if msg == "":  # tqdm clearing its line at the end (leave=False): a log keeps its lines
            return None
        self.fp.write((msg if msg is not None else self.__str__()) + "\n")
        self.fp.flush()
        return None

    def close(self) -> None:
        if getattr(self, "_lines", False) and not self.disable:
            shown = self.last_print_t >= self.start_t + self.delay  # tqdm's own test: a line was written
            if shown and self.last_print_n != self.n:
                self.display()  # the last count, once, in the log
            self.leave = False  # tqdm's own closing touches (a final bar, a newline) are for terminals
        super().close()
