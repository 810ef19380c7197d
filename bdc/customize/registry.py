"""The whole customized solver as one MLflow registered model version (``bdc-solver``): the
hypernetwork, the experts, the embedder's identity and the centroids, and a reference to the
base model (never its weights). ``bdc solve --model-uri models:/bdc-solver/N`` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from bdc import artifacts
from bdc.tracking import log_registered, prompt_signature

MODEL_NAME = "bdc-solver"


class SolverModel(mlflow.pyfunc.PythonModel):
    """pyfunc: a frame with ``prompt`` in, one program per row out."""

    def load_context(self, context) -> None:
        self.solver = load_registered(context.artifacts)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> list[str]:
        out = self.solver.solve(list(model_input["prompt"]),
                                (params or {}).get("max_new_tokens", 256), 16)
        return [program for _, program in out]


def load_registered(artifacts: dict[str, str], base: str | None = None):
    from bdc.customize.solver import load

    return load(Path(artifacts["hypernet"]), Path(artifacts["experts"]),
                Path(artifacts["clusters"]), base)


def register_solver(hypernet_dir: Path, experts_dir: Path, clusters_dir: Path) -> str:
    """Log and register the solver from the active MLflow run; its version."""
    import tempfile

    saved = json.loads((hypernet_dir / "solver.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        clusters = Path(tmp) / "clusters"
        clusters.mkdir()
        for name in (artifacts.CENTROIDS, artifacts.EMBEDDER):
            (clusters / name).write_bytes((clusters_dir / name).read_bytes())
        return log_registered(
            MODEL_NAME, "BDC's customized System-1 solver (part C): the input-aware "
            "hypernetwork that weighs the DisenLoRA experts per problem, rank-wise, with the "
            "experts, the embedder's identity and the centroids, over a reference to the base "
            "model (not its weights). predict: a frame with prompt in, one program per row "
            "out; bdc solve --model-uri models:/bdc-solver/N runs it.",
            {"base": saved["base"], "template": saved.get("template", "")},
            name="solver", python_model=Path(__file__).with_name("solver_model.py"),  # not pickled
            signature=prompt_signature(),
            artifacts={"hypernet": str(hypernet_dir), "experts": str(experts_dir),
                       "clusters": str(clusters)},
            metadata=saved,
            pip_requirements=["torch", "transformers", "peft", "sentence-transformers"])
