"""PEFT methods, one file each, registered by name.

A method is a class with a ``name``, a frozen ``Params`` dataclass of hyper-parameters (defaults and limits in
field metadata, validated by :mod:`pelt_cli.recipe`), the roles it targets when a recipe names none, and two
functions:

* ``check(model, params, sites) -> list[str]``: problems that need the model's shapes (e.g. a rank larger than
  the layer). It runs on a ``meta``-device skeleton, before any weight is loaded.
* ``insert(model, params, sites) -> list[Insertion]``: attach the method's modules and hooks through
  :mod:`pelt_cli.surgery`, every inserted module under a child name starting with ``pelt_``.

The same ``insert`` runs on the skeleton for ``--dry-run`` (so the plan's parameter counts are the real ones) and
on the loaded model for ``apply``.

Optional hooks — a method defines those that apply to it, and merge, export, prune and train ask the method instead
of naming it (an insertion row's ``method`` is ``NAME`` or ``NAME.PART``, e.g. ``unipelt.lora``):

* ``foldable(row) -> "exact" | "gated" | None`` and ``fold(model, row, adapter, gate) -> {weight: [FoldOp]}``:
  how ``pelt merge`` folds a row into the base weights (``gated``: only with the gate frozen at its mean);
* ``gate_units(entry, params, rows) -> [GateUnit]``: the gated units ``pelt prune`` and ``pelt gates`` see;
* ``pruned_entries(entry, decided, rows) -> [entry]``: the recipe entries that rebuild the entry without the units
  decided ``prune``; ``unfolded_entry(entry, folded)``: the entry left after merge folded some of its parts;
* ``param_group(name) -> str | None``: the optimizer group of an inserted parameter (default ``modules``);
* ``peft_type``, ``to_peft(model, rows, adapter)`` and ``from_peft(config, state)``: the PEFT adapter format.

Adding a method = one file here + a recipe + a test; it registers itself when the package loads it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pelt_cli.errors import PeltError, RecipeError


def choice(default: str, choices: Iterable[str], help_text: str) -> Any:
    """A ``Params`` field whose value is one of ``choices`` (checked by :mod:`pelt_cli.recipe`), with its help."""
    return field(default=default, metadata={"choices": list(choices), "help": help_text})


@dataclass(frozen=True)
class ModelSite:
    """A module of the live model that a recipe entry selected.

    Attributes:
        module: in-memory module path (``named_modules`` name).
        disk_module: the same module's path on disk (as ``pelt inspect`` shows it).
        role: attn.q, attn.v, ffn.down, … (see :data:`pelt_cli.sites.ROLES`).
        layer: layer index, or None outside repeated blocks.
        block: encoder, decoder, cross-attention, audio, vision, projector or ``-``.
        parts: for a fused QKV layer selected by ``attn.q``/``attn.k``/``attn.v``, the parts chosen (``("q", "v")``);
            None for the whole layer.
        how: how the role was found: ``table``, ``inferred`` or empty.
    """

    module: str
    disk_module: str
    role: str
    layer: int | None
    block: str
    parts: tuple[str, ...] | None = None
    how: str = ""


def linear_sites(
    model: Any, sites: list[ModelSite], method: str, problems: list[str], why: str = ""
) -> Iterator[tuple[ModelSite, Any]]:
    """Each site with its module, for a ``check`` that needs Linear or Conv1D layers.

    Args:
        model: the model (or its ``meta`` skeleton).
        sites: the sites to check.
        method: the method's name, for the problem.
        problems: where a problem goes for each site whose module is of another kind (that site is skipped).
        why: what the problem adds after "needs a Linear or Conv1D layer".

    Yields:
        ``(site, module)`` for each Linear or Conv1D site, in order.
    """
    from pelt_cli import surgery

    for s in sites:
        mod = surgery.get_module(model, s.module)
        if surgery.is_linear(mod):
            yield s, mod
        else:
            problems.append(f"{s.disk_module} is a {type(mod).__name__}; {method} needs a Linear or Conv1D layer{why}")


@dataclass
class Insertion:
    """What one method attached at one site: the site, and the paths of the ``pelt_*`` modules it added."""

    site: str
    role: str
    method: str
    modules: list[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class FoldOp:
    """One exact fold acting on one weight tensor: ``fn`` maps the fp32 tensor to its folded value (it may work in
    place); ``late`` ops (input scales: forward pre-hooks run before the layer) apply after the others."""

    fn: Callable[[Any], Any]
    late: bool = False


def always_exact(method: Any, row: Any) -> str:
    """``foldable`` of a method whose every row folds exactly (``foldable = always_exact`` in its class)."""
    return "exact"


def fold_tensor(t: Any, ops: list[FoldOp]) -> Any:
    """Apply folds to one tensor in fp32, in hook order; returns fp32."""
    w = t.float()  # fp32, ours alone (a copy, or the caller's workspace): in-place updates are safe
    for op in sorted(ops, key=lambda op: op.late):  # stable: hook order within each group
        w = op.fn(w)
    return w


@dataclass(frozen=True)
class GateUnit:
    """One gated module of a run: what ``pelt prune`` decides on and ``pelt gates`` shows.

    Attributes:
        entry: the recipe entry it belongs to.
        module: its name (``lora``, ``prefix``, ``adapter``, ``domain``).
        row: the insertion row that computes its gate (a UniPELT controller; the domain adapter itself).
        members: the insertion rows it gates (empty when an earlier prune removed the module).
        stats: the path of its statistics in ``gates.json`` (e.g. ``("layers", site, "lora")``).
        pruned: removed by an earlier prune.
    """

    entry: int
    module: str
    row: int
    members: tuple[int, ...]
    stats: tuple[str, ...]
    pruned: bool = False


class Method(Protocol):
    """The protocol every method class follows (see the module docstring)."""

    name: ClassVar[str]
    Params: ClassVar[type]
    default_targets: ClassVar[tuple[str, ...]]

    def check(self, model: Any, params: Any, sites: list[ModelSite]) -> list[str]:
        """Problems with these params on these sites (shapes, kinds); empty when all is well."""
        ...

    def insert(self, model: Any, params: Any, sites: list[ModelSite]) -> list[Insertion]:
        """Attach modules and hooks; return one Insertion per site."""
        ...


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a method available to recipes under ``cls.name``.

    Raises:
        PeltError: another class is already registered under that name.
    """
    other = REGISTRY.get(cls.name)
    if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
        raise PeltError(
            f"method {cls.name!r} is registered twice: {other.__module__}.{other.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}"
        )
    REGISTRY[cls.name] = cls
    return cls


def of_row(row_method: str) -> Method:
    """The method that made an insertion row (``unipelt.lora`` → ``unipelt``)."""
    return get(row_method.split(".", 1)[0])


def hook(method: Method, name: str) -> Callable[..., Any] | None:
    """A method's optional hook (see the module docstring), or None when it has none."""
    return getattr(method, name, None)


def foldable() -> list[str]:
    """Names of the methods whose rows merge can fold into the base weights."""
    return [n for n in names() if hook(get(n), "fold") is not None]


def get(name: str) -> Method:
    """An instance of the method registered as ``name``.

    Raises:
        RecipeError: unknown name, with the closest valid one and the full list.
    """
    _load_all()
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError([f"unknown method {name!r}{hint}; expected one of {', '.join(sorted(REGISTRY))}"])
    return REGISTRY[name]()


def names() -> list[str]:
    """Every registered method name."""
    _load_all()
    return sorted(REGISTRY)


def _load_all() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
