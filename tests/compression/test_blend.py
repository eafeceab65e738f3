"""Blending each calibration Gram with its Gram on generic text (``blend``), on the tiny exported
Llama: the fixed and held-back-chosen weights, the options that refuse it, CLI and YAML."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import factorlm
from factorlm import cli
from factorlm.calibration import CalibrationStats, collect_statistics
from factorlm.compression import blended_statistics
from factorlm.decompose import best_blend, blend_gram
from factorlm.errors import ConfigError, DataError
from factorlm.options import CompressOptions
from factorlm.pipeline.config import parse_config
from tiny_vocab import LONG_TEXTS

TEXTS = LONG_TEXTS * 8


def _random_texts(count: int, seed: int) -> list[str]:
    from tiny_vocab import WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=12)) for _ in range(count)]


@pytest.fixture
def stats(tiny_llama_past: Path, tmp_path: Path) -> CalibrationStats:
    # the user's few texts and the generic ones come from one source (random words), so the
    # generic Gram is a better estimate of what the held-back batches look like
    own = collect_statistics(
        tiny_llama_past, _random_texts(48, 0), max_length=16, batch_size=3, holdout=True,
        cache_dir=tmp_path, max_samples=48, progress=False,
    )  # fmt: skip
    generic = collect_statistics(
        tiny_llama_past, _random_texts(240, 1), max_length=16, batch_size=8, cache_dir=tmp_path,
        max_samples=240, progress=False,
    )  # fmt: skip
    own.gram_generic, own.generic_tokens = generic.gram, generic.tokens
    return own


def test_fixed_blend_is_the_per_token_mixture(stats: CalibrationStats) -> None:
    blended = blended_statistics(stats, 0.4)
    for name, gram in stats.gram.items():
        want = 0.6 * gram + 0.4 * stats.tokens / stats.generic_tokens * stats.gram_generic[name]
        np.testing.assert_allclose(blended.gram[name], want, rtol=1e-12)
    shared = [n for n in stats.gram if stats.gram[n] is stats.gram[next(iter(stats.gram))]]
    assert all(blended.gram[n] is blended.gram[shared[0]] for n in shared)  # Q/K/V share one
    assert stats.gram is not blended.gram  # the input statistics are left alone


def test_auto_blend_is_the_held_back_likelihood_choice(stats: CalibrationStats) -> None:
    blended = blended_statistics(stats, None)
    n, held = stats.tokens, stats.heldout_tokens
    betas = set()
    for name, gram in stats.gram.items():
        beta = best_blend(
            gram - stats.gram_heldout[name], n - held, stats.gram_heldout[name], held,
            stats.gram_generic[name], stats.generic_tokens,
        )  # fmt: skip
        betas.add(beta)
        want = blend_gram(gram, n, stats.gram_generic[name], stats.generic_tokens, beta)
        np.testing.assert_allclose(blended.gram[name], want, rtol=1e-12)
    # a few hundred tokens pin down 64- to 128-wide correlations poorly: a generic share of the
    # same source must pay on the held-back batches
    assert max(betas) >= 0.25


def test_compress_refuses_blend_without_generic_grams(
    stats: CalibrationStats, tiny_llama_past: Path, tmp_path: Path
) -> None:
    stats.gram_generic, stats.generic_tokens = {}, 0
    with pytest.raises(ConfigError, match="generic text"):
        factorlm.compress(tiny_llama_past, tmp_path / "o.onnx", stats=stats, blend="auto")
    assert not (tmp_path / "o.onnx").exists()
    saved = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    assert saved.generic_tokens == 0 and not saved.gram_generic


def test_generic_grams_survive_save_and_load(stats: CalibrationStats, tmp_path: Path) -> None:
    again = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    assert again.generic_tokens == stats.generic_tokens > 0
    name = next(iter(stats.gram))
    np.testing.assert_array_equal(again.gram_generic[name], stats.gram_generic[name])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"blend": "auto", "blend_weight": 0.5}, "exclude each other: auto chooses"),
        ({"blend": "auto", "shrinkage": "auto"}, "'blend' and 'shrinkage' exclude each other"),
        ({"blend_weight": 0.3, "method": "asvd"}, "use whiten or drone"),
        ({"blend_weight": 1.5}, "'blend_weight' is 1.5; it must be >= 0.0 and <= 1.0"),
        ({"blend": "half"}, "option 'blend' is 'half'; choose one of none, auto"),
    ],
)
def test_bad_blend_options_are_one_sentence(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CompressOptions(**options)  # type: ignore[arg-type]


def test_yaml_calibration_blend_reaches_the_compress_options() -> None:
    config = parse_config({"calibration": {"blend_weight": 0.25}})
    opts = config.options(CompressOptions)
    assert (opts.blend, opts.blend_weight, opts.blending) == ("none", 0.25, True)
    assert parse_config({}).options(CompressOptions).blending is False
    with pytest.raises(ConfigError, match=r"calibration\.blend"):
        parse_config({"calibration": {"blend": "always"}})


def test_cli_blend_auto_collects_the_generic_grams(tiny_llama_past: Path, tmp_path: Path) -> None:
    from factorlm.assets.mixed import mixed_calibration_texts

    try:
        mixed_calibration_texts(2)
    except DataError as exc:  # the assets are prepared by .ci/run and the README's command
        pytest.skip(str(exc))
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out" / "model.onnx"
    argv = [
        "compress", str(tiny_llama_past), "-o", str(out), "--data", str(data), "--ratio", "0.5",
        "--min-size", "256", "--max-length", "16", "--batch-size", "3", "--blend", "auto",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert out.is_file()


def _squared_gradients(stats: CalibrationStats, tokens: int, seed: int) -> dict[str, np.ndarray]:
    """Per-token output gradients (tokens × out) per weight, with out = the Gram's width."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal((tokens, gram.shape[0])) * rng.uniform(0.1, 3.0, gram.shape[0])
        for name, gram in stats.gram.items()
    }


