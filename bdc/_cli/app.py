"""The ``bdc`` application: its options, the settings every command reads, and the one rule
for errors (a user's mistake is one line and exit code 2; a bug keeps its traceback)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import typer

from bdc import console
from bdc.config import Params, load_params
from bdc.errors import BDCError
from bdc.runtime import configure_environment, project_root

app = typer.Typer(help="BDC: Boost, Disentangle, and Customize — System-2 to System-1 "
                       "for code generation.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="markdown")
problems_app = typer.Typer(help="Problem data in the BDC interchange format.",
                           no_args_is_help=True)
app.add_typer(problems_app, name="problems")
pipelines_app = typer.Typer(help="Each profile's pipeline, generated from dvc.yaml.",
                            no_args_is_help=True)
app.add_typer(pipelines_app, name="pipelines")
models_app = typer.Typer(help="Packaged real models (params.yaml models:): check, convert.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

ParamsOption = typer.Option(None, "--params", help="params.yaml to read (default: the "
                            "project's; outside a project, the built-in defaults)")


class UserError(BDCError):
    """Bad input: printed as one clear line, exit code 2."""


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    configure_environment()
    console.setup_logging(verbose)


def _params(path: Path | None) -> Params:
    """The file asked for (missing: an error naming it), else the project's params.yaml;
    only outside a project, where there is none, the built-in defaults."""
    if path is not None:
        return load_params(path)
    default = project_root() / "params.yaml"
    return load_params(default) if default.exists() else Params()


def main() -> None:
    """Run the CLI (the ``bdc`` command goes through ``bdc.__main__``, which prepares the
    process first)."""
    gc.freeze()  # see bdc.__main__; for callers that come straight here
    try:
        app()
    except BDCError as exc:  # what a user can act on; anything else is a bug: its traceback
        console.error(str(exc))
        sys.exit(2)
