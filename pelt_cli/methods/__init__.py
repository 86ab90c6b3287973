"""PEFT methods, one file each, registered by name.

A method is a class with a ``name``, a frozen ``Params`` dataclass of hyper-parameters (defaults and limits in
field metadata, validated by :mod:`pelt_cli.recipe`), the roles it targets when a recipe names none, and two
functions:

* ``check(model, params, sites) -> list[str]``: problems that need the model's shapes (e.g. a rank larger than
  the layer). It runs on a ``meta``-device skeleton, before any weight is loaded.
* ``insert(model, params, sites) -> list[Insertion]``: attach the method's modules and hooks through
  :mod:`pelt_cli.surgery`, every inserted module under a child name starting with ``pelt_``.

The same ``insert`` runs on the skeleton for ``--dry-run`` (so the plan's parameter counts are the real ones) and
on the loaded model for ``apply``. Adding a method = one file here + a recipe + a test; import it below.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from pelt_cli.errors import RecipeError


@dataclass(frozen=True)
class ModelSite:
    """A module of the live model that a recipe entry selected.

    Attributes:
        module: in-memory module path (``named_modules`` name).
        disk_module: the same module's path on disk (as ``pelt inspect`` shows it).
        role: attn.q, attn.v, ffn.down, … (see :data:`pelt_cli.sites.ROLES`).
        layer: layer index, or None outside repeated blocks.
        block: encoder, decoder, cross-attention, audio, vision, projector or ``-``.
    """

    module: str
    disk_module: str
    role: str
    layer: int | None
    block: str


@dataclass
class Insertion:
    """What one method attached at one site: the site, and the paths of the ``pelt_*`` modules it added."""

    site: str
    role: str
    method: str
    modules: list[str] = field(default_factory=list)
    note: str = ""


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
    """Class decorator: make a method available to recipes under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


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
