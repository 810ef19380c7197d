"""The names of what stages hand each other: one place, so a stage that writes a file and the
stages that read it can never disagree on its name. Folders come from ``dvc.yaml`` (each
stage's ``--out-dir``); these are the files inside them.
"""

from __future__ import annotations

# the pipeline's stages, in order (dvc.yaml declares them; the paper profile has no pretrain)
STAGES = ("prepare", "pretrain", "explore", "validate", "disentangle", "experts", "customize",
          "evaluate")

# prepare: one problem pool per use
POOLS = ("pretrain", "explore", "test")


def pool(name: str) -> str:
    """A problem pool's file: ``explore.jsonl``."""
    return f"{name}.jsonl"


# explore (Boost)
TREES = "trees"                    # one JSON record per problem
SFT = "sft.jsonl"                  # P2T and T2S records
PREFS = "prefs.jsonl"              # preference pairs
EXAMPLE_TREE = "example_tree.md"

# validate
REPORT = "report.json"             # vouches for exactly one sft.jsonl (its hash)

# disentangle
ASSIGNMENTS = "assignments.jsonl"  # record -> cluster
CENTROIDS = "centroids.npy"        # routing: the cluster centres
EMBEDDER = "embedder.json"         # which embedder made them
CLUSTER_PROBLEMS = "problems.jsonl"  # problem -> cluster (and its family, in mini)
CARDS = "cards.md"
K_SELECTION = "k_selection.json"

# experts
MANIFEST = "manifest.json"         # the adapters and which cluster each serves

# evaluate
SAMPLES = "samples.jsonl"
TABLE_JSON = "table.json"
TABLE_MD = "table.md"
