"""The ``--arch.*`` options, derived from the model constructors of the registered families.

Every keyword-only constructor argument of every family (its own and those of its base classes)
becomes one optional field of :data:`ArchConfig`, typed from its annotation and documented by the
``Args:`` entry of the class docstring that declares it. ``None`` means "the family's own default
at the chosen ``--model-size``". A new constructor option therefore appears in ``--help`` with its
docstring without being listed anywhere else.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import tyro
from torch import nn

from ucfvit.models.registry import FamilySpec, model_arguments

__all__ = ["OptionInfo", "collect_options", "make_arch_config", "options_table"]

# Constructor arguments that are not user options: set by the family itself or implied by img_size.
INTERNAL = {"out_chans", "ndim"}


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One ``--arch`` option: its CLI type, help text and the families that take it."""

    name: str
    type: Any
    help: str
    families: tuple[str, ...]


def _docstring_args(cls: type) -> dict[str, str]:
    """``name -> text`` from the Google-style ``Args:`` section of ``cls``'s docstring
    (``a, b: text`` documents both; continuation lines are joined)."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)*)", doc, flags=re.M)
    if not match:
        return {}
    out: dict[str, str] = {}
    current: list[str] = []
    for line in match.group(1).splitlines():
        entry = re.match(r"^ {4}([\w*, ]+):\s*(.*)$", line)
        if entry:
            current = [n.strip() for n in entry.group(1).split(",") if n.strip().isidentifier()]
            for name in current:
                out[name] = entry.group(2).strip()
        elif line.strip() and current:
            for name in current:
                out[name] += " " + line.strip()
    return out


def _cli_type(annotation: Any) -> Any | None:
    """A tyro-friendly type for a constructor annotation, or None if it has no CLI form.

    Sequences become ``tuple[X, ...]`` (``int | Sequence[int]`` too); scalars and Literals stay.
    """
    members = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    members = tuple(m for m in members if m is not type(None))
    for member in members:
        if typing.get_origin(member) in (Sequence, list, tuple) or member in (Sequence, list, tuple):
            args = [a for a in typing.get_args(member) if a is not Ellipsis]
            return tuple[args[0] if args else str, ...]
    if len(members) == 1 and (members[0] in (int, float, bool, str) or typing.get_origin(members[0]) is Literal):
        return members[0]
    return None


def collect_options(families: Iterable[FamilySpec]) -> dict[str, OptionInfo]:
    """All constructor options of ``families`` in declaration order (base classes first)."""
    types_: dict[str, Any] = {}
    helps: dict[str, str] = {}
    users: dict[str, list[str]] = {}
    for spec in families:
        accepted = model_arguments(spec.model)
        for cls in reversed(spec.model.__mro__):
            if cls is nn.Module or "__init__" not in vars(cls) or not issubclass(cls, nn.Module):
                continue
            hints = typing.get_type_hints(cls.__init__)
            docs = _docstring_args(cls)
            for param in inspect.signature(cls.__init__).parameters.values():
                name = param.name
                if param.kind is not param.KEYWORD_ONLY or name in INTERNAL or name not in accepted:
                    continue
                cli = _cli_type(hints.get(name, Any))
                if cli is None:
                    continue
                types_.setdefault(name, cli)
                if docs.get(name) and name not in helps:
                    helps[name] = docs[name]
                if spec.name not in users.setdefault(name, []):
                    users[name].append(spec.name)
    return {name: OptionInfo(name, t, helps.get(name, ""), tuple(users[name])) for name, t in types_.items()}


def make_arch_config(options: Mapping[str, OptionInfo]) -> type:
    """A dataclass with one ``T | None = None`` field per option, documented for tyro."""
    everyone = set().union(*(o.families for o in options.values())) if options else set()
    fields = []
    for info in options.values():
        where = "all families" if set(info.families) == everyone else ", ".join(info.families)
        text = f"{info.help} [{where}]".strip() if info.help else f"[{where}]"
        fields.append(
            (info.name, Annotated[info.type | None, tyro.conf.arg(help=text)], dataclasses.field(default=None))
        )
    cls = dataclasses.make_dataclass("ArchConfig", fields)
    cls.__doc__ = "Model constructor options (None: the family's default at --model-size; [families that take it])."
    cls.__module__ = __name__
    return cls


def options_table(options: Mapping[str, OptionInfo]) -> str:
    """A Markdown table of the options: flag, type, where it applies, description (README's list)."""
    everyone = set().union(*(o.families for o in options.values())) if options else set()
    rows = ["| option | type | families | meaning |", "| --- | --- | --- | --- |"]
    for info in options.values():
        kind = getattr(info.type, "__name__", None) or str(info.type).replace("typing.", "")
        if typing.get_origin(info.type) is Literal:
            kind = " \\| ".join(f"`{a}`" for a in typing.get_args(info.type))
        elif typing.get_origin(info.type) is tuple:
            kind = f"{typing.get_args(info.type)[0].__name__}..."
        where = "all" if set(info.families) == everyone else ", ".join(info.families)
        rows.append(f"| `{info.name}` | {kind} | {where} | {info.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)
