"""Name → typed options + implementation, for solvers (``oac.solvers``) and Hessian sources (``oac.hessian``).

A registry finds its entries by convention: every module of its package that defines a module-level spec
(``SOLVER = SolverSpec(...)`` / ``SOURCE = HessianSpec(...)``) is an entry, so adding one is adding one
module (plus its YAML in ``configs/solver/`` or ``configs/hessian/``). Code outside the package (a test, a
user's plugin) calls :meth:`Registry.register` instead. No other module lists solver or source names.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from typing import Any, Generic, TypeVar

from oac.errors import ConfigError

S = TypeVar("S")


class Registry(Generic[S]):
    def __init__(self, package: str, attr: str, what: str):
        self.package, self.attr, self.what = package, attr, what
        self._entries: dict[str, S] = {}
        self._scanned = False

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
            mod = importlib.import_module(f"{self.package}.{info.name}")
            spec = getattr(mod, self.attr, None)
            if spec is not None and spec.name not in self._entries:
                self._entries[spec.name] = spec

    def register(self, spec: S, *, replace: bool = False) -> S:
        """Add an entry from outside the package (tests, plugins). Returns the spec."""
        self._scan()
        if spec.name in self._entries and not replace:
            raise ValueError(f"{self.what} {spec.name!r} is already registered")
        self._entries[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> S:
        self._scan()
        if name not in self._entries:
            raise ConfigError(f"unknown {self.what} {name!r}; known: {self.names()}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._scan()
        return list(self._entries)

    def specs(self) -> list[S]:
        self._scan()
        return list(self._entries.values())


def build_options(cls, params: dict[str, Any] | None, where: str):
    """The typed options dataclass ``cls`` from a config mapping: unknown keys are one-line errors, and the
    dataclass's own ``__post_init__`` checks the ranges. ``"inf"`` strings become floats (YAML has no inf)."""
    if cls is None:
        if params:
            raise ConfigError(f"{where} takes no options, got {sorted(params)}")
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params or {}) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {unknown}; valid: {sorted(fields)}")
    kwargs = {k: (float(v) if v in ("inf", "Infinity") else v) for k, v in (params or {}).items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- option checks (one line each)


def check_choice(where: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}.{name} must be one of {list(allowed)}, got {value!r}")


def check_int(where: str, name: str, value, lo: int | None = None, hi: int | None = None, *,
              allow: tuple = ()) -> None:
    if value in allow and not isinstance(value, bool):
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (lo is None or value >= lo) and (
        hi is None or value <= hi)
    if not ok:
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        extra = f" (or {', '.join(map(repr, allow))})" if allow else ""
        raise ConfigError(f"{where}.{name} must be an integer {rng}{extra}, got {value!r}")


def check_float(where: str, name: str, value, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False) -> None:
    try:
        v = float(value)
        bad = isinstance(value, bool) or math.isnan(v) or (math.isinf(v) and not allow_inf)
    except (TypeError, ValueError):
        bad = True
    if not bad:
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{right}"
        raise ConfigError(f"{where}.{name} must be a number in {rng}, got {value!r}")
