"""Prefect flows that orchestrate the DVC stages (orchestration only, no ML logic)."""
