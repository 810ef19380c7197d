"""One reuse mechanism for every stage that trains or searches: a result is reused only when
everything that made it is unchanged.

A result (a model folder, an adapter, a hypernetwork, a search tree) carries a fingerprint of
what made it: its settings, a digest of its data, the identity of the models it started from,
and the version of the code that computes it. A later run computes the fingerprint it would
produce and reuses the result only on an exact match; anything else is trained or searched
again. Models trained here carry the record in ``training.json`` beside their weights, so
a model trained from them (an adapter on a retrained base) changes fingerprint too. The
record also holds a checksum of every file saved with it: a result whose files were damaged
or lost since (a truncated adapter, a half-copied folder) is not reusable, and is trained
again with a warning that names the file.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
from pathlib import Path

TRAINING_RECORD = "training.json"
log = logging.getLogger(__name__)
PACKAGE = Path(__file__).resolve().parent  # code parts are paths under bdc/


def digest(value: object) -> str:
    """A short, stable hash of a JSON-able value (dict keys sorted)."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digest(folder: Path) -> str:
    """A hash of every file in ``folder`` (a saved model or hypernetwork), in name order."""
    hashed = hashlib.sha256()
    for file in sorted(Path(folder).rglob("*")):
        if file.is_file():
            hashed.update(file.read_bytes())
    return hashed.hexdigest()


def code_version(parts: tuple[str, ...], root: Path = PACKAGE) -> str:
    """A hash of the code that computes a result: ``parts`` (files or folders under
    ``root``, the ``bdc`` package), as syntax trees without docstrings, so that editing a
    comment or a docstring reuses what a change of logic would not."""
    hashed = hashlib.sha256()
    for part in parts:
        path = root / part
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            tree = ast.parse(file.read_text())
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                        isinstance(getattr(body[0], "value", None), ast.Constant) and \
                        isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
            hashed.update(file.relative_to(root).as_posix().encode())
            hashed.update(ast.dump(tree).encode())
    return hashed.hexdigest()[:16]


def identity(model: str | Path) -> str:
    """What a model is, for the fingerprint of what is made from it: a model trained here or
    a packaged model converted here (named in ``params.yaml`` ``models:``), its own
    fingerprint (retrained or changed, it is a new model); else its name or path."""
    from bdc.runtime import packaged_model_dir

    for folder in (Path(model), packaged_model_dir(str(model))):
        try:
            return json.loads((folder / TRAINING_RECORD).read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return str(model)


def seal(folder: Path, record: dict) -> dict:
    """Write ``record`` as ``folder``'s training record, with the checksum of every other file
    in the folder (call it once the weights are written, before the folder is moved into
    place); the record as written."""
    folder = Path(folder)
    files = {f.relative_to(folder).as_posix(): file_digest(f)
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != TRAINING_RECORD}
    sealed = {**record, "files": files}
    (folder / TRAINING_RECORD).write_text(json.dumps(sealed))
    return sealed


def finished(folder: Path, fingerprint: str) -> dict | None:
    """The training record in ``folder`` when it was made with ``fingerprint`` and every
    file it lists is still as it was saved; else None (train again). A damaged or missing
    file is named in a warning."""
    folder = Path(folder)
    try:
        record = json.loads((folder / TRAINING_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        log.warning("%s: its training record lists no file checksums (an older or foreign "
                    "record): training again", folder / TRAINING_RECORD)
        return None
    for name, expected in files.items():
        path = folder / name
        try:
            intact = file_digest(path) == expected
        except OSError:
            intact = False
        if not intact:
            log.warning("%s: damaged or missing since it was trained (its checksum does not "
                        "match %s): training again", path, folder / TRAINING_RECORD)
            return None
    return record
