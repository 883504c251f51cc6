"""Command-line options generated from typed config dataclasses (litgpt's approach), so that a config field and its
flag cannot drift apart: one option per field, its type, default and help taken from the dataclass (the docstring
under each field), its choices from the registries the command passes in.

An `Options` says which dataclass a command exposes, under which flag names, and which fields it leaves out (each
with the reason). With `override=True` every default is None: a flag that is given replaces the value of a YAML
config (or of the dataclass's default), one that is not leaves it alone.

Run:  python -c "from pipelines.options import field_docs; from pipelines.train import TrainConfig; \
print(field_docs(TrainConfig))"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = dataclasses.MISSING


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring written under it}, read from the class's source (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen install): no help text, the option still works
            continue
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclasses.dataclass(frozen=True)
class Options:
    """How the fields of one config dataclass become the options of a command."""

    cls: type
    flags: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Field -> its flags, where they are not the one `--field-name`."""
    skip: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field -> why the command has no flag for it (a nested section: set it in the YAML; not for this command)."""
    choices: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    """Field -> the values it may take (from a registry: pipelines.methods.CHOICES, pipelines.lm.SCHEMES, ...)."""
    helps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Field -> help text, where the field has no docstring or the flag needs other words."""
    override: bool = False
    """Every default None: a given flag replaces the YAML's (or the dataclass's) value, a missing one keeps it."""
    dest_prefix: str = ""
    """Prefix of the argparse destinations, so that two configs of one command may both have a `device`."""
    title: str | None = None
    """Heading of the options in --help (default: the dataclass's name)."""

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self.cls)}
        for what, mapping in (("flags", self.flags), ("skip", self.skip), ("choices", self.choices),
                              ("helps", self.helps)):
            unknown = sorted(set(mapping) - names)
            if unknown:
                raise TypeError(f"Options({self.cls.__name__}).{what} names no field: {', '.join(unknown)}")

    def fields(self) -> list[dataclasses.Field]:
        """The fields that have flags: every field but the skipped ones."""
        return [f for f in dataclasses.fields(self.cls) if f.name not in self.skip]

    def flags_of(self, name: str) -> tuple[str, ...]:
        return self.flags.get(name) or ("--" + name.replace("_", "-"),)

    def dest(self, name: str) -> str:
        return self.dest_prefix + name

    def option_strings(self) -> dict[str, str]:
        """{flag: field} for every flag these options add."""
        return {flag: f.name for f in self.fields() for flag in self.flags_of(f.name)}

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(self.title or f"{self.cls.__name__} (one option per field)")
        for f in self.fields():
            group.add_argument(*self.flags_of(f.name), **self._argument(f))

    def _argument(self, f: dataclasses.Field) -> dict[str, Any]:
        """add_argument's keywords for field `f`: from its type, default, docstring and choices."""
        tp, _ = _unwrap_optional(typing.get_type_hints(self.cls)[f.name])
        default = None if self.override else _default(f)
        metavar = self.flags_of(f.name)[0].lstrip("-").replace("-", "_").upper()
        kwargs: dict[str, Any] = {"dest": self.dest(f.name), "default": default, "metavar": metavar}
        help_text = self.helps.get(f.name) or field_docs(self.cls).get(f.name, "")
        if tp is bool:
            del kwargs["metavar"]
            kwargs["action"] = argparse.BooleanOptionalAction if self.override or default is True else "store_true"
        elif typing.get_origin(tp) is list:
            kwargs.update(action="append", default=None if self.override else list(default or ()))
            help_text += " (repeatable)"
        elif typing.get_origin(tp) is tuple:
            kwargs.update(type=str, metavar="A,B,...")
            help_text += " (comma-separated)"
        elif tp in (int, float, str, Path):
            kwargs["type"] = tp
        else:
            raise TypeError(f"{self.cls.__name__}.{f.name}: no command-line form for type {tp!r}; skip it "
                            "(Options.skip) with the reason")
        if f.name in self.choices:
            kwargs["choices"] = tuple(self.choices[f.name])
            kwargs.pop("metavar", None)
        if default is MISSING:  # a field without a default: the flag is required
            del kwargs["default"]
            kwargs["required"] = True
        elif "default" not in help_text.lower() and kwargs.get("action") != "store_true":
            shown = _default(f)
            shown = ",".join(shown) if isinstance(shown, tuple) else "none" if shown in (None, "", []) else shown
            prefix = "the config's, else " if self.override else ""
            help_text += f" [default: {prefix}{shown}]"
        kwargs["help"] = help_text.strip().replace("%", "%%")
        return kwargs

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """{field: value} of the flags that are set (override: the ones given), as the field's type wants them."""
        hints = typing.get_type_hints(self.cls)
        out = {}
        for f in self.fields():
            value = getattr(args, self.dest(f.name), None)
            if value is None and self.override:
                continue
            tp, _ = _unwrap_optional(hints[f.name])
            if typing.get_origin(tp) is tuple and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(","))
            out[f.name] = value
        return out

    def build(self, args: argparse.Namespace, base: Any = None) -> Any:
        """The config: `base` (a YAML's, or the dataclass's defaults) with the given flags applied; its
        __post_init__ validates the result (ValueError with the field named)."""
        values = self.given(args)
        if base is None:
            return self.cls(**values)
        return dataclasses.replace(base, **values)
