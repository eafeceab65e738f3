"""One vocabulary: every option field has the same name, default and range as its YAML key and
its CLI flag, and the enumerations other packages keep agree with ``factorlm.options``."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from factorlm import options as opts
from factorlm.options import (
    BenchOptions,
    BuildOptions,
    CompressOptions,
    RecoverOptions,
    option_fields,
)
from factorlm.pipeline.config import OPTION_CLASSES, RunConfig, yaml_key

CLASSES = (CompressOptions, BuildOptions, BenchOptions, RecoverOptions)
#: The CLI verb of each options class.
VERBS = {
    CompressOptions: "compress",
    BuildOptions: "build",
    BenchOptions: "bench",
    RecoverOptions: "recover",
}
#: YAML keys that are not option fields, and why.
YAML_ONLY = {
    "model",  # the job's input
    "output_dir",  # the job's output folder
    "export.task",
    "export.opset",
    "export.trust_remote_code",  # export has no options class: three keyword arguments
    "data.path",
    "data.labels",  # passed to the benchmark as BenchOptions.labels by the pipeline
    "data.eval_samples",
    "data.seed",  # the calibration/evaluation split, a pipeline-only stage
}
BOUNDS = ("gt", "ge", "lt", "le")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _norm(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _yaml_field(key: str) -> FieldInfo:
    model: type[BaseModel] = RunConfig
    *sections, leaf = key.split(".")
    for section in sections:
        annotation = model.model_fields[section].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel), key
        model = annotation
    assert leaf in model.model_fields, f"YAML key {key} does not exist"
    return model.model_fields[leaf]


def _yaml_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _yaml_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _bounds(info: FieldInfo) -> dict[str, Any]:
    found = {}
    for item in info.metadata:
        for bound in BOUNDS:
            if hasattr(item, bound):
                found[bound] = getattr(item, bound)
    return found


def _literal_args(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        found = _literal_args(arg)
        if found is not None:
            return found
    return None


def _fields() -> list[tuple[type[Any], dataclasses.Field[Any]]]:
    return [(cls, f) for cls in CLASSES for f in option_fields(cls)]


def test_the_config_covers_every_options_class() -> None:
    assert set(OPTION_CLASSES) == set(CLASSES)


@pytest.mark.parametrize(
    ("cls", "f"), _fields(), ids=[f"{c.__name__}.{f.name}" for c, f in _fields()]
)
def test_option_field_matches_its_yaml_key(cls: type[Any], f: dataclasses.Field[Any]) -> None:
    key = yaml_key(cls, f.name)
    if key is None:
        return
    info = _yaml_field(key)
    expected = None if f.metadata.get("yaml_optional") else _default(f)
    assert _norm(info.get_default(call_default_factory=True)) == _norm(expected), key
    assert _bounds(info) == {b: f.metadata[b] for b in BOUNDS if b in f.metadata}, key
    choices = f.metadata.get("choices")
    if choices is not None:
        assert _literal_args(info.annotation) == tuple(choices), key
    if "yaml" not in f.metadata:  # a key shared by two classes takes one of their help texts
        assert info.description == f.metadata["help"], key


def test_every_yaml_key_is_an_option_field_or_listed() -> None:
    mapped = {yaml_key(cls, f.name) for cls, f in _fields()} - {None}
    unmapped = set(_yaml_keys()) - mapped - YAML_ONLY
    assert not unmapped, f"YAML keys without an option field: {sorted(unmapped)}"
    assert set(_yaml_keys()) >= YAML_ONLY


def test_the_config_turns_back_into_the_options() -> None:
    config = RunConfig.model_validate(
        {
            "compress": {"method": "svd", "ratio": 0.4},
            "calibration": {"max_length": 64},
            "recover": {"method": None, "steps": 12},
        }
    )
    compress = config.options(CompressOptions)
    assert (compress.method, compress.ratio, compress.max_length) == ("svd", 0.4, 64)
    recover = config.options(RecoverOptions)
    assert (recover.method, recover.steps, recover.max_length) == ("distill", 12, 64)
    assert config.options(BuildOptions) == BuildOptions(max_length=64)  # shared calibration key


def test_decided_defaults() -> None:
    assert (CompressOptions().method, CompressOptions().ratio) == ("whiten", 0.6)
    assert RecoverOptions().steps == 300
    with pytest.raises(Exception, match="ratio"):
        RunConfig.model_validate({"compress": {"ratio": 1.0}})


def test_enumerations_elsewhere_agree_with_options() -> None:
    from factorlm.bench import quality
    from factorlm.bench.tasks import TASKS as BENCH_TASKS
    from factorlm.calibration.fisher import FISHER_TASKS
    from factorlm.decompose.methods import METHODS as DECOMPOSE_METHODS
    from factorlm.decompose.rank import STRATEGIES
    from factorlm.planning import ALL_METHODS, DATA_AWARE, SPARSE_STRUCTURES
    from factorlm.recovery.train import CLOCKS
    from factorlm.recovery.train import METHODS as RECOVERY_METHODS

    assert dict(DATA_AWARE) == dict(opts.DATA_AWARE_METHODS)
    assert quality.DATA_AWARE_METHODS is opts.DATA_AWARE_METHODS
    assert tuple(DECOMPOSE_METHODS) == opts.LOWRANK_METHODS
    assert set(ALL_METHODS) == set(opts.METHODS)
    assert set(opts.DATA_AWARE_METHODS) <= set(opts.LOWRANK_METHODS)
    assert tuple(STRATEGIES) == opts.ALLOCATIONS
    assert set(SPARSE_STRUCTURES) == set(opts.SPARSE_STRUCTURES)
    assert tuple(FISHER_TASKS) == opts.FISHER_TASKS
    assert tuple(RECOVERY_METHODS) == opts.RECOVER_METHODS and tuple(CLOCKS) == opts.CLOCKS
    assert set(BENCH_TASKS) == set(opts.TASKS) - {"auto", "none"}


def test_data_aware_methods_are_defined_once() -> None:
    """No module but options.py spells the data-aware family out (they import it)."""
    import pathlib
    import re

    import factorlm

    root = pathlib.Path(factorlm.__file__).parent
    pattern = re.compile(r"^\s*DATA_AWARE\w*\s*(:[^=]+)?=\s*[\[({]", re.MULTILINE)
    owners = sorted(
        str(p.relative_to(root)) for p in root.rglob("*.py") if pattern.search(p.read_text())
    )
    assert owners == ["options.py"], owners
    from factorlm.planning import DATA_AWARE

    assert DATA_AWARE is factorlm.options.DATA_AWARE_METHODS


# --- the CLI half: flags generated or written by hand must agree with the fields --------------


def _cli_commands() -> dict[str, Any]:
    typer_main = pytest.importorskip("typer.main")
    from factorlm.cli import app

    return dict(typer_main.get_command(app).commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_cli_flags_match_the_option_fields(cls: type[Any]) -> None:
    commands = _cli_commands()
    verb = VERBS[cls]
    if verb not in commands:
        pytest.skip(f"the CLI has no {verb} command yet")
    params = {p.name: p for p in commands[verb].params}
    for f in option_fields(cls):
        if not f.metadata.get("cli", True):
            continue
        assert f.name in params, f"factorlm {verb} has no flag for option {f.name!r}"
        param = params[f.name]
        flag = "--" + f.name.replace("_", "-")
        assert flag in param.opts, f"factorlm {verb}: option {f.name} is spelled {param.opts}"
        default, expected = param.default, _default(f)
        empty = (None, (), [])
        if not (default in empty and expected in empty):
            assert _norm(default) == _norm(expected), f"factorlm {verb} {flag} default"
        choices = f.metadata.get("choices")
        click_choices = getattr(getattr(param, "type", None), "choices", None)
        if choices is not None and click_choices is not None:
            assert tuple(click_choices) == tuple(choices), f"factorlm {verb} {flag} choices"
