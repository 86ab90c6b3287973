"""The two views of a model's weights: in-memory parameter names and on-disk safetensors keys.

transformers 5 renames some checkpoints while loading (ViT ``encoder.layer.0.attention.attention.query`` on disk
is ``layers.0.attention.q_proj`` in memory; Qwen2-Audio ``audio_tower.…`` is ``model.audio_tower.…``) and
``save_pretrained`` drops tied targets. Surgery works on modules (memory names); merge and export work on keys
(disk names). This module derives the mapping with transformers' own conversion mapping, applied in reverse the
way ``save_pretrained`` applies it, on a model skeleton built on the ``meta`` device (no weights are read).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, PeltError
from .io.checkpoint import Checkpoint


@dataclass
class KeyMap:
    """Memory ↔ disk names for one model class.

    Attributes:
        to_disk: memory name → disk name, for every parameter/buffer saved one-to-one.
        to_memory: the inverse of ``to_disk``.
        tied: memory target → memory source for tied parameters (the target is not saved).
        converted: memory names that transformers fuses or splits on load (no one-to-one key).
    """

    to_disk: dict[str, str] = field(default_factory=dict)
    to_memory: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    converted: list[str] = field(default_factory=list)

    def disk_name(self, memory_name: str) -> str:
        """The on-disk key of a memory name (a tied target maps to its source's key)."""
        memory_name = self.tied.get(memory_name, memory_name)
        if memory_name not in self.to_disk:
            raise KeyError(memory_name)
        return self.to_disk[memory_name]

    def memory_name(self, disk_name: str) -> str:
        """The memory name of an on-disk key."""
        return self.to_memory[disk_name]

    def disk_module(self, memory_module: str) -> str:
        """The on-disk path of a module (a module path is a name minus its last segment)."""
        for suffix in ("weight", "bias"):
            name = f"{memory_module}.{suffix}"
            if name in self.to_disk or name in self.tied:
                return self.disk_name(name).rsplit(".", 1)[0]
        raise KeyError(memory_module)


HEAD_AUTOS = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM", "AutoModelForPreTraining")


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings stay off stderr unless ``pelt -vv``."""
    import transformers

    if int(os.environ.get("PELT_VERBOSITY", "1")) < 3:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def model_class(config: Any, directory: Any = None, keys: Any = None) -> Any:
    """The transformers class named by ``config.architectures[0]``; else the AutoModel class for the config — or,
    when the checkpoint in ``directory`` (or its tensor names ``keys``, when known) stores its keys under the base
    model's prefix (``model.layers.0…``, as a head model saves them), the first head class (causal LM, seq2seq,
    masked LM, pre-training) that has one."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    base = transformers.AutoModel._model_mapping[type(config)]
    prefix = getattr(base, "base_model_prefix", "")
    if keys is None and directory is not None and prefix:
        from .io.checkpoint import open_checkpoint

        try:
            keys = open_checkpoint(directory).tensors
        except PeltError:
            keys = {}
    if prefix and keys:
        if any(k.startswith(prefix + ".") for k in keys):
            for auto in HEAD_AUTOS:
                try:
                    return getattr(transformers, auto)._model_mapping[type(config)]
                except KeyError:
                    continue
    return base


def read_config(directory: Any) -> Any:
    """``AutoConfig.from_pretrained(directory)``, what transformers raises about the file's values as one line.

    Raises:
        CheckpointError: naming the config.json and transformers' complaint.
    """
    import transformers

    quiet_transformers()
    try:
        from huggingface_hub.errors import StrictDataclassError  # a config value of the wrong type (transformers 5)
    except ImportError:  # pragma: no cover - older huggingface_hub
        StrictDataclassError = ValueError  # noqa: N806
    try:
        return transformers.AutoConfig.from_pretrained(str(directory))
    except (*CONFIG_ERRORS, OSError, StrictDataclassError) as e:
        raise CheckpointError(f"{directory}/config.json: cannot read the model's config ({_first_line(e)})") from None


