"""What the detector asks the stores, and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass
class WindowQuery:
    """The calls with end - window_seconds <= ts < end."""

    end: datetime
    window_seconds: int


@dataclass
class ErrorRateSignal:
    total: int
    errors: int

    @property
    def rate(self) -> float:
        return self.errors / self.total if self.total else 0.0
