"""A Prefect flow per DVC stage, for running (or deploying) one stage on its own.

Each runs its stage with any stale upstream stages first, as ``dvc repro STAGE`` does, as
its own task: the run a person starts from the UI shows the stage's task run, logs and
artifact (a subflow hid them a level down).
"""

from __future__ import annotations

from prefect import flow

from flows.pipeline import Profile, one_stage


@flow(name="prepare")
def prepare(profile: Profile = "mini") -> dict:
    """Stage prepare: the explore and test problem pools.

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("prepare", profile=profile)


@flow(name="pretrain")
def pretrain(profile: Profile = "mini") -> dict:
    """Stage pretrain (mini profile): the tiny agents and base model, with competence.

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("pretrain", profile=profile)


@flow(name="explore")
def explore(profile: Profile = "mini") -> dict:
    """Stage explore (Boost): MC-Tree-of-Agents over the explore problems.

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("explore", profile=profile)


@flow(name="validate")
def validate(profile: Profile = "mini") -> dict:
    """Stage validate: Great Expectations over the explored data (stops a failing run).

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("validate", profile=profile)


@flow(name="disentangle")
def disentangle(profile: Profile = "mini") -> dict:
    """Stage disentangle: embed and cluster the validated SFT data.

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("disentangle", profile=profile)


@flow(name="experts")
def experts(profile: Profile = "mini") -> dict:
    """Stage experts: a LoRA per cluster and on all data, merges, Arrow (GPU in paper).

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("experts", profile=profile)


@flow(name="customize")
def customize(profile: Profile = "mini") -> dict:
    """Stage customize: the input-aware hypernetwork over the experts (GPU in paper).

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("customize", profile=profile)


@flow(name="evaluate")
def evaluate(profile: Profile = "mini") -> dict:
    """Stage evaluate: every solver on the hidden tests, the claims in one table.

    Args:
        profile: mini (dvc.yaml), small (small/dvc.yaml) or paper (paper/dvc.yaml)
    """
    return one_stage("evaluate", profile=profile)
