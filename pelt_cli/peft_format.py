"""PEFT adapters out of and into pelt runs: ``pelt export --peft`` and ``pelt import-peft``.

A LoRA-only or IA³-only run becomes ``adapter_config.json`` + ``adapter_model.safetensors`` with the key names HF
peft expects for the base's architecture, so ``peft.PeftModel.from_pretrained(base, DIR)`` gives pelt's outputs;
a PEFT LoRA/IA³ adapter becomes a pelt run on its base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pelt_cli import merge
from pelt_cli.apply import ADAPTER_FILE, RUN_FILE, RUN_FORMAT, atomic_dir, read_run
from pelt_cli.bundle import ExportRefused, _prepare_out
from pelt_cli.checkpoint import TensorReader, open_checkpoint, save_file
from pelt_cli.errors import CheckpointError
from pelt_cli.merge import meta_model, read_adapter

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _refuse_for_peft(meta: dict, has_head: bool) -> str:
    bad = [f"{i['method']} at {i['disk_site']}" for i in meta["insertions"] if i["method"] not in ("lora", "ia3")]
    if has_head:
        bad.append("the task head pelt_head")
    if bad:
        raise ExportRefused(f"a PEFT adapter holds LoRA or IA³ only; this run also has {len(bad)} other module(s): "
                            f"{', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}",
                            hint="pelt export without --format peft writes a bundle that keeps every module")
    kinds = sorted({i["method"] for i in meta["insertions"]})
    if len(kinds) != 1:
        raise ExportRefused(f"this run mixes {' and '.join(kinds) or 'nothing'}; one PEFT adapter is either LoRA or "
                            "IA³", hint="export a bundle instead, or split the recipe into two runs")
    sites = [i["site"] for i in meta["insertions"]]
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ExportRefused(f"{dup[0]} carries two {kinds[0]} modules; PEFT allows one per layer and adapter")
    return kinds[0]


def peft_adapter(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A LoRA-only or IA³-only run as PEFT adapter tensors and ``adapter_config.json`` content.

    Keys are ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` / ``ia3_l`` (no adapter name), and
    ``target_modules`` lists the exact module paths. GPT-2's sliced q/v LoRA becomes a full-width ``lora_B`` with zero
    rows for the k third (the same function). IA³ output vectors are ``(out, 1)``, input ones ``(1, in)`` and listed
    in ``feedforward_modules``.

    Raises:
        ExportRefused: the run holds other methods, mixes LoRA and IA³, or has two modules on one layer.
    """
    import torch

    from pelt_cli import surgery

    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    names = open_checkpoint(run_dir / ADAPTER_FILE).tensors
    kind = _refuse_for_peft(meta, any(n.startswith("pelt_head.") for n in names))
    base = open_checkpoint(meta["base"]["path"])
    model, _, _ = meta_model(base.directory, merge.run_recipe(meta, str(run_dir / RUN_FILE)), None)
    adapter = read_adapter(run_dir, model)
    tensors, ranks, ff, fan_in_fan_out, dropout = {}, {}, [], False, 0.0
    for ins in meta["insertions"]:
        site, path = ins["site"], ins["modules"][0]
        _, out_f, transposed = surgery.features(surgery.get_module(model, site))
        fan_in_fan_out |= transposed
        mod = surgery.get_module(model, path)
        if kind == "lora":
            b = adapter[f"{path}.B"]
            if mod.slices:  # zero rows where the sliced LoRA writes nothing: the same function
                full, offset = torch.zeros(out_f, b.shape[1], dtype=b.dtype), 0
                for start, end in mod.slices:
                    full[start:end] = b[offset:offset + end - start]
                    offset += end - start
                b = full
            tensors[f"{PEFT_PREFIX}{site}.lora_A.weight"] = adapter[f"{path}.A"].contiguous()
            tensors[f"{PEFT_PREFIX}{site}.lora_B.weight"] = b.contiguous()
            ranks[site] = (mod.rank, mod.alpha)
            dropout = max(dropout, float(getattr(mod.dropout, "p", 0.0)))
        else:
            vec = torch.cat([torch.ones(mod.fixed, dtype=adapter[f"{path}.l"].dtype), adapter[f"{path}.l"]])
            tensors[f"{PEFT_PREFIX}{site}.ia3_l"] = vec[None, :] if mod.side == "input" else vec[:, None]
            if mod.side == "input":
                ff.append(site)
    sites = [i["site"] for i in meta["insertions"]]
    config: dict[str, Any] = {
        "peft_type": "LORA" if kind == "lora" else "IA3", "task_type": None, "inference_mode": True,
        "base_model_name_or_path": meta["base"]["path"], "revision": None, "target_modules": sites,
        "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out, "modules_to_save": None,
    }
    if kind == "lora":
        counts: dict[tuple, int] = {}
        for v in ranks.values():
            counts[v] = counts.get(v, 0) + 1
        r, alpha = max(counts, key=lambda v: counts[v])
        config.update({
            "r": r, "lora_alpha": _num(alpha), "lora_dropout": dropout, "bias": "none", "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {s: v[0] for s, v in ranks.items() if v[0] != r},
            "alpha_pattern": {s: _num(v[1]) for s, v in ranks.items() if v[1] != alpha},
        })
    else:
        config.update({"feedforward_modules": ff, "init_ia3_weights": True})
    return tensors, config


