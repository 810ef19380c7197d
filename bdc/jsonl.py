"""JSON Lines in and out: errors name file and line; writes are atomic.

A stage that dies halfway must never leave a file that a later stage (or DVC) could take for
a complete output, so every writer goes through a temporary file and one ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TypeVar

from pydantic import BaseModel, ValidationError

from bdc.errors import BDCError

T = TypeVar("T")


class RecordError(BDCError, ValueError):
    """A record is malformed; the message starts with ``file:line:``."""


def describe_invalid(exc: ValidationError) -> str:
    """pydantic's errors as ``field.path: message; ...``."""
    parts = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        parts.append(f"{loc.lstrip('.') or 'record'}: {err['msg']}")
    return "; ".join(parts)


def read_jsonl(path: str | Path, parse: Callable[[dict], T]) -> Iterator[T]:
    """Yield ``parse(obj)`` for each non-blank line; any failure names ``path:line``."""
    path = Path(path)
    try:
        f = path.open(encoding="utf-8")
    except OSError as exc:
        raise RecordError(f"{path}: {exc.strerror or exc}") from exc
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise RecordError(f"{path}:{lineno}: expected a JSON object")
            try:
                yield parse(obj)
            except ValidationError as exc:
                raise RecordError(f"{path}:{lineno}: {describe_invalid(exc)}") from exc
            except (ValueError, TypeError, KeyError) as exc:
                raise RecordError(f"{path}:{lineno}: {exc}") from exc


class OutputError(BDCError, OSError):
    """An output cannot be written (a full disk, a read-only folder); names the path."""


# errors of writing itself: a write into an open file reports no file name
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _cannot_write(path: Path, exc: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write it: {exc.strerror or exc}")


def require_writable(*folders: str | Path) -> None:
    """Each folder exists or can be made, and takes a new file: checked by writing one, as
    permissions alone do not tell (root, read-only mounts). A stage calls this before any
    work, so a folder it cannot write fails it before it rewrites its other outputs."""
    for folder in map(Path, folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".writable.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise _cannot_write(folder, exc) from None


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Write to a temp file beside ``path``; rename over it only if the block succeeds. A
    full disk or an unwritable folder is an :class:`OutputError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; outputs are ordinary files
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, BDCError) and \
                exc.errno in _NO_ROOM:
            raise _cannot_write(path, exc) from None
        raise


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A folder written whole or not at all: the block writes into a temp folder beside
    ``folder``, which replaces it only if the block succeeds (a model, an adapter: a killed
    save never leaves a half-written folder that looks finished)."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        raise _cannot_write(folder, exc) from None
    tmp.chmod(0o755)
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as exc:
        if isinstance(exc, BDCError) or exc.errno not in _NO_ROOM:
            raise
        raise _cannot_write(folder, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> int:
    n = 0
    with atomic_open(path) as f:
        for rec in records:
            obj = rec.model_dump(mode="json") if isinstance(rec, BaseModel) else rec
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def json_safe(value: object, limit: int = 2000) -> object:
    """``value`` if JSON holds it as it is (plain lists, string-keyed dicts, finite numbers,
    strings) in at most ``limit`` characters, else ``{"repr": repr(value)}`` cut to
    ``limit``: what a program returned (a set, bytes, a complex number, NaN, a dict with
    tuple keys, a huge string...) always serialises, and a person still sees what came
    back."""
    if _plain(value, limit, depth=0) and len(json.dumps(value)) <= limit:
        return value
    text = repr(value)
    return {"repr": text if len(text) <= limit else text[:limit] + "..."}


def _plain(value: object, limit: int, depth: int) -> bool:
    t = type(value)
    if value is None or t is bool or t is int:
        return True
    if t is float:
        return value == value and value not in (float("inf"), float("-inf"))
    if t is str:
        return len(value) <= limit
    if depth >= 32:
        return False
    if t is list:
        return len(value) <= limit and all(_plain(v, limit, depth + 1) for v in value)
    if t is dict:
        return len(value) <= limit and all(type(k) is str and _plain(v, limit, depth + 1)
                                           for k, v in value.items())
    return False


def details_path(metrics_path: str | Path) -> Path:
    """Where a stage's full metrics go: ``data/metrics/details/<stage>.json``."""
    path = Path(metrics_path)
    return path.parent / "details" / path.name


def _select(tree: dict, key: str) -> dict | None:
    """The part of ``tree`` at dotted ``key``, in ``tree``'s own shape: keys may hold dots
    themselves (``{"problem.ari": ...}``) or nest (``{"test": {"problems": ...}}``)."""
    if key in tree:
        return {key: tree[key]}
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if isinstance(tree.get(head), dict):
            found = _select(tree[head], rest)
            if found is not None:
                return {head: found}
    return None


def _merge(into: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def write_metrics(metrics_path: str | Path, metrics: dict, headline: Iterable[str]) -> dict:
    """A stage's metrics in two files: the headline numbers (``headline``: dotted keys of
    ``metrics``; a key naming a mapping keeps all of it; one this run did not measure, such
    as another clustering mode's, is left out) at ``metrics_path``, which DVC shows (`dvc
    metrics show` and `dvc exp show` stay readable in a terminal), and every number at
    :func:`details_path`, which DVC keeps but does not show. Returns the headline."""
    small: dict = {}
    for key in headline:
        part = _select(metrics, key)
        if part is not None:
            _merge(small, part)
    with atomic_open(details_path(metrics_path)) as f:
        json.dump(metrics, f, indent=2)
    with atomic_open(metrics_path) as f:
        json.dump(small, f, indent=2)
    return small