def skeleton(directory: Any, keys: Any = None) -> Any:
    """Build the checkpoint's model on the ``meta`` device from its ``config.json`` (no weights read); ``keys``: the
    checkpoint's tensor names when the caller has them (see :func:`model_class`)."""
    import torch

    config = read_config(directory)
    try:
        cls = model_class(config, directory, keys)
        with torch.device("meta"):
            return cls(config)
    except CONFIG_ERRORS as e:
        raise CheckpointError(
            f"{directory}/config.json: transformers cannot build a {type(config).__name__} model from it "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None


# What transformers raises on a config.json whose values it cannot use (wrong types, lists too short, zero sizes);
# caught only around reading the config and building the model from it on ``meta``.
CONFIG_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    IndexError,
    AssertionError,
    ArithmeticError,
    RuntimeError,
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def key_map(model: Any) -> KeyMap:
    """Derive the memory ↔ disk mapping of a transformers model (real or on ``meta``).

    Applies ``transformers.core_model_loading.revert_weight_conversion`` — what ``save_pretrained`` does — to
    placeholder tensors, one distinct placeholder per name, and reads back which placeholder got which key.
    """
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    state = {k: v for k, v in model.state_dict().items() if k not in tied}
    placeholders = {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in state.items()}
    by_id = {id(t): k for k, t in placeholders.items()}
    reverted = revert_weight_conversion(model, dict(placeholders))
    km = KeyMap(tied=tied)
    for disk_key, t in reverted.items():
        mem = by_id.get(id(t))
        if mem is None:
            continue
        km.to_disk[mem] = disk_key
        km.to_memory[disk_key] = mem
    km.converted = sorted(k for k in state if k not in km.to_disk)
    return km


def check_against(km: KeyMap, ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """Compare a key map with a checkpoint's keys.

    Returns:
        ``(missing, unexpected)``: disk keys the model expects but the checkpoint lacks, and checkpoint keys the
        model does not know.
    """
    expected = set(km.to_disk.values())
    present = set(ckpt.tensors)
    return sorted(expected - present), sorted(present - expected)


def verify_weights(ckpt: Checkpoint, model: Any, km: KeyMap | None = None) -> int:
    """Check, before any weight is read, that a checkpoint holds every tensor its config's model loads one-to-one,
    each with the shape and a compatible dtype of the parameter (or buffer) on the ``meta`` skeleton ``model``.

    Returns:
        The number of tensors checked.

    Raises:
        CheckpointError: the first problems found (a missing tensor, a wrong shape, an integer tensor for a float
            parameter), each naming the tensor, what the model expects and what the file holds.
    """
    km = km or key_map(model)
    state = model.state_dict()
    where = ckpt.root
    cls = type(model).__name__
    missing, wrong = [], []
    for mem, disk in km.to_disk.items():
        info, want = ckpt.tensors.get(disk), state.get(mem)
        if not hasattr(want, "is_floating_point"):  # an extra state a module keeps as a plain value
            continue
        if info is None:
            missing.append(disk)
        elif tuple(info.shape) != tuple(want.shape):
            wrong.append(f"tensor {disk!r}: shape {list(info.shape)} on disk, {cls} expects {list(want.shape)}")
        elif want.is_floating_point() and info.dtype not in FLOAT_DTYPES:
            wrong.append(f"tensor {disk!r}: dtype {info.dtype} on disk, {cls} expects a floating-point tensor")
    ignore = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])  # e.g. DeepSeek's MTP layer
    unused = sorted(k for k in set(ckpt.tensors) - set(km.to_disk.values()) if not any(re.search(p, k) for p in ignore))
    deeper = _deeper_layers(unused, km)
    if deeper:
        wrong.insert(0, f"tensor {deeper!r} is in a layer {cls} does not have (its config has fewer layers)")
    elif not km.converted and len(unused) * 2 > len(ckpt.tensors):  # the config describes another model
        wrong.insert(
            0,
            f"{len(unused)} of the {len(ckpt.tensors)} tensors on disk are not part of {cls}, e.g. {unused[0]!r}",
        )
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        wrong.insert(0, f"{len(missing)} tensor(s) {cls} needs are missing: {', '.join(map(repr, missing[:3]))}{more}")
    if wrong:
        cfg = ckpt.config or {}
        raise CheckpointError(
            f"{where}: the weights do not fit its config.json ({cfg.get('model_type', '?')}): {wrong[0]}"
            + (f"; and {len(wrong) - 1} more problem(s)" if len(wrong) > 1 else ""),
            hint="the config.json beside the weights must be the one they were saved with (save_pretrained)",
        )
    return len(km.to_disk)


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0"}


def _deeper_layers(unused: list[str], km: KeyMap) -> str | None:
    """An unused on-disk key in a layer past the model's last one (weights the config would silently drop)."""
    from .roles import layer_index

    def stem(key: str) -> str:  # the key with its layer number blanked: the layer list it belongs to
        return re.sub(r"\.\d+\.", ".#.", key, count=1)

    top: dict[str, int] = {}
    for key in km.to_disk.values():
        i = layer_index(key)
        if i is not None:
            top[stem(key)] = max(top.get(stem(key), -1), i)
    for key in unused:
        i = layer_index(key)
        if i is not None and stem(key) in top and i > top[stem(key)]:
            return key
    return None
