"""Each profile's pipeline from the one definition, ``dvc.yaml``.

DVC reads a pipeline only from a ``dvc.yaml`` file, and its templating cannot drop a stage or
move every output under another folder, so a profile other than mini is generated: the
small and paper profiles' ``small/dvc.yaml`` and ``paper/dvc.yaml`` are dvc.yaml's stages
without ``pretrain`` (their agents and base are real pretrained models), run at the project
root (``wdir: ..``) with the profile's ``params.yaml``, outputs under its ``data/``, and no
dependency on the tiny models. The small profile's models are packaged ones named in its
``models:`` section, so the stages that load them also depend on those settings (a changed
model re-runs them).
Their metrics and plots are plain (git-tracked) outputs, so DVC's default views stay the
mini pipeline's. ``bdc pipelines write`` rewrites the generated files; ``--check`` (and a
test) fails when a committed one differs, so they cannot drift from dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# profile -> (its folder, the stages it has not: dvc.yaml's others)
DERIVED = {"small": ("small", ("pretrain",)), "paper": ("paper", ("pretrain",))}
# profile -> {stage: params it reads beyond dvc.yaml's}
EXTRA_PARAMS = {"small": {s: ["models"] for s in ("explore", "experts", "customize",
                                                   "evaluate")}}
HEADER = """\
# GENERATED from dvc.yaml by `bdc pipelines write`: edit dvc.yaml, then run it (a test fails
# while this file differs). The {profile} profile's pipeline: dvc.yaml's stages but
# {dropped}, with the settings of {folder}/params.yaml and the outputs under {folder}/data.
# Stages run at the project root (wdir: ..), sharing its code, gx/ suites, var/ state and
# MLflow store. Run it with `dvc repro {folder}/dvc.yaml` or the Prefect `pipeline` flow with
# profile {profile} (its GPU stages go to the `gpu` work pool).
"""


def _moved(path: str, folder: str) -> str:
    """A path of dvc.yaml's, in the profile's pipeline: its data and its params file."""
    return f"{folder}/{path}" if path.startswith("data/") or path == "params.yaml" else path


def _entries(entries: list, folder: str) -> list:
    """DVC out/metric/plot entries (a path, or {path: options}) under ``folder``."""
    return [_moved(e, folder) if isinstance(e, str) else
            {_moved(k, folder): v for k, v in e.items()} for e in entries]


def derived_stages(stages: dict[str, Any], folder: str, dropped: tuple[str, ...],
                   extra: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """A profile's stages, given dvc.yaml's (``extra``: more params of some stages)."""
    out = {}
    for name, stage in stages.items():
        if name in dropped:
            continue
        cmd = " ".join(_moved(w, folder) for w in stage["cmd"].split())
        new: dict[str, Any] = {"wdir": "..", "cmd": f"{cmd} --params {folder}/params.yaml",
                               "deps": [_moved(d, folder) for d in stage["deps"]
                                        if not d.startswith("data/models/")],
                               "params": [{f"{folder}/params.yaml": [
                                   *stage["params"], *(extra or {}).get(name, [])]}]}
        if "outs" in stage:
            new["outs"] = _entries(stage["outs"], folder)
        # its metrics and plots as plain git-tracked outputs: `dvc metrics show` and `dvc
        # plots show` list every pipeline's declared ones, so a user's default view (the
        # pipeline they run) had every other profile's rows of "-" and a load failure for
        # the files not made here; `dvc metrics show small/data/metrics/*.json` shows them
        shown = [e if isinstance(e, str) else next(iter(e))
                 for key in ("metrics", "plots") for e in stage.get(key, [])]
        if shown:
            new.setdefault("outs", []).extend(
                {_moved(path, folder): {"cache": False}} for path in shown)
        out[name] = new
    return out


def render(root: Path, profile: str) -> str:
    """The text of ``profile``'s generated dvc.yaml."""
    folder, dropped = DERIVED[profile]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    body = yaml.safe_dump({"stages": derived_stages(stages, folder, dropped,
                                                    EXTRA_PARAMS.get(profile))},
                          sort_keys=False, width=100)
    return HEADER.format(profile=profile, folder=folder,
                         dropped=", ".join(f"`{d}`" for d in dropped)) + body


def stale(root: Path) -> list[Path]:
    """The generated pipeline files that differ from what dvc.yaml makes."""
    out = []
    for profile, (folder, _) in DERIVED.items():
        path = root / folder / "dvc.yaml"
        if not path.exists() or path.read_text() != render(root, profile):
            out.append(path)
    return out


def write(root: Path) -> list[Path]:
    """Rewrite every generated pipeline file that differs; the ones rewritten."""
    changed = stale(root)
    for profile, (folder, _) in DERIVED.items():
        path = root / folder / "dvc.yaml"
        if path in changed:
            path.write_text(render(root, profile))
    return changed
