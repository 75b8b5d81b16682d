"""One grammar and one registry helper for every component: losses, annotators, reweighting strategies,
pairings and advantage estimators.

Grammar, parsed by one function (`Registry.parse`):

    NAME[:ARG][,key=value...]

    --loss dpo,beta=0.1                 --annotator reward-model:runs/rm,max_length=512,weight=2
    --strategy margin,temperature=2     --strategy margin:2 (ARG = the strategy's first hyperparameter)
    --strategy function:mypkg.w:fn      --annotator regex:\\bsorry\\b,count=true
    --pairs margin:0.5                  --pairing best-worst

Every hyperparameter declares its range next to its default (`ranges={"beta": ">0"}` in the row, or
`Param(range=...)`; syntax: alignpipe.core.ranges): a value outside it is a one-line UserError naming the
component, the key, the value and the range, raised while parsing, before any model is loaded.

ARG is the text after the first ':' up to the first ','; it fills the component's `arg` parameter. For a
component with a free ARG (a regular expression, a `module:function`), a ',' segment that is not a known
`key=value` is part of the ARG. `NAME:key=value` with a known key reads as `NAME,key=value`.

A component's hyperparameters are the keyword-only parameters of its function, with their defaults (a
parameter without one must be given); their one-line docs come from the table row (`docs=`), or the row
declares `Param`s itself when the function is imported lazily (annotators). The table feeds parsing,
validation (a one-line UserError naming the component, the key and the known keys), `--help`, the docs
(`python -m alignpipe.components > docs/components.md`) and the parametrised tests. Adding a component is one
function plus one `REGISTRY.add(...)` row; no stage module changes.
"""
from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from alignpipe.core.errors import UserError
from alignpipe.core.ranges import parse_range

REQUIRED = inspect.Parameter.empty
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its default (REQUIRED: must be given), type, one-line doc and range."""

    default: object = REQUIRED
    kind: type = str  # str | int | float | bool
    doc: str = ""
    nullable: bool = False  # None is a valid value (an optional bound, ...)
    range: str = ""  # alignpipe.core.ranges syntax: >0, [0,1), any, a|b ... ("" : none declared)

    def show(self) -> str:
        if self.default is REQUIRED:
            return "..."
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)


def _kind(annotation) -> tuple[type, bool]:
    """(type, nullable) of a parameter annotation (a string under `from __future__ import annotations`)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [p.strip() for p in text.replace("Optional[", "").rstrip("]").split("|")]
    names = {"float": float, "int": int, "bool": bool, "str": str}
    kind = next((names[p] for p in parts if p in names), str)
    return kind, "None" in parts


def signature_params(fn: Callable, docs: dict | None = None) -> dict[str, Param]:
    """The keyword-only parameters of `fn` as Params (defaults and types from the signature)."""
    docs = docs or {}
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind is p.KEYWORD_ONLY:
            kind, nullable = _kind(p.annotation)
            out[name] = Param(p.default, kind, docs.get(name, ""), nullable or p.default is None)
    unknown = set(docs) - set(out)
    if unknown:
        raise ValueError(f"{getattr(fn, '__name__', fn)}: docs for unknown parameter(s) {sorted(unknown)}")
    return out


_ABBREVIATIONS = ("al", "Dr", "eq", "eqs", "Eq", "e.g", "i.e", "cf", "vs", "Fig", "No", "v")


def first_sentence(doc: str) -> str:
    """A docstring's first sentence, whole (over as many lines as it takes), for `--help` and the docs: its
    first paragraph up to a '.' that ends a sentence (not that of "et al." or "Dr.")."""
    text = " ".join((doc.strip().split("\n\n") or [""])[0].split())
    for m in re.finditer(r"\.\s+(?=[A-Z])", text):
        word = text[:m.start()].rsplit(" ", 1)[-1].lstrip("(")
        if word not in _ABBREVIATIONS:
            return text[:m.start() + 1]
    return text


@dataclass(frozen=True)
class Component:
    """A registered component: its function, doc line, hyperparameters, ARG and table fields (`meta`,
    readable as attributes: LOSSES['dpo'].task)."""

    name: str
    fn: Callable | None
    doc: str
    params: dict[str, Param]
    arg: str | None = None  # the parameter the ARG fills
    metavar: str | None = None  # the ARG as shown in help
    free_arg: bool = False
    meta: dict = field(default_factory=dict)

    def __getattr__(self, key: str):
        if key.startswith("__") or key == "meta":
            raise AttributeError(key)
        try:
            return self.meta[key]
        except KeyError:
            raise AttributeError(f"component {self.name!r} has no field {key!r}") from None


