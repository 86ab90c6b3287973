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
ROOT_ATTR = "_pelt_run_root"  # on a task model built around a run: the module the recipe's paths start from
HEAD_ATTR = "_pelt_head_params"  # on a task model: the names of its head parameters (they train and save)
HEAD_PREFIX = "pelt_head."  # how head parameters are named among a run's tensors


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


def hook_call(model: nn.Module, path: str, fn: Callable[[nn.Module, tuple, dict], Any]) -> None:
    """Register ``fn(module, args, kwargs) -> None`` to see a module's call, keyword arguments included (e.g. the
    attention mask a model is called with)."""
    _keep(model, path, get_module(model, path).register_forward_pre_hook(fn, with_kwargs=True))


def detach(model: nn.Module, path: str, attr: str) -> nn.Module:
    """Remove an inserted child and every hook pelt registered on its parent — those of other insertions on the same
    module too, so use it on a module that holds one insertion; returns the child."""
    parent = get_module(model, path)
    child = getattr(parent, attr)
    delattr(parent, attr)
    for h in model.__dict__.get(HANDLES_ATTR, {}).pop(path, []):
        h.remove()
    return child


def set_task_model(model: nn.Module, root: nn.Module, head_params: list[str]) -> None:
    """Mark ``model`` as a task model built around a run: the recipe's paths start at ``root`` (the model itself
    or its base submodule), and ``head_params`` (the task head, peft's ``modules_to_save``) train with the inserted
    parameters. Kept outside the module tree, so state dicts and ``named_modules`` are unchanged."""
    model.__dict__[ROOT_ATTR] = root
    model.__dict__[HEAD_ATTR] = list(head_params)


def run_root(model: nn.Module) -> nn.Module:
    """The module a run's recipe paths start from (the model itself unless it is a task model built around one)."""
    return model.__dict__.get(ROOT_ATTR, model)


def head_params(model: nn.Module) -> list[str]:
    """The task head's parameter names of a task model built around a run (empty otherwise)."""
    return list(model.__dict__.get(HEAD_ATTR, []))


def is_trainable(model: nn.Module, name: str) -> bool:
    """Whether a parameter (named as in ``model``) trains: an inserted one, or one of the task head's."""
    return is_inserted(name) or name in model.__dict__.get(HEAD_ATTR, ())


def inserted_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter that pelt inserted, by name."""
    return {n: p for n, p in model.named_parameters() if is_inserted(n)}


def inserted_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A run's own tensors, detached and contiguous, for saving: the inserted modules' state (named from the run's
    root) and the task head's parameters (``pelt_head.<name in the task model>``)."""
    state = {n: t.detach().contiguous() for n, t in run_root(model).state_dict().items() if is_inserted(n)}
    params = dict(model.named_parameters())
    state.update({HEAD_PREFIX + n: params[n].detach().contiguous() for n in head_params(model)})
    return state


def load_inserted_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`inserted_state` back (the head's tensors into the task model, the rest into the run's root); a
    head tensor absent from ``state`` keeps its value (a head's first training)."""
    heads = {HEAD_PREFIX + n: n for n in head_params(model)}
    run_root(model).load_state_dict({n: t for n, t in state.items() if n not in heads}, strict=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, n in heads.items():
            if key in state:
                params[n].copy_(state[key])


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """Make exactly the inserted parameters (and a task model's head) trainable.

    Returns:
        ``(trainable, total)`` parameter counts.
    """
    trainable = total = 0
    for n, p in model.named_parameters():
        p.requires_grad_(is_trainable(model, n))
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
