"""The weights identity of a served model: what tells new weights at the same path from the old ones.

Page keys are seeded with :class:`dynkv.keys.ModelFingerprint`; without the
weights in it, a fine-tune deployed to the same mount (or a changed
``config.json``) would be served the old model's pages from the disk tier.
:func:`weights_identity` digests, for a model directory:

- every ``*.json`` file at its top level (``config.json``,
  ``generation_config.json``, the safetensors index, tokenizer files), whole
  (other tokenizer files change the tokens, and so the keys, already);
- every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``,
  ``*.gguf``): its name, its size, its first 1 MiB (a safetensors header names
  every tensor, dtype and offset) and :data:`SAMPLES` chunks of 64 KiB spread
  evenly over the rest, the last one ending the file. A fine-tune of the same
  architecture, whose header and size are the same, changes nearly every
  weight and so the samples; an edit of a few bytes between the samples is
  not seen (name such a model with ``model_version``).

It reads a few MiB per weight file, whatever the model's size, and never the
file's modification time: the same weights copied to two hosts agree. A model
given as a hub id resolves to its local snapshot when one is cached; where no
file is found, the identity is the revision (or empty, with a warning naming
``model_version``, which overrides all of this).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

__all__ = ["SAMPLES", "clear_cache", "weights_identity"]

log = logging.getLogger("dynkv.identity")

SAMPLES = 16
_HEAD_BYTES = 1 << 20
_CHUNK = 64 << 10
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _digest_file(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(_HEAD_BYTES))
        if size > _HEAD_BYTES:
            last = max(0, size - _HEAD_BYTES - _CHUNK)  # the last sample ends the file
            for i in range(SAMPLES):
                f.seek(_HEAD_BYTES + last * i // (SAMPLES - 1))
                h.update(f.read(_CHUNK))


def _local_dir(model: str, revision: str | None) -> Path | None:
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    try:  # a hub id: its snapshot in the local cache, if vLLM (or anyone) downloaded it
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:
        return None


@functools.lru_cache(maxsize=16)
def _directory_identity(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.blake2b(digest_size=16, person=b"dynkv.weights")
    d = Path(path)
    for name, _, _ in stamp:
        f = d / name
        if f.suffix == ".json":
            h.update(f"{name}\0".encode())
            h.update(f.read_bytes())
        else:
            _digest_file(h, f)
    return h.hexdigest()


def weights_identity(model: str, revision: str | None = None) -> str:
    """A hex digest of ``model``'s configuration and weights (see the module docstring), or its revision.

    Cached per process by path and the files' sizes and modification times, so
    the scheduler and each worker of an engine pay the reads once.
    """
    d = _local_dir(model, revision)
    files = []
    if d is not None:
        for f in sorted(d.iterdir()):
            if f.is_file() and (f.suffix == ".json" or f.suffix in _WEIGHT_SUFFIXES):
                st = f.stat()
                files.append((f.name, st.st_size, st.st_mtime_ns))
    if not any(name.endswith(_WEIGHT_SUFFIXES) for name, _, _ in files):
        if revision:
            return f"revision:{revision}"
        log.warning("dynkv: no weight files found for model %r: pages are keyed without the weights' identity; "
                    "set model_version (DYNKV_MODEL_VERSION) so that new weights never match old pages", model)
        return ""
    return _directory_identity(str(d.resolve()), tuple(files))


def clear_cache() -> None:
    """Forget identities computed in this process (tests that rewrite a model in place)."""
    _directory_identity.cache_clear()
