"""The light path of ``pelt merge``: a run of plain LoRA branches on ``Linear`` layers, planned without a model.

Most merges are LoRA on the attention and FFN projections of a decoder. Their plan needs no model: which tensor each
branch folds into is in ``run.json`` (each row's on-disk site), the shapes are in the safetensors headers, ``A``
and ``B`` in the adapter file. So this path imports neither torch nor transformers (their import alone takes
longer than copying a few GB): it reads ``run.json`` without validating the recipe through the method registry
(which imports every method, and torch), checks every row, tensor name and shape against the base's headers, and
folds with :mod:`pelt_cli.fold` (numpy, bit-identical to torch's and peft's merge).

Its output is byte-identical to the full path's (both round ``(B A)``, ``× α/r`` and the add as peft does; tested
for ``α/r`` = 2 and 3). It applies only where nothing needs the model: every row is
``lora`` on an attention or FFN projection (``attn.q/k/v/o``, ``ffn.up/gate/down``: never fused QKV, an embedding
or a tied weight) of a family whose layers are ``nn.Linear`` (not GPT-2's ``Conv1D``), with its site's name the same
in memory and on disk; no head, no pruning, no output dtype, no re-sharding; the adapter holds exactly the rows'
``A`` and ``B`` with the shapes the weights and the recipe's rank call for. Anything else (or anything odd) takes
the full path, which also reports it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pelt_cli.architectures import FAMILIES
from pelt_cli.errors import PeltError
from pelt_cli.fold import FOLD_DTYPES, LazyLora, upcast
from pelt_cli.io.atomic import recover
from pelt_cli.io.checkpoint import Checkpoint, open_checkpoint
from pelt_cli.io.guard import load_json
from pelt_cli.io.reader import TensorReader
from pelt_cli.run import ADAPTER_FILE, RUN_FILE, RUN_FORMAT, Base, Run, RunMeta
from pelt_cli.stream import OutputPlan, layout

PLAIN_ROLES = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.gate", "ffn.down")
LORA_TENSORS = (".A", ".B")


@dataclass
class LightMerge:
    """A merge the light path takes: the run (its recipe left as a dict), its base, and what folds where."""

    run: Run
    base: Base
    folds: dict[str, list[tuple[str, str, float]]]  # disk weight → [(A name, B name, α/r)] in hook order
    adapter: Checkpoint

    @property
    def folded(self) -> list[dict]:
        """The report's folded list (as the full path writes it)."""
        return [
            {"method": r.method, "site": r.site, "disk_site": r.disk_site, "tensors": [f"{r.site}.weight"]}
            for r in self.run.insertions
        ]

    def output(self) -> OutputPlan:
        """The output plan: the base's layout, config and dtypes; each folded weight with its branches (``A`` and
        ``B`` read when the weight is folded, by the worker folding it)."""
        shards, names, source = layout(self.base.ckpt, {}, None, None)
        ops = {
            disk: [LazyLora(functools.partial(_read_ab, self.adapter, a, b), s) for a, b, s in lst]
            for disk, lst in self.folds.items()
        }
        return OutputPlan(self.base.config, shards, names, source, ops)


def _read_ab(adapter: Checkpoint, a: str, b: str) -> tuple[Any, Any]:
    """``A`` and ``B`` of one branch as 2-D fp32 numpy arrays."""
    import numpy as np

    from pelt_cli.fold import storage_view

    with TensorReader(adapter) as r:
        out = []
        for info in (adapter.tensors[a], adapter.tensors[b]):
            raw = storage_view(r.read_bytes(info.name), info.dtype, info.shape)
            out.append(upcast(raw, info.dtype, np.empty(info.shape, np.uint32)))
    return out[0], out[1]


