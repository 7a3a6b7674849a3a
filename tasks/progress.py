"""Live progress of the running stage, drawn by whoever drives the flow (the CLI uses rich).

Tasks report through `reporter()`; without a registered one nothing is drawn.
"""

from __future__ import annotations

from typing import Protocol


class Reporter(Protocol):
    def stage_started(self, stage: str, total: int | None) -> None: ...
    def update(self, stage: str, metrics: dict) -> None: ...
    def stage_finished(self, stage: str, cached: bool, seconds: float) -> None: ...
    def note(self, stage: str, line: str) -> None: ...  # e.g. waiting for another run's stage


class _Silent:
    def stage_started(self, stage, total):
        pass

    def update(self, stage, metrics):
        pass

    def stage_finished(self, stage, cached, seconds):
        pass

    def note(self, stage, line):
        pass


_current: Reporter = _Silent()


def set_reporter(r: Reporter | None) -> None:
    global _current
    _current = r or _Silent()


def reporter() -> Reporter:
    return _current
