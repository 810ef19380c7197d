"""``python -m flows [FLOW]``: run a flow (pipeline or a stage) on ephemeral Prefect.

Prefect reads PREFECT_HOME when it is imported, so the project's environment (state under
``var/``, telemetry off) is set before any flow module is imported.
"""

from __future__ import annotations

import sys

from bdc.runtime import configure_environment


def main() -> None:
    configure_environment()
    from flows.pipeline import pipeline
    from flows.stages import (
        customize,
        disentangle,
        evaluate,
        experts,
        explore,
        prepare,
        pretrain,
        validate,
    )

    flows = {"pipeline": pipeline, "prepare": prepare, "pretrain": pretrain,
             "explore": explore, "validate": validate, "disentangle": disentangle,
             "experts": experts, "customize": customize,
             "evaluate": evaluate}
    name = sys.argv[1] if len(sys.argv) > 1 else "pipeline"
    if name not in flows:
        sys.exit(f"unknown flow {name!r}; choose one of {', '.join(flows)}")
    flows[name]()


if __name__ == "__main__":
    main()
