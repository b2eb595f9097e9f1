"""The rule of every config field (type, range, help), checked the same way for YAML keys, CLI
flags and ``TrainConfig(...)`` in code.

A field of :class:`~.config.TrainConfig` is declared with :func:`knob`, which stores its help
text and its :class:`Rule` in the dataclass field's ``metadata``; the field's annotation gives
its type (``int``, ``float``, ``str``, ``bool``, ``dict``, each optionally ``| None``). So the
dataclass *is* the field table: a new field is one line, ``name: int = knob(4, "help", ge=1)``.

Type rules (no silent conversion): an ``int`` field takes an integer (not ``2.5``, not ``true``,
not the string ``"3"``); a ``float`` field takes an integer or a float and must be finite (never
NaN or inf); a ``bool`` field takes ``true``/``false`` only (the string ``"true"`` is an
error); a ``str`` field takes a string; ``None`` only where the annotation says ``| None``.
A violation is a :class:`ConfigError` (a ``ValueError``) naming where the value came from
(``--flag``, or ``FILE:LINE: key``), the rule and the value; ``steppo`` prints it as one line
and exits with status 2 (a usage error).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml


class ConfigError(ValueError):
    """A config value (flag, YAML key or constructor argument) that breaks its field's rule."""


def _num(x) -> str:
    """A bound as written: ``4294967296`` (not ``4.29497e+09``), ``0.5``."""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy beyond its type.

    ``ge`` / ``gt`` / ``le`` / ``lt``: bounds of a number; ``choices``: the allowed strings (a
    tuple, or a function returning them, for registries filled at run time); ``check``: a
    predicate for anything else, described by ``text``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | Callable[[], typing.Iterable[str]] | None = None
    check: Callable[[object], bool] | None = None
    text: str = ""

    def allowed(self) -> tuple | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def describe(self) -> str:
        """The rule in words, e.g. ``>= 1``, ``in [0, 1]``, ``one of a, b``."""
        parts = []
        if self.ge is not None and self.le is not None:
            parts.append(f"in [{_num(self.ge)}, {_num(self.le)}]")
        elif self.ge is not None and self.lt is not None:
            parts.append(f"in [{_num(self.ge)}, {_num(self.lt)})")
        else:
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
                if bound is not None:
                    parts.append(f"{op} {_num(bound)}")
        if self.choices is not None:
            parts.append("one of " + ", ".join(self.allowed()))
        if self.text:
            parts.append(self.text)
        return " and ".join(parts)

    def violated(self, value) -> bool:
        if self.ge is not None and not value >= self.ge:
            return True
        if self.gt is not None and not value > self.gt:
            return True
        if self.le is not None and not value <= self.le:
            return True
        if self.lt is not None and not value < self.lt:
            return True
        if self.choices is not None and value not in self.allowed():
            return True
        return self.check is not None and not self.check(value)


def knob(default, help: str, **rule):
    """A dataclass field with its help text and :class:`Rule` (keyword arguments of ``Rule``).
    A ``dict`` or ``list`` default becomes a ``default_factory`` (a fresh copy per config)."""
    meta = {"help": help, "rule": Rule(**rule)}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_type(cls, name: str) -> tuple[type, bool]:
    """``(python type, optional?)`` of field ``name`` of dataclass ``cls`` (annotations may be
    strings: resolved with ``typing.get_type_hints``)."""
    tp = _hints(cls)[name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return typing.get_origin(tp) or tp, False


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata.get("rule", Rule())


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _shown(value) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return f"{value!r} ({type(value).__name__})"


def check_value(cls, name: str, value, where: str):
    """``value`` checked against field ``name`` of ``cls``, returned as stored (an integer
    given to a float field becomes a float). ``where`` prefixes the error (``--lr``,
    ``run.yaml:3: lr``). Raises :class:`ConfigError`."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kind, optional = field_type(cls, name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: expected {_KIND_NAMES.get(kind, kind.__name__)}, got null")
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"{where}: {value} is too large for a float") from None
            if not math.isfinite(value):
                raise ConfigError(f"{where}: must be finite, got {value}")
    elif kind is dict:
        ok = isinstance(value, dict)
        if ok:
            try:
                yaml.safe_dump(value)
            except yaml.YAMLError:
                raise ConfigError(
                    f"{where}: must hold plain values (numbers, strings, lists, mappings)"
                ) from None
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = _KIND_NAMES.get(kind, f"a {kind.__name__}")
        raise ConfigError(f"{where}: expected {expected}, got {_shown(value)}")
    rule = rule_of(f)
    if rule.violated(value):
        raise ConfigError(f"{where}: must be {rule.describe()}, got {_shown(value)}")
    return value


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_fields(cls, values: dict, where: Callable[[str], str] = flag_of) -> dict:
    """Every ``name: value`` of ``values`` checked (:func:`check_value`); unknown names are a
    :class:`ConfigError` naming them. Returns the values as stored."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(
            f"{where(str(unknown[0]))}: unknown key (not a field of {cls.__name__}; see "
            "steppo train --help)"
        )
    return {k: check_value(cls, k, v, where(k)) for k, v in values.items()}


# ---------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` is a float (YAML 1.1, and so plain
    PyYAML, needs a dot, ``1.0e-3``, and reads ``1e-3`` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml_mapping(path: str) -> tuple[dict, dict[str, int]]:
    """The top-level mapping of a YAML file and the line (1-based) of each key.

    Malformed YAML, a top-level value that is not a mapping, a non-string key and a key given
    twice (plain PyYAML keeps the last silently) are :class:`ConfigError` naming the file and
    line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(
                f"{path}:{node.start_mark.line + 1}: must hold a mapping of field: value"
            )
        lines: dict[str, int] = {}
        for key, _ in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode):
                raise ConfigError(f"{path}:{line}: a key must be a field name")
            if key.value in lines:
                raise ConfigError(
                    f"{path}:{line}: {key.value}: given twice (first on line {lines[key.value]})"
                )
            lines[key.value] = line
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = (e.problem or e.context or "invalid YAML").strip()
        raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    finally:
        loader.dispose()
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: key {bad[0]!r} is not a field name")
    return data, lines
