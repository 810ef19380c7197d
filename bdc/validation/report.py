"""The validation report: the manifest the training stages check before they read the explored
data. It names each validated file by its hash, so data that changed after validation, or
that validation failed, is never taken for validated.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bdc import artifacts
from bdc.errors import BDCError


class ValidationFailed(BDCError):
    """Expectations failed; the message names them, their observed values and problems."""


class NotValidated(BDCError):
    """A stage was asked to train on data that validate did not pass (or that changed)."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def validated_inputs(explore_dir: Path, problems_dir: Path) -> dict[str, Path]:
    return {"sft": explore_dir / artifacts.SFT, "prefs": explore_dir / artifacts.PREFS,
            "trees": explore_dir / artifacts.TREES,
            "explore_pool": problems_dir / artifacts.pool("explore"),
            "test_pool": problems_dir / artifacts.pool("test")}


def require_validated(report: Path, sft: Path) -> dict:
    """The validation report, if it vouches for exactly this SFT file; else an error."""
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        raise NotValidated(f"{report}: no validation report; run `bdc validate` first") \
            from exc
    if not data.get("success") or data["inputs"]["sft"]["sha256"] != sha256(sft):
        raise NotValidated(f"{sft} is not the file {report} validated (it changed since, "
                           "or validation failed); run `bdc validate` again")
    return data