def write_peft(d: Path, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """The two PEFT files into a directory."""
    save_file(tensors, d / PEFT_WEIGHTS, metadata={"format": "pt"})
    (d / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_peft(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a LoRA-only or IA³-only run as a PEFT adapter directory (see :func:`peft_adapter`)."""
    out = Path(out)
    tensors, config = peft_adapter(run_dir)
    _prepare_out(out, force)
    with atomic_dir(out, force) as tmp:
        write_peft(tmp, tensors, config)
    return out


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _peft_state(pdir: Path) -> tuple[dict, dict]:
    try:
        cfg = json.loads((pdir / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{pdir}: no readable {PEFT_CONFIG} ({e})") from None
    ck = open_checkpoint(pdir / PEFT_WEIGHTS)
    with TensorReader(ck) as r:
        state = {n.removeprefix(PEFT_PREFIX): r.read(n) for n in ck.tensors}
    if any(not n.startswith(PEFT_PREFIX) for n in ck.tensors):
        raise ExportRefused(f"{pdir / PEFT_WEIGHTS}: keys without the {PEFT_PREFIX!r} prefix; not a PEFT adapter")
    return cfg, state


def _lora_entries(cfg: dict, state: dict) -> tuple[list[dict], dict]:
    import math

    unsupported = [k for k in ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "target_parameters",
                               "trainable_token_indices", "alora_invocation_tokens") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    odd = sorted(n for n in state if not n.endswith((".lora_A.weight", ".lora_B.weight")))
    if unsupported or odd:
        raise ExportRefused(f"this PEFT LoRA uses what pelt's lora does not have: {', '.join(unsupported + odd[:3])}")
    groups: dict[tuple, list[str]] = {}
    values = {}
    for name in sorted(state):
        if not name.endswith(".lora_A.weight"):
            continue
        site = name[: -len(".lora_A.weight")]
        r = state[name].shape[0]
        alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if re_full(k, site)), cfg["lora_alpha"])
        alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha  # rsLoRA α/√r = (α√r)/r
        groups.setdefault((r, float(alpha)), []).append(site)
        values[f"{site}.pelt_lora.A"] = state[name]
        values[f"{site}.pelt_lora.B"] = state[f"{site}.lora_B.weight"]
    entries = [{"method": "lora", "targets": sites,
                "params": {"rank": r, "alpha": a, "dropout": float(cfg.get("lora_dropout") or 0.0)}}
               for (r, a), sites in groups.items()]
    return entries, values


def re_full(pattern: str, key: str) -> bool:
    """PEFT's pattern rule (``rank_pattern``/``alpha_pattern``): the key ends with the pattern at a dot boundary."""
    import re

    return re.match(rf"(.*\.)?({pattern})$", key) is not None


def _ia3_entries(state: dict) -> tuple[list[dict], dict]:
    sides: dict[str, list[str]] = {"input": [], "output": []}
    vectors = {}
    for name in sorted(state):
        if not name.endswith(".ia3_l"):
            raise ExportRefused(f"{name}: not an IA³ vector; pelt imports ia3_l tensors only")
        site, t = name[: -len(".ia3_l")], state[name]
        side = "input" if t.shape[0] == 1 and t.dim() == 2 and t.shape[1] > 1 else "output"
        sides[side].append(site)
        vectors[site] = (side, t.reshape(-1))
    entries = [{"method": "ia3", "targets": sites, "params": {"ffn_placement": p}}
               for sites, p in ((sides["input"], "down_input"), (sides["output"], "up_output")) if sites]
    return entries, vectors


def import_peft(peft_dir: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], *,
                force: bool = False) -> Path:
    """Bring a PEFT LoRA or IA³ adapter into a pelt run directory on ``model``.

    The recipe names the adapter's modules exactly (one ``lora`` entry per rank/alpha pair; one ``ia3`` entry per
    side), is applied to the base like ``pelt apply``, and the adapter's weights replace the fresh ones.

    Raises:
        ExportRefused: an adapter type or option pelt's methods cannot express (DoRA, biases, modules_to_save, an
            IA³ vector on a side pelt's ia3 does not scale there, …).
    """
    import shutil

    import torch
    import yaml

    from pelt_cli.apply import apply
    from pelt_cli.checkpoint import _commit_dir
    from pelt_cli.recipe import loads

    pdir, out = Path(peft_dir), Path(out)
    cfg, state = _peft_state(pdir)
    ptype = cfg.get("peft_type")
    if ptype == "LORA":
        entries, values = _lora_entries(cfg, state)
    elif ptype == "IA3":
        entries, vectors = _ia3_entries(state)
    else:
        raise ExportRefused(f"{pdir}: peft_type {ptype!r}; pelt imports LORA and IA3 adapters")
    recipe = loads(yaml.safe_dump({"name": f"peft-{pdir.name}", "description": f"imported from {pdir}",
                                   "inserts": entries}, sort_keys=False), str(pdir / PEFT_CONFIG))
    base = open_checkpoint(model)
    skel, _, _ = meta_model(base.directory, recipe, None)
    if ptype == "IA3":
        values = {}
        for site, (side, vec) in vectors.items():
            mod = skel.get_submodule(f"{site}.pelt_ia3")
            if mod.side != side or vec.numel() != mod.l.numel() + mod.fixed:
                raise ExportRefused(f"{site}: the PEFT vector scales the layer's {side} ({vec.numel()} wide); pelt's "
                                    f"ia3 scales its {mod.side} there")
            if mod.fixed and not torch.equal(vec[: mod.fixed], torch.ones(mod.fixed, dtype=vec.dtype)):
                raise ExportRefused(f"{site}: the PEFT vector scales the q third of a fused QKV layer; pelt's ia3 "
                                    "keeps it at one")
            values[f"{site}.pelt_ia3.l"] = vec[mod.fixed:].contiguous()
    _prepare_out(out, force)
    tmp = out.parent / f".{out.name}.pelt-tmp-{os.getpid()}"
    try:
        apply(recipe, base.root, tmp, force=True)
        ck = open_checkpoint(tmp / ADAPTER_FILE)
        with TensorReader(ck) as r:
            current = {n: r.read(n) for n in ck.tensors}
        for name, t in values.items():
            if name not in current or tuple(current[name].shape) != tuple(t.shape):
                raise ExportRefused(f"{name}: shape {tuple(t.shape)} does not fit the layer on this base")
            current[name] = t.to(current[name].dtype).contiguous()
        save_file(current, tmp / ADAPTER_FILE, metadata={"pelt_run_format": str(RUN_FORMAT)})
        run = json.loads((tmp / RUN_FILE).read_text(encoding="utf-8"))
        run["imported_from"] = {"peft_dir": str(pdir.resolve()), "peft_type": ptype,
                                "base_model_name_or_path": cfg.get("base_model_name_or_path")}
        (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        _commit_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
