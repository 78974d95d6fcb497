"""Ctrl-C and SIGTERM during training: finish the current step, then stop with a checkpoint.

A signal only sets a flag and the loop checks it between steps, so a checkpoint never holds a
half-done step (parameters updated, step count not). A second Ctrl-C raises KeyboardInterrupt at
once.
"""

from __future__ import annotations

import signal
import threading


class Stop(Exception):
    """A stop was asked for; signum is the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopBetweenSteps:
    """with StopBetweenSteps(say) as stop: ... stop.check() between steps (raises Stop).

    Handlers are installed only on the main thread (elsewhere signals cannot be caught) and the
    previous handlers come back on exit."""

    HANDLED = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say=print):
        self.say, self.signum, self.previous = say, None, {}

    def _on_signal(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.say("stopping after this step (press Ctrl-C again to stop now)")

    def check(self) -> None:
        if self.signum is not None:
            raise Stop(self.signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._on_signal) for sig in self.HANDLED}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
