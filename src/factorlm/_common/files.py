"""File plumbing with one home: hashing, atomic writes, staged folders, sidecars, cache, versions.

Why one module: these helpers had grown four sha256 functions, two atomic writers and two
diverging lists of tokenizer files. Every output factorlm writes goes through the same
write-then-rename rule here, so a crash never leaves a half-written file or folder, and every
sidecar copy applies the same symlink check, so a file outside a model folder never ends up in
an output. Nothing here imports a stage package (and torch is never imported: versions come from
package metadata).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from factorlm._common.outputs import check_parent, staged_output
from factorlm.errors import ConfigError, ModelLoadError

__all__ = [
    "EXPORT_RECORD",
    "SIDECAR_FILES",
    "VERSIONED_PACKAGES",
    "cache_root",
    "copy_sidecars",
    "exclusive_lock",
    "sha256_bytes",
    "sha256_file",
    "sidecar_paths",
    "staged_directory",
    "versions",
    "write_bytes_atomic",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

#: Tokenizer and config files a model folder carries; copied beside every output built from it
#: so the next command (or ``ORTModel``) can load the output as a model folder.
SIDECAR_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentence_bert_config.json",
    "modules.json",
    "factorlm-export.json",
)

#: Written by ``factorlm export`` beside model.onnx: the source Hugging Face folder (absolute),
#: task and versions. A sidecar, so compressed models and engines built from the export carry it
#: (fwsvd finds the PyTorch weights for its Fisher through it).
EXPORT_RECORD = "factorlm-export.json"

#: Distributions whose versions describe what an artifact was made with (absent ones skipped).
VERSIONED_PACKAGES: tuple[str, ...] = (
    "factorlm",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnx-ir",
    "torch",
    "transformers",
    "optimum",
    "numpy",
    "tensorrt",
)

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str], chunk: int = _CHUNK) -> str:
    """Hex sha256 of a file, streamed so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    """Hex sha256 of bytes (a str is hashed as UTF-8): cache keys and config digests."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _usual_mode(directory: bool = False) -> int:
    """The permissions a plain ``open``/``mkdir`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; silently skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary name in ``path``'s folder, fsync, rename it into place.

    Readers see the old file or the new one, never a partial one; on failure the temporary file
    is removed and an existing ``path`` is untouched. The file gets the usual permissions
    (``0o666`` less the umask), not ``mkstemp``'s private ``0o600``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _usual_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """:func:`write_bytes_atomic` for text (UTF-8 by default)."""
    return write_bytes_atomic(path, text.encode(encoding))


@contextlib.contextmanager
def staged_directory(out_dir: str | os.PathLike[str], command: str = "factorlm") -> Iterator[Path]:
    """Yield an empty hidden folder next to ``out_dir``; rename it into place on success.

    The stage is ``.<name>.<random>.tmp`` in ``out_dir``'s parent (same filesystem, so the final
    rename is atomic). On any exception (KeyboardInterrupt included) the stage is removed and an
    existing ``out_dir`` is left untouched. An existing ``out_dir`` is moved aside before the
    rename and deleted after it, so readers never see a half-deleted folder.
    """
    out = Path(out_dir)
    # The stage (and so the output) carries factorlm's own-marker; stages of killed runs are
    # recognized by it and removed; a parent that is a file is one sentence, not a traceback.
    # Callers checked ``out`` already (check_output, or an asset's own completion marker), so
    # an existing folder is replaced even without the marker (asset folders predate it).
    check_parent(out)
    with staged_output(out, command, owned_only=False) as stage:
        yield stage


def _allowed_root(folder: Path) -> Path:
    """Where a sidecar symlink in ``folder`` may point.

    The folder itself, or for a Hugging Face cache snapshot (``<repo>/snapshots/<rev>``) the
    repository folder, whose ``blobs/`` hold the files that the snapshot links to.
    """
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and (resolved.parent.parent / "blobs").is_dir():
        return resolved.parent.parent
    return resolved


def sidecar_paths(
    source: str | os.PathLike[str], names: Iterable[str] = SIDECAR_FILES
) -> list[Path]:
    """The sidecar files present in a model folder, checked; ``source`` may be a file in it.

    A sidecar that is a symlink resolving outside the folder (say ``vocab.txt -> /etc/passwd``)
    raises ``ModelLoadError``: an output must never carry a file from elsewhere on the machine.
    """
    src = Path(source)
    folder = src if src.is_dir() else src.parent
    root = _allowed_root(folder)
    found: list[Path] = []
    for name in names:
        candidate = folder / name
        if candidate.is_symlink():
            real = candidate.resolve()
            if not real.is_relative_to(root):
                raise ModelLoadError(
                    f"The sidecar file {candidate} is a symlink to {real}, outside the model "
                    "folder; replace it with a regular file to use it."
                )
        if candidate.is_file():
            found.append(candidate)
    return found


def copy_sidecars(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    names: Iterable[str] = SIDECAR_FILES,
    *,
    skip_existing: bool = False,
) -> list[str]:
    """Copy the tokenizer/config files of a model folder into ``target``; return the names.

    ``source`` is the model folder or a file in it (e.g. its ``model.onnx``). Only regular files
    are copied, as regular files, after :func:`sidecar_paths` has checked every one, so a
    refused symlink leaves nothing copied. With ``skip_existing`` a file already in ``target``
    is kept.
    """
    dest = Path(target)
    copied = []
    for candidate in sidecar_paths(source, names):
        out = dest / candidate.name
        if skip_existing and out.exists():
            continue
        shutil.copy2(candidate, out)  # follows the (checked) link: the copy is a plain file
        copied.append(candidate.name)
    return copied


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on the file ``path`` (created; it records this process id) for
    the block; raise ``ConfigError(busy)`` at once, without waiting, when another process holds it.

    The file stays (removing it would race with a waiting process); the operating system releases
    the lock when the process ends, even on SIGKILL. Without ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        logger.warning(
            "No file locking on this platform; do not share %s between runs", path.parent
        )
        yield path
        return
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(busy) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``root`` if given, else ``$FACTORLM_CACHE``, else ``~/.cache/factorlm``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FACTORLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "factorlm"


def versions() -> dict[str, str]:
    """Python, platform and the installed versions of :data:`VERSIONED_PACKAGES`.

    Read from package metadata, so asking does not import torch or onnxruntime.
    """
    result = {"python": sys.version.split()[0], "platform": platform.platform()}
    for dist in VERSIONED_PACKAGES:
        try:
            result[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return result
