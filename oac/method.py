"""A method is a solver fed by a Hessian source — literally.

The ``method`` node of a job config (composed from ``configs/solver/<s>.yaml`` and ``configs/hessian/<h>.yaml``;
``configs/method/<name>.yaml`` is only a preset naming the pair) holds:

* ``name``: the label (``gptq``, ``oac_gptq``, ...), ``solver`` and ``hessian`` (registry names; ``hessian:
  null`` = no Hessian);
* the solver's settings (``wbits``, ``groupsize``, ...: its typed config, ``oac.solvers``);
* the source's options under its ``options_key`` (``oac:`` for the output-adaptive source, ``guided:`` for the
  grouped Fisher of ``oac.hessian.guided``);
* ``true_sequential`` (a block-loop option) and ``backbone`` (the method a variant is paired with).

:func:`resolve` turns that node into a :class:`Method` — every option typed and range-checked, every
combination checked — without touching a model, so a bad option fails in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from oac import hessian, solvers
from oac.errors import ConfigError

# method-config keys that belong to neither the solver's nor the source's options
LOOP_KEYS = ("name", "solver", "hessian", "backbone", "true_sequential")


def source_keys() -> set[str]:
    """Keys that name or configure the Hessian source: an OAC-X job and its X backbone differ only here."""
    return {"name", "hessian", "backbone", "true_sequential"} | hessian.option_keys()


@dataclass
class Method:
    name: str
    solver: solvers.SolverSpec | None
    solver_config: Any
    source: hessian.HessianSpec
    source_options: Any
    true_sequential: bool = False

    @property
    def quantizes(self) -> bool:
        return self.solver is not None

    @property
    def calibrated(self) -> bool:
        return self.source.calibrated

    def build_source(self):
        return self.source.build(self.source_options)

    @property
    def row_groups(self) -> int:
        """Row-group Hessians per linear the source feeds (1: one [d_in, d_in] H)."""
        return self.source.groups(self.source_options)

    def check_shape(self, d_out: int, d_in: int) -> None:
        """What the solver cannot do on a d_out×d_in layer, and, with G row groups, on each d_out/G × d_in slice."""
        if self.solver is None:
            return
        G = self.row_groups
        if G > 1 and d_out % G:
            raise ConfigError(f"method.{self.source.options_key}.groups={G} does not divide d_out={d_out} "
                              f"(the rows are split into {G} contiguous groups of d_out/{G})")
        if self.solver.check_shape is not None:
            self.solver.check_shape(self.solver_config, d_out, d_in)
            if G > 1:
                try:
                    self.solver.check_shape(self.solver_config, d_out // G, d_in)
                except ConfigError as e:
                    raise ConfigError(f"with method.{self.source.options_key}.groups={G} each row group is "
                                      f"{d_out // G}x{d_in}: {e}") from None


def _plain(method) -> dict:
    if isinstance(method, DictConfig):
        return OmegaConf.to_container(method, resolve=True)
    return dict(method)


def resolve(method: DictConfig | dict) -> Method:
    """Typed, validated method from a method config node (no model, no data)."""
    m = _plain(method)
    name = m.get("name")
    source = hessian.get(m.get("hessian"))
    options = source.make_options(m)
    if m.get("solver") is None:
        if source.calibrated:
            raise ConfigError(f"method {name!r}: a Hessian source ({m.get('hessian')}) needs a solver (solver=...)")
        return Method(name or "fp16", None, None, source, options)
    spec = solvers.get(m["solver"])
    skip = set(LOOP_KEYS) | hessian.option_keys()
    scfg = spec.make_config({k: v for k, v in m.items() if k not in skip})
    if spec.uses_hessian and not source.calibrated:
        raise ConfigError(f"method {name!r}: solver {spec.name!r} needs a Hessian source "
                          f"(hessian=layerwise or another registered one: {hessian.HESSIANS.names()})")
    if not spec.uses_hessian and source.calibrated:
        raise ConfigError(f"method {name!r}: solver {spec.name!r} uses no Hessian; drop hessian={source.name}")
    G = source.groups(options)
    if G > 1 and not spec.stacked_hessian:
        raise ConfigError(f"method {name!r}: method.{source.options_key}.groups={G} needs a solver that takes one "
                          f"Hessian per row group; {spec.name!r} takes one per layer"
                          + (" (BiLLM chooses its salient columns over all rows of a block)" if spec.name == "billm"
                             else "") + "; use groups=1")
    ts = bool(m.get("true_sequential", False))
    if ts and not getattr(source.source, "supports_groups", False):
        raise ConfigError(f"method {name!r}: true_sequential=true does not apply to the {source.name} source "
                          f"(all its Hessians of a block come from one pass)")
    return Method(name or spec.name, spec, scfg, source, options, ts)
