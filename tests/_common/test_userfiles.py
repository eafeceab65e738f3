"""The checked YAML reader: aliases cost their distinct nodes, never their expansion."""

from __future__ import annotations

from pathlib import Path

import pytest

from factorlm._common.userfiles import MAX_YAML_VALUES, _shape, read_yaml
from factorlm.errors import ConfigError

LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.timeout(120)  # walking the expansion (9**10 values) took two minutes before
def test_billion_laughs_is_refused_without_expanding(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(LAUGHS)
    with pytest.raises(ConfigError, match=f"more than {MAX_YAML_VALUES:,} values"):
        read_yaml(path)


def test_expanded_size_is_counted_exactly_from_distinct_nodes() -> None:
    import yaml

    value = yaml.safe_load(LAUGHS)
    # list "i" expands to 9**9 scalars + its 1 + 9 + ... + 9**8 lists
    expected_i = 9**9 + sum(9**k for k in range(9))
    assert _shape(value["i"]) == (9, expected_i)


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="contains itself"):
        read_yaml(path)


def test_shared_aliases_within_the_limit_load(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: &a [1, 2]\nb: [*a, *a]\nc: {d: *a}\n")
    assert read_yaml(path) == {"a": [1, 2], "b": [[1, 2], [1, 2]], "c": {"d": [1, 2]}}


def test_depth_counts_the_deepest_path_through_shared_nodes(tmp_path: Path) -> None:
    deep = "x: " + "[" * 70 + "]" * 70 + "\n"
    path = tmp_path / "c.yaml"
    path.write_text(deep)
    with pytest.raises(ConfigError, match="deeper than 64 levels"):
        read_yaml(path)
