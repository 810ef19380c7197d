"""``python -m flows [FLOW] [--profile mini|small|paper]``: run a flow (pipeline or a stage) on
ephemeral Prefect.

Prefect reads PREFECT_HOME when it is imported, so the project's environment (state under
``var/``, telemetry off) is set before any flow module is imported.
"""

from __future__ import annotations

import argparse

from bdc.runtime import configure_environment


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows")
    parser.add_argument("flow", nargs="?", default="pipeline")
    parser.add_argument("--profile", choices=["mini", "small", "paper"], default="mini",
                        help="mini: dvc.yaml, params.yaml; small: small/; paper: paper/")
    args = parser.parse_args()
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
    if args.flow not in flows:
        parser.error(f"unknown flow {args.flow!r}; choose one of {', '.join(flows)}")
    flows[args.flow](profile=args.profile)


if __name__ == "__main__":
    main()
