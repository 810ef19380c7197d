"""Run the suites through the project's GX file context: make the context hold the suites
(and a checkpoint per table), validate every table through its checkpoint, build the Data
Docs, and say what failed in words a person can act on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from bdc.config import Params
from bdc.runtime import project_root

DATA_SOURCE = "bdc"


def context(root: Path | None = None):
    """The project's GX file context, with progress bars off (they are noise in logs)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(root or project_root()))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def _same(stored, wanted: list) -> bool:
    def key(e) -> tuple:
        config = e.configuration if hasattr(e, "configuration") else e
        return config.type, json.dumps(config.kwargs, sort_keys=True, default=str)

    return sorted(map(key, stored.expectations)) == sorted(map(key, wanted))


def sync(ctx, suites: dict[str, list]) -> None:
    """Make the context hold exactly these suites, with a checkpoint per table. Nothing is
    rewritten when it already matches, so the files in git only change with the code."""
    import great_expectations as gx

    source = next((d for d in ctx.data_sources.all().values() if d.name == DATA_SOURCE),
                  None) or ctx.data_sources.add_pandas(name=DATA_SOURCE)
    for name, expectations in suites.items():
        asset = next((a for a in source.assets if a.name == name), None) or \
            source.add_dataframe_asset(name=name)
        batch = next((b for b in asset.batch_definitions if b.name == "whole"), None) or \
            asset.add_batch_definition_whole_dataframe("whole")
        try:
            suite = ctx.suites.get(name)
        except Exception:  # noqa: BLE001 - GX raises its own not-found errors
            suite = None
        if suite is None or not _same(suite, expectations):
            suite = ctx.suites.add_or_update(gx.ExpectationSuite(name=name,
                                                                 expectations=expectations))
        if name not in {v.name for v in ctx.validation_definitions.all()}:
            ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch,
                                                                   suite=suite))
        if name not in {c.name for c in ctx.checkpoints.all()}:
            ctx.checkpoints.add(gx.Checkpoint(  # Data Docs are built once, after all four
                name=name, validation_definitions=[ctx.validation_definitions.get(name)],
                actions=[], result_format={"result_format": "COMPLETE",
                                           "unexpected_index_column_names": ["problem_id"]}))


# ----------------------------------------------------------------------------- results

def failures(table: str, result, rows: int = 5) -> list[dict]:
    """Each failed expectation: what it checked, what it saw, a few offending problems."""
    out = []
    for vr in result.run_results.values():
        for r in vr.results:
            if r.success:
                continue
            res = r.result or {}
            ids = [row.get("problem_id") for row in res.get("unexpected_index_list") or []
                   if isinstance(row, dict)]
            out.append({"table": table, "expectation": r.expectation_config.type,
                        "kwargs": {k: v for k, v in r.expectation_config.kwargs.items()
                                   if k not in ("batch_id",)},
                        "observed": res.get("observed_value"),
                        "unexpected_count": res.get("unexpected_count"),
                        "unexpected_values": [str(v)[:80] for v in
                                              (res.get("partial_unexpected_list") or [])[:rows]],
                        "problems": sorted({i for i in ids if i})[:rows]})
    return out


def describe(failed: list[dict]) -> str:
    lines = []
    for f in failed:
        column = f["kwargs"].get("column") or f["kwargs"].get("column_list") or ""
        seen = f["observed"] if f["observed"] is not None else \
            f"{f['unexpected_count']} unexpected, e.g. {f['unexpected_values']}"
        lines.append(f"{f['table']}: {f['expectation']}({column}) failed: {seen}"
                     + (f"; problems: {', '.join(f['problems'])}" if f["problems"] else ""))
    return "\n".join(lines)


def check(ctx, frames: dict, values: dict) -> tuple[int, list[dict]]:
    """Every table through its checkpoint: (expectations evaluated, failures)."""
    failed, evaluated = [], 0
    for name, frame in frames.items():
        result = ctx.checkpoints.get(name).run(batch_parameters={"dataframe": frame},
                                               expectation_parameters=values)
        evaluated += sum(len(vr.results) for vr in result.run_results.values())
        failed += failures(name, result)
    return evaluated, failed


# what Great Expectations' Data Docs fetch from the internet that the docs can carry: its
# Bootstrap 4 stylesheet (without it the pages are unstyled offline) and its logo, fetched
# (two, light and dark) from S3, the data context's id in the query
CDN_BOOTSTRAP = "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"
REMOTE_LOGO = re.compile(r"https://great-expectations-web-assets\.s3[^\"']*?\.png[^\"']*")


def offline(docs: Path) -> None:
    """Data Docs that read offline: Bootstrap's stylesheet (the ``xstatic-bootstrap``
    package's 4.5, for GX's 4.3) and the logo from the docs' own ``static/`` folder. The
    charts (Vega) and table filters still come from CDNs and show only online."""
    import xstatic.pkg.bootstrap as bootstrap

    vendor = docs / "static" / "vendor"
    vendor.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(bootstrap.BASE_DIR) / "css" / "bootstrap.min.css", vendor)
    for page in [*docs.rglob("*.html"), *docs.rglob("*.css")]:
        up = "../" * (len(page.relative_to(docs).parts) - 1)
        text = page.read_text()
        text = text.replace(CDN_BOOTSTRAP, f"{up}static/vendor/bootstrap.min.css")
        page.write_text(REMOTE_LOGO.sub(f"{up}static/images/logo-long.png", text))


def validate(params: Params, explore_dir: Path, problems_dir: Path, out_dir: Path,
             root: Path | None = None) -> tuple[dict, list[dict]]:
    """Validate; the metrics and the failures (empty: fit to train on). Data Docs go to
    ``out_dir/docs`` either way."""
    from bdc.validation import suites, tables

    frames = tables.build(explore_dir, problems_dir, params.validate_, params.explore.limit)
    ctx = context(root)
    sync(ctx, suites.suites())
    for old in ("validations", "data_docs"):  # the Data Docs show this run, not history
        shutil.rmtree(Path(ctx.root_directory) / "uncommitted" / old, ignore_errors=True)
    evaluated, failed = check(ctx, frames, suites.parameters(
        params.validate_, params.explore.search.max_programs, params.explore.max_failed_share))
    sites = ctx.build_data_docs()
    docs = Path(sites["local_site"].removeprefix("file://")).parent
    if (out_dir / "docs").exists():
        shutil.rmtree(out_dir / "docs")
    shutil.copytree(docs, out_dir / "docs")
    offline(out_dir / "docs")
    metrics = {"success": not failed, "expectations": evaluated, "failed": len(failed),
               "rows": {name: len(frame) for name, frame in frames.items()}}
    return metrics, failed