@pytest.mark.parametrize("weight", [0.3, None])
def test_blended_output_fisher_is_the_mixture_of_squared_gradients(
    stats: CalibrationStats, weight: float | None
) -> None:
    own = _squared_gradients(stats, stats.tokens, 2)
    generic = _squared_gradients(stats, stats.generic_tokens, 3)
    stats.output_fisher = {n: np.sum(g**2, axis=0) for n, g in own.items()}
    stats.output_fisher_generic = {n: np.sum(g**2, axis=0) for n, g in generic.items()}
    blended = blended_statistics(stats, weight, loss_aware=True)
    n, n_gen, held = stats.tokens, stats.generic_tokens, stats.heldout_tokens
    betas = set()
    for name, gram in stats.gram.items():
        beta = weight
        if beta is None:  # the β chosen for the weight's input Gram
            beta = best_blend(
                gram - stats.gram_heldout[name], n - held, stats.gram_heldout[name], held,
                stats.gram_generic[name], n_gen,
            )  # fmt: skip
        betas.add(beta)
        # the output Fisher of the token mixture: each own token weighs (1 − β), each generic
        # one β·n/n_gen, so the result stays in the calibration data's token units
        tokens = np.concatenate([own[name], generic[name]])
        weights = np.concatenate([np.full(n, 1.0 - beta), np.full(n_gen, beta * n / n_gen)])
        want = np.sum(weights[:, None] * tokens**2, axis=0)
        np.testing.assert_allclose(blended.output_fisher[name], want, rtol=1e-10)
        # and the Gram at the same β
        np.testing.assert_allclose(
            blended.gram[name], blend_gram(gram, n, stats.gram_generic[name], n_gen, beta),
            rtol=1e-12,
        )  # fmt: skip
    assert weight is not None or max(betas) > 0  # something was blended
    assert stats.output_fisher[name] is not blended.output_fisher[name]  # input left alone
    # without loss_aware the output Fisher is not touched (compress drops it anyway)
    plain = blended_statistics(stats, weight)
    assert all(plain.output_fisher[k] is v for k, v in stats.output_fisher.items())


