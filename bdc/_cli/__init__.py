"""The ``bdc`` command line: one command per stage (``stages``) or tool (``tools``), each with
``--help``. Commands only parse arguments, call the library and report; the work lives in
``bdc.*``.
"""

from __future__ import annotations

from bdc._cli import stages, tools  # noqa: F401 - they register their commands
from bdc._cli.app import app, main

__all__ = ["app", "main"]
