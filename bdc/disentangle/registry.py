"""The expert set as one MLflow registered model version: the adapters (PEFT folders), the
centroids, the embedder's identity, the LoRA settings and a *reference* to the base model
(its hub id or path, never its weights).

Loading it (``models:/bdc-experts/<version>``, or ``@alias``) gives an :class:`ExpertSetModel`
whose ``predict`` writes programs with a chosen adapter, and ``load_expert_set`` gives the
plain ``PeftModel`` with every adapter loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from bdc import artifacts
from bdc.tracking import log_registered, prompt_signature

MODEL_NAME = "bdc-experts"


class ExpertSetModel(mlflow.pyfunc.PythonModel):
    """pyfunc over a base model and its named adapters. Input: a frame with ``prompt`` and
    optionally ``adapter`` (a name, or ``__base__``); output: one program per row."""

    def load_context(self, context) -> None:
        self.peft, self.tokenizer, self.manifest = load_expert_set(
            Path(context.artifacts["adapters"]), json.loads(
                Path(context.artifacts["manifest"]).read_text()))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> list[str]:
        from bdc.llm.system1 import solve, template_for

        template = template_for(self.tokenizer, self.manifest.get("template", "auto"))
        prompts = list(model_input["prompt"])
        default = self.manifest["adapters"][0]
        names = list(model_input["adapter"]) if "adapter" in model_input else \
            [default] * len(prompts)
        return [program for _, program in solve(
            self.peft, self.tokenizer, template, prompts,
            (params or {}).get("max_new_tokens", 256), 16, adapter_names=names)]


def load_expert_set(adapters_dir: Path, manifest: dict, base: str | None = None):
    """The base (from its reference, or ``base``) with every adapter of the manifest."""
    from bdc.disentangle.experts import load_adapters

    peft, tokenizer = load_adapters(base or manifest["base"], adapters_dir,
                                    manifest["adapters"])
    return peft.eval(), tokenizer, manifest


def register(adapters_dir: Path, manifest: dict, extra: dict[str, Path]) -> str:
    """Log the expert set to the active MLflow run and register it; the version."""
    manifest_path = adapters_dir / artifacts.MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return log_registered(
        MODEL_NAME, "DisenLoRA's expert set (BDC part D): one LoRA adapter per cluster of the "
        "explored data, and the full-data LoRA, over a reference to the base model (not its "
        "weights). predict: a frame with prompt (and adapter: a name, or __base__) in, one "
        "program per row out.",
        {"base": manifest["base"], "adapters": " ".join(manifest["adapters"])},
        name="expert_set",  # logged from code, not pickled
        python_model=Path(__file__).with_name("expert_set_model.py"),
        signature=prompt_signature(("adapter",)),
        artifacts={"adapters": str(adapters_dir), "manifest": str(manifest_path),
                   **{k: str(v) for k, v in extra.items()}},
        metadata=manifest,
        pip_requirements=["torch", "transformers", "peft"])  # no slow requirement inference
