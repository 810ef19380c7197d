"""Where runtime state lives, and the switches that keep a run offline and quiet.

Everything a run writes besides its DVC outputs (MLflow store, Prefect home, caches, temp
files) goes under ``<project>/var`` so that a checkout is self-contained and a user can delete
one folder to reset. Called explicitly by entry points; importing ``bdc`` changes nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import MappingProxyType

OFFLINE_SWITCHES = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per download, in stage logs
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # no pydantic plugins are used; looking for them scans every installed distribution
    "PYDANTIC_DISABLE_PLUGINS": "__all__",
}


# each profile's pipeline folder, relative to the project root (see pipeline_folder)
PROFILES = MappingProxyType({"mini": Path("."), "small": Path("small"), "paper": Path("paper")})


def project_root(start: Path | None = None) -> Path:
    """The nearest folder holding ``params.yaml`` (or ``BDC_PROJECT``), else the cwd. A
    pipeline folder of a project (``paper/``, with its own params.yaml) is not a project:
    from inside it, the project is its parent."""
    if os.environ.get("BDC_PROJECT"):
        return Path(os.environ["BDC_PROJECT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").exists():
            parent = folder.parent
            pipelines = {parent / pipeline_folder(p) for p in PROFILES}
            return parent if folder in pipelines and (parent / "params.yaml").exists() \
                else folder
    return here


def pipeline_folder(profile: str) -> Path:
    """Where a profile's pipeline lives, relative to the project root: its ``dvc.yaml``,
    ``params.yaml`` and ``data/`` (the DVC outputs). The mini pipeline is the project's
    own; the small and paper pipelines are ``small/`` and ``paper/`` (their stages run at
    the root, ``wdir: ..``, so all share the code, ``gx/`` suites, ``var/`` state and MLflow
    store)."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: one of {', '.join(PROFILES)}")
    return PROFILES[profile]


def cpu_cores() -> int:
    """The cores this process should use: ``OMP_NUM_THREADS`` where set (a batch system or a
    test worker given fewer cores than the machine has; of a nested list like ``4,2`` the
    outer level), else its CPU affinity (a container's or job's share: ``os.cpu_count()``
    counts the whole machine)."""
    outer = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(outer) if outer.isdecimal() and int(outer) > 0 else \
        len(os.sched_getaffinity(0))


def state_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "var"


def packaged_model_dir(name: str, root: Path | None = None) -> Path:
    """Where the packaged real model ``name`` (``params.yaml`` ``models:``) is converted to
    by ``bdc models prepare``: runtime state, outside DVC's outputs."""
    return state_dir(root) / "models" / name


def configure_environment(root: Path | None = None) -> Path:
    """Point every tool's state at the project and set the telemetry switches.

    Values already in the environment win, so users and CI can override any of them
    (``HF_HUB_OFFLINE=0`` to allow downloads on a machine that reaches the hub).
    """
    var = state_dir(root)
    defaults = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{var / 'mlflow' / 'mlflow.db'}",
        "PREFECT_HOME": str(var / "prefect"),
        "HF_HOME": str(var / "hf"),
        "TMPDIR": str(var / "tmp"),
        "DVC_SITE_CACHE_DIR": str(var / "dvc"),
        **OFFLINE_SWITCHES,
    }
    if "HF_HUB_OFFLINE" in os.environ:  # one switch for the hub: datasets and transformers
        # read their own, and datasets lets HF_DATASETS_OFFLINE=1 win over HF_HUB_OFFLINE=0
        for key in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            defaults[key] = os.environ["HF_HUB_OFFLINE"]
    if not sys.stderr.isatty():  # hub and transformers bars would be noise in stage logs
        defaults["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    for sub in ("mlflow", "prefect", "hf", "tmp"):
        (var / sub).mkdir(parents=True, exist_ok=True)
    return var
