"""Untrusted code in, trustworthy pass rates out.

``engine`` is the host's ``Sandbox`` (a pool of warm workers, one program at a time per
worker); ``worker_process`` starts and supervises one, ``program`` drives one program process,
``judging`` compares outside the program, ``isolation`` says what this machine enforces,
``results`` is what comes back; ``worker`` runs inside the sandbox, ``protocol`` is what
crosses between the two.
"""

from bdc.sandbox.engine import Execution, Sandbox
from bdc.sandbox.isolation import IsolationError
from bdc.sandbox.judging import outputs_match
from bdc.sandbox.results import ExecutionResult, TestOutcome

__all__ = ["Execution", "ExecutionResult", "IsolationError", "Sandbox", "TestOutcome",
           "outputs_match"]
