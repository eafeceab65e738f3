"""The run config: defaults, typos named with a suggestion, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorlm.errors import ConfigError
from factorlm.pipeline.config import load_config, parse_config


def test_empty_config_gives_the_documented_defaults() -> None:
    config = parse_config({})
    assert config.compress.method == "whiten"
    assert config.compress.ratio == 0.6
    assert config.benchmark.shapes == []  # the model's axes: 1x128 and 8x128 where free
    # recover() defaults, so a config without them trains like the API and the CLI
    recover = config.recover
    assert (recover.clock, recover.temperature, recover.lm_weight) == ("wall", 2.0, 0.0)
    assert recover.feature_fraction == 0.5


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"compres": {}}, "unknown key 'compres'; did you mean 'compress'?"),
        ({"compress": {"methd": "svd"}}, "unknown key 'compress.methd'; did you mean 'method'?"),
        (
            {"benchmark": {"goals": {"min_speedp": 1.2}}},
            "unknown key 'benchmark.goals.min_speedp'; did you mean 'min_speedup'?",
        ),
        ({"compress": {"ratio": 1.5}}, "'compress.ratio' is invalid"),
        ({"compress": {"method": "pca"}}, "'compress.method' is invalid"),
        ({"benchmark": {"shapes": ["8by128"]}}, "'8by128' is not BATCHxSEQUENCE"),
        ({"recover": {"clock": "gpu"}}, "'recover.clock' is invalid: Input should be 'wall' or"),
        ({"recover": {"temperature": 0}}, "'recover.temperature' is invalid"),
        ({"recover": {"lm_weight": -1}}, "'recover.lm_weight' is invalid"),
        ({"recover": {"feature_fraction": 1.5}}, "'recover.feature_fraction' is invalid"),
        ({"recover": {"temperatur": 1.0}}, "did you mean 'temperature'?"),
    ],
)
def test_bad_config_is_one_sentence_naming_the_key(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="job.yaml")
    message = str(info.value)
    assert message.startswith("job.yaml: ")
    assert expected in message
    assert "\n" not in message


def test_load_config_resolves_paths_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("model: models/bert\ncompress:\n  method: svd\n  ratio: 0.5\n")
    config = load_config(path)
    assert config.model == tmp_path / "models" / "bert"
    assert config.output_dir == tmp_path / "factorlm-run"
    assert config.compress.ratio == 0.5


def test_invalid_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("compress: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
