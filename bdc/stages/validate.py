"""Stage ``validate``: Great Expectations over the explored data before anything trains on it.

The project's GX file context lives in ``gx/`` (suites, checkpoints and the data source are
versioned in git; ``gx/uncommitted`` holds results and Data Docs). Each table built by
``bdc.validation.tables`` is validated through its checkpoint with the thresholds of
``params.yaml`` as suite parameters. Data Docs are built and copied under the stage's output
folder and logged to MLflow, pass or fail. Only when every expectation holds is
``report.json`` written: the manifest the next stage checks (it names the validated files by
hash), so a failed validation leaves nothing a later stage could take for validated data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bdc.config import Params
from bdc.errors import BDCError
from bdc.jsonl import atomic_open, write_metrics

REPORT = "report.json"

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("success", "failed")



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
    return {"sft": explore_dir / "sft.jsonl", "prefs": explore_dir / "prefs.jsonl",
            "trees": explore_dir / "trees", "explore_pool": problems_dir / "explore.jsonl",
            "test_pool": problems_dir / "test.jsonl"}


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


def run(params: Params, explore_dir: Path, problems_dir: Path, out_dir: Path,
        metrics_path: Path) -> dict:
    """The stage with its MLflow run; raises ValidationFailed (after logging) on failure."""
    from bdc.tracking import stage_run
    from bdc.validation.runner import describe, validate

    with stage_run("validate", {"validate": params.validate_.model_dump(),
                                "explore.max_failed_share": params.explore.max_failed_share,
                                "explore_dir": str(explore_dir)},
                   params.profile) as tracked:
        (out_dir / REPORT).unlink(missing_ok=True)  # no stale vouching for new data
        tracked.dataset(explore_dir / "sft.jsonl", "SFT records", "validation")
        metrics, failed = validate(params, explore_dir, problems_dir, out_dir)
        write_metrics(metrics_path, metrics, HEADLINE)
        tracked.metrics(metrics)
        tracked.artifacts(out_dir / "docs", "docs")
        tracked.tag("bdc.report", "docs/index.html")
        if failed:
            tracked.table(failed, "failures.json")
            raise ValidationFailed("validation failed, the data is not fit to train on:\n"
                                   + describe(failed)
                                   + f"\nData Docs: {out_dir / 'docs' / 'index.html'}")
        report = {"success": True, **metrics, "inputs": {
            name: {"path": str(path), "sha256": sha256(path)}
            for name, path in validated_inputs(explore_dir, problems_dir).items()}}
        with atomic_open(out_dir / REPORT) as f:
            json.dump(report, f, indent=2)
        tracked.artifact(out_dir / REPORT)
    return metrics
