"""The two views of a model's weights: in-memory parameter names and on-disk safetensors keys.

transformers 5 renames some checkpoints while loading (ViT ``encoder.layer.0.attention.attention.query`` on disk
is ``layers.0.attention.q_proj`` in memory; Qwen2-Audio ``audio_tower.…`` is ``model.audio_tower.…``) and
``save_pretrained`` drops tied targets. Surgery works on modules (memory names); merge and export work on keys
(disk names). This module derives the mapping with transformers' own conversion mapping, applied in reverse the
way ``save_pretrained`` applies it, on a model skeleton built on the ``meta`` device (no weights are read).
"""

from __future__ import annotations

import os
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


def skeleton(directory: Any, keys: Any = None) -> Any:
    """Build the checkpoint's model on the ``meta`` device from its ``config.json`` (no weights read); ``keys``: the
    checkpoint's tensor names when the caller has them (see :func:`model_class`)."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: cannot read config.json ({e})") from None
    cls = model_class(config, directory, keys)
    with torch.device("meta"):
        return cls(config)


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