@dataclass(frozen=True)
class Spec:
    """A parsed NAME[:ARG][,key=value...]: the component and the parameters given (converted)."""

    component: Component
    given: dict
    text: str
    registry: Registry = field(repr=False, compare=False)
    flag: str = ""  # the command-line flag it came from, for error messages

    @property
    def where(self) -> str:
        return f"{self.flag} '{self.text}'"

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def values(self) -> dict:
        """Every parameter (the component's and the registry's common ones): given, else its default."""
        params = {**self.component.params, **self.registry.common}
        return {k: self.given.get(k, p.default) for k, p in params.items()}

    @property
    def kwargs(self) -> dict:
        """The component's own hyperparameters (common ones left out), to call its function with."""
        return {k: v for k, v in self.values.items() if k in self.component.params}

    @property
    def arg(self):
        return self.given.get(self.component.arg) if self.component.arg else None

    @property
    def options(self) -> dict:
        """The component's hyperparameters other than its ARG."""
        return {k: v for k, v in self.kwargs.items() if k != self.component.arg}

    def identity(self) -> str:
        """Canonical text: name, ARG, and the component's parameters that differ from their defaults, sorted
        (the registry's common ones, e.g. an annotator's weight, are not part of its identity)."""
        params = self.component.params
        extra = sorted((k, v) for k, v in self.given.items()
                       if k != self.component.arg and k in params and v != params[k].default)
        head = self.name + (f":{_show(self.arg)}" if self.component.arg and self.arg is not None else "")
        return ",".join([head] + [f"{k}={_show(v)}" for k, v in extra])

    def __str__(self) -> str:
        """Canonical text with every hyperparameter, defaults included (for reports)."""
        return ",".join([self.name] + [f"{k}={_show(v)}" for k, v in self.kwargs.items()])


def _show(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def convert(raw: str, param: Param, where: str):
    """The text of a value as the parameter's type; one-line UserError naming `where`."""
    raw = raw.strip()
    if param.nullable and raw.lower() in ("none", "null", ""):
        return None
    if param.kind is bool:
        if raw.lower() in _TRUE + _FALSE:
            return raw.lower() in _TRUE
        raise UserError(f"{where}: expected true or false, found '{raw}'")
    try:
        value = param.kind(raw)
    except ValueError:
        raise UserError(f"{where}: expected {'an integer' if param.kind is int else 'a number'}, found '{raw}'")
    if param.kind is float and not math.isfinite(value):
        raise UserError(f"{where}: expected a finite number, found '{raw}'")
    return value


def _check_range(value, param: Param, where: str, key: str) -> None:
    """One-line UserError when `value` is outside the parameter's declared range (None passes when nullable)."""
    if value is None or not param.range:
        return
    r = parse_range(param.range)
    if not r.contains(value):
        what = f"one of {param.range.replace('|', ', ')}" if r.choices else f"in the range {param.range}"
        raise UserError(f"{where}: {key}={_show(value)} is outside its range: must be {what}")


def load_function(target: str, where: str) -> Callable:
    """The user function `pkg.module:fn` a component names explicitly (never discovered; the current
    directory is importable); one-line UserErrors starting with `where`."""
    import importlib
    import sys
    from pathlib import Path

    module, colon, attr = target.partition(":")
    if not colon or not module or not attr:
        raise UserError(f"{where}: '{target}' is not of the form pkg.module:fn")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, "")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{where}: cannot import module '{module}' ({type(e).__name__}: {e})")
    if not hasattr(mod, attr):
        raise UserError(f"{where}: cannot load '{target}': module '{module}' has no '{attr}'")
    fn = getattr(mod, attr)
    if not callable(fn):
        raise UserError(f"{where}: '{target}' is not callable")
    return fn


REGISTRIES: dict[str, Registry] = {}  # kind -> registry, in the order they were created


