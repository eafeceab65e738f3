"""Input statistics of every linear weight, captured by running the ONNX model in ONNX Runtime.

Why ORT and not PyTorch: the statistics must be keyed by the ONNX initializers the passes
rewrite, and must describe the activations of *that* graph. The data input of every target
weight is added as an extra graph output; each batch's activations are reduced at once, in
float64, to ``X^T X``, ``Σ|x|`` and a token count, so memory stays flat in the number of
samples. Padding positions are dropped with the attention mask before reducing.

Results are cached under ``<cache>/calibration/`` keyed by the model's sha256, the texts used,
the tokenizer and the settings, so a second call with the same inputs is a file read.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from scipy.linalg.blas import dsyrk

from factorlm._common.sessions import create_session
from factorlm._common.text import TOKENIZER_FILES, TextTokenizer, batch_feeds, find_tokenizer
from factorlm.calibration.stats import CalibrationStats, release_pages
from factorlm.calibration.targets import Target, find_targets
from factorlm.data import load_texts
from factorlm.errors import ConfigError, DataError, ModelLoadError

__all__ = [
    "HOLDOUT_EVERY",
    "ShardSums",
    "activation_rows",
    "collect_statistics",
    "file_digest",
    "shard_sums",
]

logger = logging.getLogger(__name__)

_VERSION = 1
#: With ``holdout``, every HOLDOUT_EVERY-th batch's Gram is also kept apart.
HOLDOUT_EVERY = 4
#: Fewer calibration tokens than this per input feature draw a warning.
_TOKENS_PER_FEATURE = 4


def file_digest(path: Path) -> str:
    """sha256 of a file and of any external-data files next to it that the model names."""
    from factorlm._common.files import sha256_file

    digest = hashlib.sha256(sha256_file(path).encode())
    model = onnx.load(str(path), load_external_data=False)
    for location in _external_locations(model):
        extra = path.parent / location
        if extra.is_file():
            digest.update(sha256_file(extra).encode())
    return digest.hexdigest()


def _instrumented_session(model_path: Path, targets: list[Target], scratch: Path) -> Any:
    """An ORT session of the model with every target's activation exposed as an output.

    A model whose weights live in external data is instrumented without loading them: only its
    header is rewritten, into ``scratch``, next to links to its data files, so that calibrating a
    model larger than memory holds one copy of its weights (ONNX Runtime's) instead of three.
    """
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{model_path} is not a readable ONNX model ({exc}).") from exc
    locations = _external_locations(model)
    existing = {o.name for o in model.graph.output}
    elem_types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            elem_types[vi.name] = vi.type.tensor_type.elem_type
    except Exception as exc:  # shape inference is an aid here, not a requirement
        logger.info("Shape inference failed (%s); assuming float32 activations", exc)
    for activation in dict.fromkeys(t.activation for t in targets):
        if activation in existing:
            continue
        elem = elem_types.get(activation) or onnx.TensorProto.FLOAT
        model.graph.output.append(onnx.helper.make_tensor_value_info(activation, elem, None))
    # Fusions would swallow the exposed MatMul inputs; basic optimizations keep them.
    path = scratch / "instrumented.onnx"
    if locations:
        _inline_small_tensors(model, model_path.parent)
        for location in locations:
            _link_or_copy(model_path.parent / location, scratch / location)
        onnx.save_model(model, str(path))
        return create_session(path, graph_optimization_level="basic", what=str(model_path))
    if model.ByteSize() < 2**31 - 1:
        return create_session(
            model.SerializeToString(), graph_optimization_level="basic", what=str(model_path)
        )
    onnx.save(model, str(path), save_as_external_data=True, location="instrumented.onnx.data")
    return create_session(path, graph_optimization_level="basic", what=str(model_path))


def _symmetric(upper: np.ndarray) -> np.ndarray:
    """``upper`` (its upper triangle filled, as ``dsyrk`` leaves it) made symmetric in place.

    Why in place: a 1B-parameter model's Grams take gigabytes; a symmetric copy of each would
    double that at the end of calibration.
    """
    if not upper.flags.writeable:  # e.g. a Ray worker's result, read from its object store
        upper = np.array(upper, order="F")
    n = upper.shape[0]
    step = 512
    for lo in range(0, n, step):  # column blocks: the lower part of each from the upper rows
        hi = min(n, lo + step)
        block = upper[lo:hi, lo:hi]
        block[:] = np.triu(block) + np.triu(block, 1).T
        if hi < n:
            upper[hi:, lo:hi] = upper[lo:hi, hi:].T
    return upper


def _external_locations(model: onnx.ModelProto) -> list[str]:
    """The external-data files the model's initializers name (relative to its folder)."""
    found = {
        entry.value
        for init in model.graph.initializer
        if init.data_location == onnx.TensorProto.EXTERNAL
        for entry in init.external_data
        if entry.key == "location"
    }
    return sorted(found)


def _inline_small_tensors(model: onnx.ModelProto, folder: Path) -> None:
    """Read the external tensors that are not float matrices (shapes, indices, biases) inline.

    Why: ONNX Runtime's shape inference cannot read a Reshape's shape from external data (a
    model saved with threshold 0 fails to load), and such tensors cost nothing to carry inline.
    The bytes are read by offset here, not through onnx's loader: it refuses a data file with
    more than one hard link, which is the case while another calibration shard on this machine
    (``compress --ray``) holds its scratch link to the same file.
    """
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if len(tensor.dims) >= 2 and tensor.data_type == onnx.TensorProto.FLOAT:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "?")
        try:
            if Path(location).is_absolute() or ".." in Path(location).parts:
                raise ValueError(f"location {location!r} is outside the model's folder")
            with (folder / location).open("rb") as handle:
                handle.seek(int(info.get("offset", 0)))
                length = int(info["length"]) if "length" in info else -1
                raw = handle.read(length)
            if length >= 0 and len(raw) != length:
                raise ValueError(f"{length} bytes expected, {len(raw)} found")
            tensor.raw_data = raw
        except Exception as exc:
            raise ModelLoadError(
                f"The external data file {folder / location} of {tensor.name} could not be read "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})."
            ) from exc
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a symbolic link across file systems).

    Why links: the instrumented header must sit next to the weights it names, and the input
    model's folder must stay untouched; a link costs no disk and no memory.
    """
    import os

    if not source.is_file():
        raise ModelLoadError(f"The external data file {source} of the model does not exist.")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        os.symlink(source.resolve(), target)


def activation_rows(value: np.ndarray, mask: np.ndarray, transpose: bool) -> np.ndarray:
    """Rows of ``X`` (one per real token) from an activation tensor, padding removed."""
    if transpose and value.ndim == 2:
        value = value.T
    if value.ndim >= 3 and value.shape[:2] == mask.shape:
        return value[mask.astype(bool)].reshape(-1, value.shape[-1])
    if value.ndim == 2 and value.shape[0] == mask.size:
        return value[mask.reshape(-1).astype(bool)]
    return value.reshape(-1, value.shape[-1])


def _cache_key(parts: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _tokenizer_digest(folder: Path) -> str:
    from factorlm._common.files import sha256_file

    digest = hashlib.sha256()
    for name in sorted((*TOKENIZER_FILES, "special_tokens_map.json")):
        if (folder / name).is_file():
            digest.update(name.encode() + sha256_file(folder / name).encode())
    return digest.hexdigest()


def _lookups(model: onnx.ModelProto, targets: Sequence[Target]) -> dict[str, tuple[str, int]]:
    """Target weights also read by ``Gather(W, <graph input>)``: an embedding tied to an LM head.

    ``{weight: (token id input, vocabulary size)}``; calibration counts the ids each looks up.
    """
    weights = {t.weight for t in targets}
    inputs = {i.name for i in model.graph.input}
    rows = {i.name: int(i.dims[0]) for i in model.graph.initializer if i.name in weights}
    return {
        node.input[0]: (node.input[1], rows[node.input[0]])
        for node in model.graph.node
        if node.op_type == "Gather"
        and len(node.input) == 2
        and node.input[0] in rows
        and node.input[1] in inputs
    }


Group = tuple[str, bool]


def _groups(targets: Sequence[Target]) -> dict[Group, list[Target]]:
    """Targets by the activation they read, ``(activation, transpose)``: one Gram per group."""
    groups: dict[Group, list[Target]] = {}
    for target in targets:
        groups.setdefault((target.activation, target.transpose), []).append(target)
    return groups


@dataclass
class ShardSums:
    """The additive part of calibration over some batches: every field sums across shards.

    ``gram``/``held`` hold only their upper triangle (as ``dsyrk`` fills them), unless
    ``symmetric``.
    """

    gram: dict[Group, np.ndarray] = field(default_factory=dict)
    abs_sum: dict[Group, np.ndarray] = field(default_factory=dict)
    rows: dict[Group, int] = field(default_factory=dict)
    held: dict[Group, np.ndarray] = field(default_factory=dict)
    held_rows: dict[Group, int] = field(default_factory=dict)
    tokens: int = 0
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    #: The Grams are already symmetric (and memory-mapped): a pass-wise capture's result.
    symmetric: bool = False

    def add(self, other: ShardSums) -> None:
        """Add ``other``'s sums to these (in place); the caller fixes the order.

        Arrays are taken over, not copied, and then added into in place (one sum buffer per
        array, not one per shard): ``other`` must not be used afterwards.
        """
        if self.symmetric or other.symmetric:
            raise ValueError("pass-wise (symmetric, mapped) sums are not added across shards")
        for mine, theirs in (
            (self.gram, other.gram),
            (self.abs_sum, other.abs_sum),
            (self.held, other.held),
            (self.counts, other.counts),
        ):
            for key, value in theirs.items():
                if key not in mine:
                    mine[key] = value  # type: ignore[index]
                elif mine[key].flags.writeable and mine[key].flags.owndata:  # type: ignore[index]
                    np.add(mine[key], value, out=mine[key])  # type: ignore[index]
                else:  # a read-only (Ray object store) or borrowed array: one copy, then in place
                    mine[key] = mine[key] + value  # type: ignore[index]
        for count, more in ((self.rows, other.rows), (self.held_rows, other.held_rows)):
            for group, n in more.items():
                count[group] = count.get(group, 0) + n
        self.tokens += other.tokens


def shard_sums(
    model: Path,
    targets: Sequence[Target],
    lookups: dict[str, tuple[str, int]],
    tokenizer: Path,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    holdout: bool,
    first_batch: int = 0,
    progress: bool = False,
    gram_budget: int | None = None,
    spill: Path | None = None,
    chunk: tuple[int, Sequence[Group]] | None = None,
) -> ShardSums:
    """:class:`ShardSums` of ``texts`` (batches ``first_batch``, ``first_batch + 1``, ...).

    Why a function of its own: ``collect_statistics`` runs it on all texts, or each Ray task on
    its shard with its own ORT session; ``first_batch`` keeps the held-back batches (every
    ``HOLDOUT_EVERY``-th of the whole set) the same either way.

    ``gram_budget`` (bytes) with a ``spill`` folder bounds the Grams held at once: when all of
    them would not fit, the weights' input groups are split into chunks that do, the texts are
    run once per chunk (only that chunk's activations are fetched), and each finished chunk's
    Grams are made symmetric and moved to memory-mapped files in ``spill`` whose pages are
    handed back. The sums are the same as in one pass, value for value; they come back
    symmetric (``ShardSums.symmetric``).

    ``chunk`` ``(index, groups)`` runs only that pass of such a capture (a Ray task's share):
    the upper triangles of those groups' Grams come back, to be added across shards; the
    tokens and looked-up ids are counted in pass 0 only, as the local passes count them.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    tok = TextTokenizer(tokenizer)
    groups = _groups(targets)
    budget = gram_budget if spill is not None else None
    if chunk is None:
        first_chunk, chunks = 0, _chunks(groups, budget, holdout)
    else:
        first_chunk, chunks = chunk[0], [list(chunk[1])]
    if first_chunk > 0:
        lookups = {}  # counted with the tokens, in pass 0
    sums = ShardSums(
        rows={g: 0 for c in chunks for g in c},
        held_rows={g: 0 for c in chunks for g in c},
        counts={name: np.zeros(vocab) for name, (_, vocab) in lookups.items()},
        symmetric=len(chunks) > 1,
    )
    if len(chunks) > 1:
        logger.info(
            "Calibrating in %d passes over the texts: the Grams of %d input groups would not "
            "fit in %.0f MiB at once",
            len(chunks), len(groups), (gram_budget or 0) / 2**20,
        )  # fmt: skip
    gram, abs_sum, held = sums.gram, sums.abs_sum, sums.held
    with tempfile.TemporaryDirectory(prefix="factorlm-calib-") as scratch:
        session = _instrumented_session(model, list(targets), Path(scratch))
        names = [o.name for o in session.get_outputs()]
        columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, disable=not progress) as bar:
            task = bar.add_task(f"Calibrating {model.name}", total=len(texts) * len(chunks))
            done = 0
            for chunk_index, chunk_groups in enumerate(chunks):
                wanted = [n for n in dict.fromkeys(a for a, _ in chunk_groups) if n in names]
                batch_index = first_batch
                for end, mask, feeds in batch_feeds(
                    session.get_inputs(), tok, texts,
                    batch_size=batch_size, max_length=max_length, model_name=str(model),
                ):  # fmt: skip
                    values = dict(zip(wanted, session.run(wanted, feeds), strict=True))
                    if first_chunk + chunk_index == 0:
                        sums.tokens += int(mask.sum())
                        for name, (ids, vocab) in lookups.items():
                            looked_up = np.asarray(feeds[ids])[mask.astype(bool)]
                            sums.counts[name] += np.bincount(looked_up, minlength=vocab)[:vocab]
                    for group in chunk_groups:
                        activation, transpose = group
                        x = activation_rows(values[activation], mask, transpose)
                        x = x.astype(np.float64)
                        if group not in gram:
                            gram[group] = np.zeros((x.shape[1], x.shape[1]), order="F")
                            abs_sum[group] = np.zeros(x.shape[1])
                        # syrk computes only one triangle of X^T X: half the float64 work.
                        gram[group] = dsyrk(1.0, x.T, beta=1.0, c=gram[group], overwrite_c=1)
                        abs_sum[group] += np.abs(x).sum(axis=0)
                        sums.rows[group] += x.shape[0]
                        if holdout and batch_index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1:
                            if group not in held:
                                held[group] = np.zeros_like(gram[group])
                            held[group] = dsyrk(1.0, x.T, beta=1.0, c=held[group], overwrite_c=1)
                            sums.held_rows[group] += x.shape[0]
                    del values
                    batch_index += 1
                    bar.advance(task, chunk_index * len(texts) + end - done)
                    done = chunk_index * len(texts) + end
                if sums.symmetric:
                    assert spill is not None
                    for table in (gram, held):
                        for group in chunk_groups:
                            if group in table:
                                table[group] = _spilled(_symmetric(table[group]), spill)
    return sums


def _chunks(
    groups: dict[Group, list[Target]], budget: int | None, holdout: bool
) -> list[list[Group]]:
    """``groups`` in order, cut into runs whose float64 Grams fit in ``budget`` bytes."""
    if budget is None:
        return [list(groups)]
    per = 2 if holdout else 1
    sizes = [per * 8 * members[0].in_features ** 2 for members in groups.values()]
    if sum(sizes) <= budget:
        return [list(groups)]
    chunks: list[list[Group]] = [[]]
    used = 0
    for group, size in zip(groups, sizes, strict=True):
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks


def _spilled(array: np.ndarray, folder: Path) -> np.ndarray:
    """``array`` moved to a read-only memory map of a new file in ``folder``, pages handed back."""
    import uuid

    path = folder / f"gram-{uuid.uuid4().hex}.npy"
    np.save(path, array, allow_pickle=False)
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    release_pages([mapped])
    return mapped


def _ray_sums(
    model: Path,
    targets: Sequence[Target],
    lookups: dict[str, tuple[str, int]],
    tokenizer: Path,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int,
    holdout: bool,
    address: str,
    gram_budget: int | None,
    spill: Path,
) -> ShardSums:
    """:func:`shard_sums` as Ray tasks, holding about ``gram_budget`` bytes of Grams at once.

    The budget rule: with ``n`` CPUs in the cluster, ``n`` tasks are in flight at once (each
    holding, or having returned, one chunk's Grams) and the driver adds up one more chunk, so a
    chunk's Grams get ``gram_budget / (n + 1)``; the input groups are cut into chunks of that
    size as the local passes cut them (a group wider than that is a chunk of its own, and then
    the budget is exceeded: on many CPUs the share is small). Each chunk is split into
    ``n // chunks`` shards of consecutive whole batches (at least one, at
    most one per batch), and each Ray task computes one (chunk, shard) pair with its own ORT
    session and returns only that chunk's sums. The driver adds a chunk's shards in order and,
    when there are several chunks, makes its Grams symmetric and spills them to ``spill``
    before it fetches the next chunk's results.

    One chunk (all Grams fit) is plain data parallelism: equal to the local statistics up to
    the rounding of the sum across shards. Several chunks of one shard each are the local
    passes, value for value; several shards per chunk again differ only by rounding.
    """
    from factorlm.distributed import ordered_map, ray_session

    groups = _groups(targets)
    batches = -(-len(texts) // batch_size)
    with ray_session(address) as ray:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        share = None if gram_budget is None else gram_budget // (cpus + 1)
        chunks = _chunks(groups, share, holdout)
        shards = max(1, min(batches, cpus // len(chunks)))
        common = (model, list(targets), lookups, tokenizer)
        parts = _shard_texts(texts, batches, shards, batch_size, max_length, holdout)
        jobs = [(*common, *part, (i, chunk)) for i, chunk in enumerate(chunks) for part in parts]
        logger.info(
            "Calibrating %s on %d Ray workers (%d batches; %d pass(es) of %d shard(s))",
            model.name, min(cpus, len(jobs)), batches, len(chunks), shards,
        )  # fmt: skip
        results = ordered_map(_shard_job, jobs, window=cpus)
        if len(chunks) == 1:
            return _added(results)
        total = ShardSums(symmetric=True)
        for _ in chunks:  # a chunk's Grams are spilled before the next chunk's are fetched
            _settle(_added(itertools.islice(results, shards)), total, spill)
        return total


def _shard_texts(
    texts: Sequence[str], batches: int, shards: int, batch_size: int, max_length: int, holdout: bool
) -> list[tuple[Any, ...]]:
    """``(texts, max_length, batch_size, holdout, first_batch)`` of each shard, in order.

    ``shards <= batches``, so none is empty.
    """
    jobs = []
    for i in range(shards):
        lo, hi = i * batches // shards, (i + 1) * batches // shards
        jobs.append(
            (list(texts[lo * batch_size : hi * batch_size]), max_length, batch_size, holdout, lo)
        )
    return jobs


def _added(parts: Iterable[ShardSums]) -> ShardSums:
    """The sum of ``parts``, added in their order."""
    total = ShardSums()
    for part in parts:
        total.add(part)
    return total


def _settle(chunk: ShardSums, total: ShardSums, spill: Path) -> None:
    """One chunk's added-up sums moved into ``total``, its Grams made symmetric and spilled to
    memory maps in ``spill``: what the local passes leave after each chunk.

    The small arrays are copied: a Ray result's arrays are views of its object-store buffer,
    and keeping one would keep the chunk's whole result, Grams included, in the store.
    """
    for theirs, mine in ((chunk.gram, total.gram), (chunk.held, total.held)):
        for group in list(theirs):
            mine[group] = _spilled(_symmetric(theirs.pop(group)), spill)
    total.abs_sum.update({group: np.array(v) for group, v in chunk.abs_sum.items()})
    total.counts.update({name: np.array(v) for name, v in chunk.counts.items()})
    total.rows.update(chunk.rows)
    total.held_rows.update(chunk.held_rows)
    total.tokens += chunk.tokens


def _shard_job(
    model: Path,
    targets: list[Target],
    lookups: dict[str, tuple[str, int]],
    tokenizer: Path,
    texts: list[str],
    max_length: int,
    batch_size: int,
    holdout: bool,
    first_batch: int,
    chunk: tuple[int, list[Group]],
) -> ShardSums:
    """One Ray task: one chunk's sums over one shard (positional, as ``ordered_map`` calls it)."""
    return shard_sums(
        model, targets, lookups, tokenizer, texts,
        max_length=max_length, batch_size=batch_size, holdout=holdout, first_batch=first_batch,
        chunk=chunk,
    )  # fmt: skip


def collect_statistics(
    model: Path,
    data: Path | Sequence[str],
    *,
    tokenizer: Path | None = None,
    text_column: str = "text",
    max_samples: int = 256,
    max_length: int = 128,
    batch_size: int = 16,
    weights: Collection[str] | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    holdout: bool = False,
    ray_address: str | None = None,
    gram_budget: int | Literal["auto", "none"] = "auto",
) -> CalibrationStats:
    """Gram ``X^T X``, mean ``|x|`` and token count of every target weight's input on real text.

    ``model`` is an ONNX file; ``data`` a JSONL/CSV/TXT file, a dataset folder or a list of
    texts. ``weights`` limits the targets to those initializer names. ``cache_dir`` defaults to
    ``<cache root>/calibration``. Raises ``DataError`` for missing/empty data, a missing column
    or a calibration set with fewer real tokens than some weight has input features (its Gram
    matrix would be singular). ``holdout`` also keeps the Gram of every ``HOLDOUT_EVERY``-th
    batch apart (``stats.gram_heldout``), from which ``compress --shrinkage auto`` picks each
    Gram's shrinkage by held-back likelihood. An embedding tied to an LM head gets the Gram of
    the head's input and the count of each token id looked up (``stats.token_counts``).
    ``ray_address`` (``compress --ray``'s address words) splits the texts into consecutive
    whole-batch shards, as many per chunk of Grams as the cluster's CPUs allow, each a Ray task
    with its own ORT session, and adds their sums in shard order: equal to the local statistics
    up to rounding (1e-10 relative).
    ``gram_budget`` bounds the Grams held at once (``"auto"``: the model's fp32 size), locally
    by passes over the texts, one per chunk of input groups, and on Ray by the same chunks
    shared among the tasks in flight (``_ray_sums``); ``"none"``: one pass, no bound.
    """
    model = Path(model)
    if not model.is_file():
        raise ModelLoadError(f"The ONNX model {model} does not exist.")
    if batch_size < 1 or max_length < 2:
        raise ConfigError(
            f"batch_size ({batch_size}) must be >= 1 and max_length ({max_length}) >= 2."
        )
    texts = load_texts(data, text_column, max_samples)
    tok_dir = find_tokenizer(model, explicit=tokenizer)
    proto = onnx.load(str(model), load_external_data=False)
    targets = find_targets(proto, weights, tied_heads=True)
    lookups = _lookups(proto, targets)
    budget = _float_bytes(proto) if gram_budget == "auto" else gram_budget
    del proto
    if not targets:
        raise ModelLoadError(f"{model} has no MatMul/Gemm with a 2-D float initializer weight.")

    from factorlm._common.files import cache_root
    from factorlm.data import texts_digest

    key = _cache_key(
        {
            "version": _VERSION,
            "model": file_digest(model),
            "tokenizer": _tokenizer_digest(tok_dir),
            "texts": texts_digest(texts),
            "max_length": max_length,
            "weights": sorted(t.weight for t in targets),
            "holdout": HOLDOUT_EVERY if holdout else 0,
            **({"lookups": sorted(lookups)} if lookups else {}),
        }
    )
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "calibration"
    cached = cache / f"stats-{key}.npz"
    if cached.is_file():
        logger.info("Loading cached calibration statistics %s", cached)
        return CalibrationStats.load(cached)

    start = time.perf_counter()
    # Grams over the budget are spilled to files here; the folder goes at the end, and Linux
    # keeps an unlinked file's pages for the maps that still use them.
    with tempfile.TemporaryDirectory(prefix="factorlm-grams-") as spill_dir:
        spill = Path(spill_dir)
        if ray_address is None:
            sums = shard_sums(
                model, targets, lookups, tok_dir, texts,
                max_length=max_length, batch_size=batch_size, holdout=holdout, progress=progress,
                gram_budget=None if budget == "none" else int(budget), spill=spill,
            )  # fmt: skip
        else:
            sums = _ray_sums(
                model, targets, lookups, tok_dir, texts,
                max_length=max_length, batch_size=batch_size, holdout=holdout, address=ray_address,
                gram_budget=None if budget == "none" else int(budget), spill=spill,
            )  # fmt: skip
        groups = _groups(targets)
        gram, abs_sum, rows_seen = sums.gram, sums.abs_sum, sums.rows
        held, held_rows, tokens, counts = sums.held, sums.held_rows, sums.tokens, sums.counts

        stats = CalibrationStats(tokens=tokens, token_counts=counts)

        def whole(m: np.ndarray) -> np.ndarray:
            return m if sums.symmetric else _symmetric(m)  # syrk fills the upper part

        full = {g: whole(m) for g, m in gram.items()}
        for group, members in groups.items():
            for target in members:
                if gram[group].shape[0] != target.in_features:
                    raise ModelLoadError(
                        f"The activation {group[0]} has {gram[group].shape[0]} features but weight "
                        f"{target.weight} expects {target.in_features}."
                    )
                if rows_seen[group] < target.in_features:
                    raise DataError(
                        f"The calibration set gives {rows_seen[group]} tokens to weight "
                        f"{target.weight}, fewer than its {target.in_features} input features; "
                        "use more or longer samples."
                    )
                stats.gram[target.weight] = full[group]
                stats.mean_abs[target.weight] = abs_sum[group] / rows_seen[group]
                if group in held:
                    m = held[group]
                    stats.gram_heldout[target.weight] = whole(m)
                    stats.heldout_tokens = held_rows[group]
        widest = max(targets, key=lambda t: t.in_features)
        if tokens < _TOKENS_PER_FEATURE * widest.in_features:
            logger.warning(
                "The calibration set has %d tokens for weights with up to %d input features (%s): "
                "fewer than %d per feature, so the whitening may fit this text's correlations; use "
                "more or longer samples, or --shrinkage auto.",
                tokens, widest.in_features, widest.weight, _TOKENS_PER_FEATURE,
            )  # fmt: skip
        elapsed = time.perf_counter() - start
        logger.info(
            "Calibrated %s weights on %s tokens in %.1f s (%.0f tokens/s)",
            len(stats.gram), tokens, elapsed, tokens / max(elapsed, 1e-9),
        )  # fmt: skip
        try:
            stats.save(cached)
        except OSError as exc:  # a read-only cache must not lose the statistics
            logger.warning("Could not cache calibration statistics in %s: %s", cached, exc)
    return stats


def _float_bytes(model: onnx.ModelProto) -> int:
    """fp32 bytes of the model's float initializers: the default budget for Grams held at once.

    Why this budget: ``factorlm run`` must stay within a few times the model's size, and the
    Grams of wide layers alone can be 2.5x it (BERT-base); beyond it, more passes over the
    texts cost time, not memory.
    """
    return sum(
        4 * int(np.prod(t.dims, dtype=np.int64))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )
