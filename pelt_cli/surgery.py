"""The only code that changes a model's module tree.

pelt never replaces a base module. It attaches each inserted module as a child named ``pelt_<method>`` of the
module it acts on, and routes data through it with forward hooks. So the base model's parameter names — and its
state dict — are unchanged and every inserted parameter has a ``pelt_`` segment in its name. (``pelt prune`` does not
detach modules from a live model: it rewrites the run's recipe, so a rebuilt run simply lacks them.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import PeltError

MARK = "pelt_"
HANDLES_ATTR = "_pelt_hooks"  # module path -> list of hook handles, kept on the root model


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (``""`` is the model itself)."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        raise PeltError(f"module {path!r} not found in {type(model).__name__}") from None


def is_inserted(name: str) -> bool:
    """Whether a parameter or module path belongs to an inserted module."""
    return any(part.startswith(MARK) for part in name.split("."))


def attach(model: nn.Module, path: str, name: str, child: nn.Module) -> str:
    """Add ``child`` as ``<path>.pelt_<name>``; returns its full path. Refuses to overwrite an insertion."""
    parent = get_module(model, path)
    attr = name if name.startswith(MARK) else MARK + name
    if hasattr(parent, attr):
        raise PeltError(f"{path or type(model).__name__} already has an inserted {attr!r} (applied twice?)")
    parent.add_module(attr, child)
    return f"{path}.{attr}" if path else attr


def _keep(model: nn.Module, path: str, handle: Any) -> None:
    handles = model.__dict__.setdefault(HANDLES_ATTR, {})
    handles.setdefault(path, []).append(handle)


def hook_output(model: nn.Module, path: str, fn: Callable[[nn.Module, tuple, Any], Any]) -> None:
    """Register ``fn(module, args, output) -> new_output`` on the module at ``path``."""
    _keep(model, path, get_module(model, path).register_forward_hook(fn))


def hook_input(model: nn.Module, path: str, fn: Callable[[nn.Module, tuple], Any]) -> None:
    """Register ``fn(module, args) -> new_args | None`` (runs before the module's forward)."""
    _keep(model, path, get_module(model, path).register_forward_pre_hook(fn))


def detach(model: nn.Module, path: str, attr: str) -> nn.Module:
    """Remove an inserted child and every hook pelt registered on its parent — those of other insertions on the same
    module too, so use it on a module that holds one insertion; returns the child."""
    parent = get_module(model, path)
    child = getattr(parent, attr)
    delattr(parent, attr)
    for h in model.__dict__.get(HANDLES_ATTR, {}).pop(path, []):
        h.remove()
    return child


def inserted_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that pelt inserted, by name."""
    return {n: p for n, p in model.named_parameters() if is_inserted(n)}


def inserted_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state (parameters and buffers) of inserted modules, detached and contiguous, for saving."""
    return {n: t.detach().contiguous() for n, t in model.state_dict().items() if is_inserted(n)}


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """Make exactly the inserted parameters trainable.

    Returns:
        ``(trainable, total)`` parameter counts.
    """
    trainable = total = 0
    for n, p in model.named_parameters():
        p.requires_grad_(is_inserted(n))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, transposed)`` of a Linear or a GPT-2 Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        in_f, out_f = module.weight.shape
        return int(in_f), int(out_f), True
    raise PeltError(f"expected a Linear or Conv1D module, got {type(module).__name__}")


def is_linear(module: nn.Module) -> bool:
    """Whether a module is a Linear or a GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))
