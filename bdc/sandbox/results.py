"""What the sandbox reports: each test's outcome and a program's result over its tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "error", "timeout"]


@dataclass
class TestOutcome:
    status: Status
    actual: object = None  # what the program produced (function return value or stdout)
    detail: str = ""  # error message, timeout or mismatch description


@dataclass
class ExecutionResult:
    """All test outcomes of one program."""

    outcomes: list[TestOutcome] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return sum(o.status == "passed" for o in self.outcomes)

    @property
    def total(self) -> int:
        return len(self.outcomes)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def status(self) -> Status:
        statuses = {o.status for o in self.outcomes}
        if statuses <= {"passed"} and self.outcomes:
            return "passed"
        for s in ("timeout", "error"):
            if s in statuses:
                return s
        return "failed"
