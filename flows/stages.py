"""A Prefect flow per DVC stage, for running (or deploying) one stage on its own.

Each runs its stage with any stale upstream stages first, as ``dvc repro STAGE`` does.
"""

from __future__ import annotations

from prefect import flow

from flows.pipeline import stage_flow


@flow(name="prepare")
def prepare() -> dict:
    """Stage prepare: the explore and test problem pools."""
    return stage_flow("prepare")


@flow(name="pretrain")
def pretrain() -> dict:
    """Stage pretrain (mini profile): the tiny agents and base model, with competence."""
    return stage_flow("pretrain")


@flow(name="explore")
def explore() -> dict:
    """Stage explore (Boost): MC-Tree-of-Agents over the explore problems."""
    return stage_flow("explore")


@flow(name="validate")
def validate() -> dict:
    """Stage validate: Great Expectations over the explored data (stops a failing run)."""
    return stage_flow("validate")


@flow(name="disentangle")
def disentangle() -> dict:
    """Stage disentangle: embed and cluster the validated SFT data."""
    return stage_flow("disentangle")


@flow(name="experts")
def experts() -> dict:
    """Stage experts: a LoRA per cluster and on all data, merges, Arrow (GPU in paper)."""
    return stage_flow("experts")


@flow(name="customize")
def customize() -> dict:
    """Stage customize: the input-aware hypernetwork over the experts (GPU in paper)."""
    return stage_flow("customize")


@flow(name="evaluate")
def evaluate() -> dict:
    """Stage evaluate: every solver on the hidden tests, the claims in one table."""
    return stage_flow("evaluate")