def light_run(run_dir: str | os.PathLike[str]) -> Run | None:
    """The run with its recipe not parsed (``run.recipe`` is None; ``meta.recipe`` is the dict), or None where
    ``run.json`` is missing, unreadable or newer (the full path reports it)."""
    d = Path(run_dir)
    try:
        recover(d)
        doc = load_json(d / RUN_FILE, RUN_FILE, PeltError, expect=dict)
        if not isinstance(doc.get("format", 0), int) or doc.get("format", 0) > RUN_FORMAT:
            return None
        meta = RunMeta.from_dict(doc, str(d / RUN_FILE))
    except (PeltError, OSError):
        return None
    return Run(d, meta, None)  # type: ignore[arg-type]  # the recipe is read as a dict by this path


def _lora_scales(run: Run) -> dict[int, tuple[int, float]] | None:
    """Recipe entry → (rank, α/r) of its LoRA params, or None unless every row is a plain ``lora`` row."""
    entries = run.meta.recipe.get("inserts")
    if not isinstance(entries, list) or not run.insertions:
        return None
    out = {}
    for r in run.insertions:
        ok = r.method == "lora" and r.role in PLAIN_ROLES and r.site == r.disk_site and len(r.modules) == 1
        if not ok or not isinstance(r.entry, int) or not 0 <= r.entry < len(entries):
            return None
        e = entries[r.entry]
        p = e.get("params") if isinstance(e, dict) else None
        if not isinstance(p, dict) or e.get("method") != "lora" or p.get("fused_parts"):
            return None
        rank, alpha = p.get("rank"), p.get("alpha")
        if type(rank) is not int or rank < 1 or type(alpha) not in (int, float) or not alpha > 0:
            return None
        out[r.entry] = (rank, alpha / rank)  # LoRA's α/r
    return out


def _plain_family(run: Run, base: Base) -> bool:
    """Whether the base is of a known family whose projections are ``nn.Linear`` (weights stored ``(out, in)``)."""
    fam = FAMILIES.get(run.meta.base.family or "")
    return fam is not None and not fam.get("conv1d") and base.config.get("model_type") in fam["model_types"]


def light_merge(
    run_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None, out_dtype: str | None, shard: int | None
) -> LightMerge | None:
    """The light path's plan of a merge, from ``run.json`` and the headers only; None where the full path must run.

    Args:
        run_dir: the run directory.
        base: another location of the run's base, or None.
        out_dtype: the requested output dtype (the light path takes none).
        shard: the requested ``max_shard_size`` (the light path takes none).
    """
    run = light_run(run_dir) if out_dtype is None and not shard else None
    plain = run is not None and run.meta.head is None and not run.meta.pruning
    scales = _lora_scales(run) if run is not None and plain else None
    if run is None or scales is None:
        return None
    try:
        b = run.base(base, check=False)
        adapter = open_checkpoint(run.path(ADAPTER_FILE))
    except (PeltError, OSError):
        return None
    if not _plain_family(run, b):
        return None
    folds = _folds(run, b.ckpt, adapter, scales)
    return None if folds is None else LightMerge(run, b, folds, adapter)


def _folds(
    run: Run, ckpt: Checkpoint, adapter: Checkpoint, scales: dict[int, tuple[int, float]]
) -> dict[str, list[tuple[str, str, float]]] | None:
    """Disk weight → its branches, once every name, dtype and shape checks out (else None)."""
    folds: dict[str, list[tuple[str, str, float]]] = {}
    want = set()
    for r in run.insertions:
        rank, scale = scales[r.entry]
        w = ckpt.tensors.get(f"{r.disk_site}.weight")
        a, b = (adapter.tensors.get(r.modules[0] + s) for s in LORA_TENSORS)
        if w is None or a is None or b is None or len(w.shape) != 2 or w.dtype not in FOLD_DTYPES:
            return None
        if a.dtype not in FOLD_DTYPES or b.dtype not in FOLD_DTYPES:
            return None
        if tuple(a.shape) != (rank, w.shape[1]) or tuple(b.shape) != (w.shape[0], rank):
            return None
        folds.setdefault(w.name, []).append((a.name, b.name, scale))
        want |= {a.name, b.name}
    return folds if want == set(adapter.tensors) else None