def test_blend_without_generic_output_fisher_warns_and_blends_the_grams(
    stats: CalibrationStats, caplog: pytest.LogCaptureFixture
) -> None:
    stats.output_fisher = {n: np.ones(g.shape[0]) for n, g in stats.gram.items()}
    with caplog.at_level("WARNING", logger="factorlm.compression"):
        blended = blended_statistics(stats, 0.5, loss_aware=True)
    assert "output_fisher_generic" in caplog.text
    assert all(blended.output_fisher[k] is v for k, v in stats.output_fisher.items())
    name = next(iter(stats.gram))
    assert not np.allclose(blended.gram[name], stats.gram[name])


def test_generic_output_fisher_survives_save_and_load(
    stats: CalibrationStats, tmp_path: Path
) -> None:
    name = next(iter(stats.gram))
    stats.output_fisher_generic = {name: np.arange(3.0)}
    again = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(again.output_fisher_generic[name], np.arange(3.0))


def test_cli_blend_with_loss_aware_blends_the_output_fisher(
    tiny_llama_past: Path, tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from factorlm.assets.mixed import mixed_calibration_texts
    from factorlm.calibration import collect_output_fisher
    from factorlm.calibration.requested import GENERIC_TEXTS, generic_statistics

    try:
        texts = mixed_calibration_texts(GENERIC_TEXTS)
    except DataError as exc:  # the assets are prepared by .ci/run and the README's command
        pytest.skip(str(exc))
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out" / "model.onnx"
    argv = [
        "compress", str(tiny_llama_past), "-o", str(out), "--data", str(data), "--ratio", "0.5",
        "--min-size", "256", "--max-length", "16", "--batch-size", "3", "--blend", "auto",
        "--loss-aware",
    ]  # fmt: skip
    with caplog.at_level("INFO", logger="factorlm.compression"):
        assert cli.main(argv) == 0
    assert out.is_file()
    blended = [r.getMessage() for r in caplog.records if "Output Fisher blended" in r.getMessage()]
    assert blended and not blended[0].startswith("Output Fisher blended with generic text's for 0")
    # generic_statistics' output Fisher is the one of the mixed set's texts
    hf = tiny_llama_dir
    generic = generic_statistics(
        tiny_llama_past, max_length=16, batch_size=3, cache_dir=tmp_path / "c", fisher_weights=hf
    )
    direct = collect_output_fisher(
        hf, tiny_llama_past, texts, task="lm", max_samples=GENERIC_TEXTS, max_length=16,
        batch_size=3, cache_dir=tmp_path / "d", progress=False,
    )  # fmt: skip
    assert set(generic.output_fisher_generic) == set(direct) and direct
    for name, value in direct.items():
        np.testing.assert_allclose(generic.output_fisher_generic[name], value, rtol=1e-6)


def test_grams_read_back_from_npz_are_scored_once_per_input(
    stats: CalibrationStats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    again = CalibrationStats.load(stats.save(tmp_path / "s.npz"))
    unique = {id(g) for g in stats.gram.values()}
    assert len({id(g) for g in again.gram.values()}) > len(unique)  # copies after the round trip
    with caplog.at_level("INFO", logger="factorlm.compression"):
        blended = blended_statistics(again, None)
    line = next(r.getMessage() for r in caplog.records if "Gram blend" in r.getMessage())
    counts = ast.literal_eval(line.split(": ", 1)[1])  # the log's {β: number of Grams}
    assert sum(counts.values()) == len(unique)
    direct = blended_statistics(stats, None)
    for name in stats.gram:
        np.testing.assert_allclose(blended.gram[name], direct.gram[name], rtol=1e-12)
