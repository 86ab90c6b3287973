"""Merging a run with a transformers task head: the output is the task model's own checkpoint.

The run's modules live in the task model's base (its ``base_model_prefix`` child, or the task model itself when the
base already was one), so every output tensor is a base tensor under the task model's on-disk name — renamed through
the two key maps (base class ↔ task class), folded where a module acts on it — or one of the head's tensors, written
from the run. Base tensors the task class does not have (a causal LM's ``lm_head``, a masked LM's prediction head)
are left out. ``config.json`` names the task class, the labels and the padding token, so ``pipeline`` and
``AutoModelFor…`` load the result with no pelt import.
"""

from __future__ import annotations

from typing import Any

from pelt_cli.errors import CheckpointError, MergeRefused
from pelt_cli.io.header import TensorSpec, safetensors_dtype
from pelt_cli.methods import FoldOp
from pelt_cli.run import Base
from pelt_cli.stream import FLOAT_DTYPES, OutputPlan, layout
from pelt_cli.surgery import HEAD_PREFIX


def _renames(b: Base, spec: dict[str, Any], km_task: Any) -> dict[str, str]:
    """Base on-disk name → the task model's on-disk name, for every task-model tensor that comes from the base."""
    km_base, root, heads = b.key_map(), spec.get("root") or "", set(spec["params"])
    rename = {}
    for mem, disk in km_task.to_disk.items():
        if mem in heads:
            continue
        if root and not mem.startswith(root + "."):
            raise CheckpointError(
                f"{mem}: a {spec['class']} tensor outside its base {root!r} that the run's head does not hold"
            )
        base_disk = km_base.to_disk.get(mem[len(root) + 1 :] if root else mem)
        if base_disk is None:
            raise CheckpointError(f"{b.root}: no tensor for {spec['class']}'s {mem}")
        rename[base_disk] = disk
    return rename


def task_output(
    b: Base,
    spec: dict[str, Any],
    disk_ops: dict[str, list[FoldOp]],
    adapter: dict[str, Any],
    out_dtype: str | None,
    max_shard_size: int | None,
) -> OutputPlan:
    """The output plan of a classification run's merge (see the module docstring).

    Args:
        b: the run's base.
        spec: the run's head spec (a transformers task class).
        disk_ops: folds by the base's on-disk tensor names.
        adapter: the run's tensors (the head's are ``pelt_head.<name>``).
        out_dtype: the output dtype of floating tensors (None: the base's).
        max_shard_size: re-shard to at most this many bytes per file.
    """
    from pelt_cli.heads import build_task_model, task_config
    from pelt_cli.keymap import key_map

    km_task = key_map(build_task_model(b.directory, spec, meta=True))
    rename = _renames(b, spec, km_task)
    lost = sorted(n for n in disk_ops if n not in rename)
    if lost:
        raise MergeRefused(f"{lost[0]}: a module acts on it, but {spec['class']} has no such tensor")
    base_dtype = next((i.dtype for i in b.ckpt.tensors.values() if i.dtype in FLOAT_DTYPES), "F32")
    added, specs = {}, []
    for name in spec["params"]:
        t = adapter[HEAD_PREFIX + name]
        dt = out_dtype or (base_dtype if safetensors_dtype(t.dtype) in FLOAT_DTYPES else safetensors_dtype(t.dtype))
        added[km_task.disk_name(name)] = t
        specs.append(TensorSpec(km_task.disk_name(name), dt, tuple(t.shape)))
    shards, names, source = layout(b.ckpt, {}, out_dtype, max_shard_size, rename=rename, added=specs)
    config = task_config(b.directory, spec).to_dict()
    if out_dtype:
        config["dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}[out_dtype]
    return OutputPlan(config, shards, names, source, {rename[n]: ops for n, ops in disk_ops.items()}, [], added)
