"""Untrusted code in, trustworthy pass rates out. See ``engine`` (host) and ``worker``."""

from bdc.sandbox.engine import (
    Execution,
    ExecutionResult,
    IsolationError,
    Sandbox,
    TestOutcome,
    outputs_match,
)

__all__ = ["Execution", "ExecutionResult", "IsolationError", "Sandbox", "TestOutcome",
           "outputs_match"]