class Registry(Mapping):
    """A table of components of one kind (name -> Component), with the grammar's parser."""

    def __init__(self, kind: str, flag: str, *, common: dict[str, Param] | None = None,
                 validate: Callable[[Spec], None] | None = None, doc: str = ""):
        self.kind, self.flag, self.common, self.doc = kind, flag, dict(common or {}), doc
        self.validate = validate
        self._items: dict[str, Component] = {}
        REGISTRIES[kind] = self

    # -- the table
    def add(self, name: str, fn: Callable | None = None, *, doc: str | None = None,
            params: dict[str, Param] | None = None, docs: dict | None = None, arg: str | None = None,
            metavar: str | None = None, free_arg: bool = False, ranges: dict[str, str] | None = None,
            **meta) -> Component:
        """Register one component (a table row). Hyperparameters: `params`, else fn's keyword-only ones;
        `ranges` sets their ranges (alignpipe.core.ranges)."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        params = dict(params) if params is not None else signature_params(fn, docs)
        for key, text in (ranges or {}).items():
            if key not in params:
                raise ValueError(f"{self.kind} {name!r}: range for unknown parameter {key!r}")
            parse_range(text)
            params[key] = replace(params[key], range=text)
        if arg is not None and arg not in params:
            raise ValueError(f"{self.kind} {name!r}: ARG parameter {arg!r} is not a parameter")
        line = doc if doc is not None else first_sentence(fn.__doc__ or "")
        component = Component(name, fn, line, params, arg, metavar or (arg.upper() if arg else None), free_arg,
                              meta)
        self._items[name] = component
        return component

    def remove(self, name: str) -> None:
        """Drop a row (tests that register a component at runtime clean up with it)."""
        del self._items[name]

    def __getitem__(self, name: str) -> Component:
        return self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def get_or_fail(self, name: str, where: str = "") -> Component:
        if name not in self._items:
            raise UserError(f"{where or self.flag} '{name}': unknown {self.kind} (known: {', '.join(self)})")
        return self._items[name]

    # -- the grammar
    def parse(self, text: str, *, flag: str | None = None, **extra) -> Spec:
        """`NAME[:ARG][,key=value...]` -> Spec, with `extra` given values (shorthand flags such as --beta);
        errors name `flag` (default: the registry's)."""
        flag = flag or self.flag
        where = f"{flag} '{text}'"
        head, _, rest = text.strip().partition(",")
        name, colon, arg = head.partition(":")
        name = name.strip()
        if name not in self._items:
            raise UserError(f"{where}: unknown {self.kind} '{name}' (known: {', '.join(self)})")
        c = self._items[name]
        known = {**c.params, **self.common}
        segments = rest.split(",") if rest else []
        if colon and not c.free_arg and arg.partition("=")[0].strip().isidentifier() and "=" in arg:
            segments, colon = [arg] + segments, ""  # NAME:key=value reads as NAME,key=value
        given, arg_parts = {}, [arg] if colon else []
        for seg in segments:
            key, eq, value = (s.strip() for s in seg.partition("="))
            if eq and key in known:
                if key in given:
                    raise UserError(f"{where}: parameter '{key}' given twice")
                given[key] = convert(value, known[key], f"{where}: {key}")
            elif c.free_arg and arg_parts:
                arg_parts.append(seg)
            else:
                raise UserError(f"{where}: {self.kind} '{name}' has no parameter '{key}' (known: "
                                f"{', '.join(known) or 'none'})")
        for key, value in extra.items():
            if value is None:
                continue
            if key not in known:
                raise UserError(f"--{key.replace('_', '-')}: {self.kind} '{name}' has no parameter '{key}' "
                                f"(known: {', '.join(known) or 'none'})")
            if key in given:
                raise UserError(f"--{key.replace('_', '-')} and '{key}=' in {where}: give one of them")
            given[key] = value
        if arg_parts:
            if c.arg is None:
                raise UserError(f"{where}: {self.kind} '{name}' takes no ':ARG' ({self.usage(name)})")
            if c.arg in given:
                raise UserError(f"{where}: parameter '{c.arg}' given twice (as ARG and as {c.arg}=)")
            given[c.arg] = convert(",".join(arg_parts), c.params[c.arg], f"{where}: {c.arg}")
        missing = [k for k, p in c.params.items() if p.default is REQUIRED and k not in given]
        if missing:
            raise UserError(f"{where}: {self.kind} '{name}' needs {', '.join(missing)} ({self.usage(name)})")
        for key, value in given.items():
            _check_range(value, known[key], f"{where}: {self.kind} '{name}'", key)
        spec = Spec(c, given, text, self, flag)
        if self.validate is not None:
            self.validate(spec)
        return spec

    # -- help and docs
    def usage(self, name: str) -> str:
        """`name[:ARG][,k=default...]`."""
        c = self._items[name]
        head = name + (f":{c.metavar}" if c.arg else "")
        return ",".join([head] + [f"{k}={p.show()}" for k, p in c.params.items() if k != c.arg])

    def help_text(self, describe: Callable[[Component], str] | None = None) -> str:
        """One line per component, for `--help`: usage (extra): doc."""
        lines = []
        for name, c in self._items.items():
            extra = describe(c) if describe else ""
            lines.append(f"{self.usage(name)}{f' ({extra})' if extra else ''}: {c.doc}")
        return "\n".join(lines)

    def markdown(self) -> str:
        out = [f"## {self.kind.capitalize()} (`{self.flag}`)", ""]
        if self.doc:
            out += [self.doc, ""]
        if self.common:
            out += ["Every one also takes: " + "; ".join(f"`{k}={p.show()}` {p.doc}" for k, p in self.common.items()),
                    ""]
        if not self._items:
            out += ["(none registered yet)", ""]
        for name, c in self._items.items():
            out += [f"### `{name}`", "", f"`{self.usage(name)}` — {c.doc}", ""]
            for k, p in c.params.items():
                role = " (the ARG)" if k == c.arg else ""
                bound = f", range `{p.range}`" if p.range and p.range != "any" else ""
                out.append(f"- `{k}`{role}: {p.kind.__name__}, default `{p.show()}`{bound}. {p.doc}".rstrip())
            out.append("")
        return "\n".join(out)


# advantage estimators: alignpipe.batches.advantages adds its rows (ESTIMATORS.add(name, fn, docs=...)).
ESTIMATORS = Registry("advantage estimator", "--advantage",
                      doc="Per-sample advantages from the rewards of a prompt's group of samples.")
