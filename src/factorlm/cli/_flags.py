"""CLI flags generated from the option classes of :mod:`factorlm.options`.

Why: a flag's name, default, help and choices come from the same field as the YAML key and the
API keyword, so they cannot drift (``--<field-with-dashes>``; booleans ``--x/--no-x``; tuples
repeatable or comma-separated; Literal fields list their choices in ``--help``). A verb declares
``options: CompressOptions`` and receives the validated, frozen object.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

import typer

from factorlm.errors import ConfigError
from factorlm.options import option_fields

__all__ = ["OPTIONAL_VALUES", "fill_optional_values", "flag_name", "split_list", "with_options"]

F = TypeVar("F", bound=Callable[..., Any])


#: Flags whose value may be left out (``--ray`` or ``--ray ADDRESS``) -> the value it then takes.
OPTIONAL_VALUES: dict[str, str] = {}


def fill_optional_values(argv: Sequence[str]) -> list[str]:
    """Give a bare optional-value flag its implied value (typer has no optional values).

    ``--ray`` at the end or before another option becomes ``--ray auto``; ``--ray ADDR`` and
    ``--ray=ADDR`` are left as they are.
    """
    args = list(argv)
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        implied = OPTIONAL_VALUES.get(arg)
        if implied is not None and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(implied)
    return out


def flag_name(field_name: str) -> str:
    """``calibration_samples`` -> ``--calibration-samples``."""
    return "--" + field_name.replace("_", "-")


def split_list(values: Sequence[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list: ``-x a,b -x c`` -> ``[a, b, c]``."""
    return [
        part.strip() for value in values or () for part in str(value).split(",") if part.strip()
    ]


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _range_text(meta: Mapping[str, Any]) -> str:
    low = f"> {meta['gt']}" if "gt" in meta else f">= {meta['ge']}" if "ge" in meta else ""
    high = f"< {meta['lt']}" if "lt" in meta else f"<= {meta['le']}" if "le" in meta else ""
    return " and ".join(p for p in (low, high) if p)


@dataclasses.dataclass(frozen=True)
class _Flag:
    """How one option field appears on the command line and how its value is converted back."""

    field: str
    parameter: inspect.Parameter
    convert: Callable[[Any], Any]


def _flag(
    f: dataclasses.Field[Any], tp: Any, short: Sequence[str], help_extra: str, split: bool
) -> _Flag:
    meta = f.metadata
    base, optional = _strip_optional(tp)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:  # pragma: no cover - every option has a default
        default = ...
    text = meta.get("help", "")
    rng = _range_text(meta)
    if rng:
        text += f" Range: {rng}."
    text += help_extra
    name = flag_name(f.name)
    convert: Callable[[Any], Any] = lambda value: value  # noqa: E731
    origin = typing.get_origin(base)
    if base is bool:
        decls = [f"{name}/--no-{f.name.replace('_', '-')}", *short]
        annotation: Any = bool
    elif origin is tuple:
        decls = [name, *short]
        annotation = list[str]
        default = list(default) if default else []
        text += " Repeat or comma-separate." if split else " Repeatable."

        def convert(value: Any, _optional: bool = optional) -> Any:
            items = tuple(split_list(value) if split else (v for v in value or () if v))
            return None if _optional and not items else items

    elif origin is Literal:
        decls = [name, *short]
        annotation = base | None if optional else base
    else:
        decls = [name, *short]
        annotation = base | None if optional else base
        if optional and base is int and default is not None:
            text += " 0: unset."

            def convert(value: Any) -> Any:
                return None if value == 0 else value

    if "flag_value" in meta:  # ``--ray`` alone means its flag value, ``--ray ADDR`` the address
        text += f" Given without a value: {meta['flag_value']!r}."
        for decl in decls:
            OPTIONAL_VALUES[decl] = str(meta["flag_value"])
    option = typer.Option(default, *decls, help=text, show_default=True)
    parameter = inspect.Parameter(
        f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )
    return _Flag(f.name, parameter, convert)


def with_options(
    cls: type[Any],
    *,
    skip: Sequence[str] = (),
    short: Mapping[str, Sequence[str]] | None = None,
    hidden_aliases: Mapping[str, tuple[str, Callable[[Any], Any]]] | None = None,
    help_extra: Mapping[str, str] | None = None,
    no_split: Sequence[str] = (),
    parsers: Mapping[str, tuple[Any, Callable[[Any], Any]]] | None = None,
    param: str = "options",
) -> Callable[[F], F]:
    """Replace a command's ``options`` parameter by one flag per field of ``cls``.

    ``hidden_aliases`` maps a field to an old flag (hidden from ``--help``) and a converter of
    its value; ``skip`` leaves fields to the command (or to their defaults); ``no_split`` names
    tuple fields whose values may hold commas themselves (repeat the flag instead); ``parsers``
    maps a field to the annotation its flag takes and a converter to the field's value.
    """
    short = short or {}
    aliases = hidden_aliases or {}
    extra_help = help_extra or {}
    hints = typing.get_type_hints(cls)
    custom = parsers or {}
    for name, (annotation, _) in custom.items():
        hints[name] = annotation
    flags = [
        _flag(
            f,
            hints[f.name],
            short.get(f.name, ()),
            extra_help.get(f.name, ""),
            f.name not in no_split,
        )
        for f in option_fields(cls)
        if f.metadata.get("cli", True) and f.name not in skip
    ]
    alias_params = [
        inspect.Parameter(
            f"_alias_{field}",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, decl, hidden=True),
            annotation=str | None,
        )
        for field, (decl, _) in aliases.items()
    ]

    def decorator(func: F) -> F:
        signature = inspect.signature(func)
        kept = [p for p in signature.parameters.values() if p.name != param]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, Any] = {}
            for flag in flags:
                value = flag.convert(kwargs.pop(flag.field))
                if flag.field in custom and value is not None:
                    value = custom[flag.field][1](value)
                values[flag.field] = value
            for field, (decl, convert) in aliases.items():
                raw = kwargs.pop(f"_alias_{field}")
                if raw is None:
                    continue
                if field in values and values[field] != _default(cls, field):
                    raise ConfigError(
                        f"{decl} is the old name of {flag_name(field)}; pass only one of them."
                    )
                values[field] = convert(raw)
            names = {f.name for f in dataclasses.fields(cls)}
            # speak in flags ("--ratio is 1.5; it must be < 1.0."), also for the checks the API
            # makes later ("compress option 'loss_aware' needs the PyTorch weights ...")
            try:
                kwargs[param] = cls(**values)
                return func(*args, **kwargs)
            except ConfigError as exc:
                message = _flag_language(str(exc), names)
                if message == str(exc):
                    raise
                raise ConfigError(message) from None

        new = [*kept, *(f.parameter for f in flags), *alias_params]
        wrapper.__signature__ = signature.replace(parameters=new)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


_OPTION_NAME = re.compile(r"^\w+ option '(\w+)'")


def _flag_language(message: str, names: Collection[str]) -> str:
    """``compress option 'min_fraction' is 1.5; ...`` -> ``--min-fraction is 1.5; ...`` for an
    option of ``names`` (the verb's own flags); other messages are left as they are."""
    return _OPTION_NAME.sub(
        lambda m: flag_name(m.group(1)) if m.group(1) in names else m.group(0), message
    )


def _default(cls: type[Any], name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None
