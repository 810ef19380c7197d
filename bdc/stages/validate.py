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

import json
from pathlib import Path

from bdc import artifacts
from bdc.config import Params
from bdc.jsonl import RecordError, atomic_open, write_metrics
from bdc.validation.report import ValidationFailed, sha256, validated_inputs

# the numbers `dvc metrics show` shows; all of them go to data/metrics/details/
HEADLINE = ("success", "failed", "error")


def run(params: Params, explore_dir: Path, problems_dir: Path, out_dir: Path,
        metrics_path: Path) -> dict:
    """The stage with its MLflow run; raises ValidationFailed (after logging) on failure."""
    from bdc.tracking import stage_run
    from bdc.validation.runner import describe, validate

    with stage_run("validate", {"validate": params.validate_.model_dump(),
                                "explore.max_failed_share": params.explore.max_failed_share,
                                "explore_dir": str(explore_dir)},
                   params.profile, doc=__doc__) as tracked:
        (out_dir / artifacts.REPORT).unlink(missing_ok=True)  # no stale vouching for new data
        # until this run has measured, its metrics say it has not: never the last run's success
        write_metrics(metrics_path, {"success": False, "error": "validate did not finish"},
                      HEADLINE)
        try:
            tracked.dataset(explore_dir / artifacts.SFT, "SFT records", "validation")
            metrics, failed = validate(params, explore_dir, problems_dir, out_dir)
        except RecordError as exc:
            write_metrics(metrics_path, {"success": False, "error": str(exc)}, HEADLINE)
            tracked.tag("bdc.error", str(exc)[:5000])
            raise ValidationFailed(f"the explored data is malformed, nothing was validated: "
                                   f"{exc}") from exc
        write_metrics(metrics_path, metrics, HEADLINE)
        tracked.metrics(metrics)
        tracked.artifacts(out_dir / "docs", "docs")
        tracked.tag("bdc.report", "docs/index.html")
        tracked.tag("bdc.report_file", str((out_dir / "docs" / "index.html").resolve()))
        if failed:
            tracked.table(failed, "failures.json")
            raise ValidationFailed("validation failed, the data is not fit to train on:\n"
                                   + describe(failed)
                                   + f"\nData Docs: {out_dir / 'docs' / 'index.html'}")
        report = {"success": True, **metrics, "inputs": {
            name: {"path": str(path), "sha256": sha256(path)}
            for name, path in validated_inputs(explore_dir, problems_dir).items()}}
        with atomic_open(out_dir / artifacts.REPORT) as f:
            json.dump(report, f, indent=2)
        tracked.artifact(out_dir / artifacts.REPORT)
    return metrics
