"""PEFT adapters out of and into pelt runs: ``pelt export --peft`` and ``pelt import-peft``.

A run whose modules all come from one method with a PEFT form (``peft_type``: LoRA, IA³) becomes
``adapter_config.json`` + ``adapter_model.safetensors`` with the key names HF peft expects for the model it wraps, so
``peft.PeftModel.from_pretrained(base, DIR)`` — or ``AutoPeftModelFor….from_pretrained(DIR)``: the config carries
``task_type`` and the base's absolute path — gives pelt's outputs; a PEFT adapter of such a type becomes a pelt run on
its base. The tensors and the method's part of the config come from the method's ``to_peft`` / ``from_peft`` hooks;
the rest is here.

A run's transformers task head (``BertForSequenceClassification``'s ``classifier``, …) is peft's ``modules_to_save``:
peft wraps the task model, so on a bare base (``BertModel``) every key and target is named from the task model
(``bert.encoder.…``). On import, ``modules_to_save`` tensors and the biases ``bias: lora_only|all`` trains become the
run's head parameters (tensors that replace the base's, ``pelt_head.<name>``): a run's outputs and ``pelt merge``
stay exact, as a merge writes head parameters as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pelt_cli import methods
from pelt_cli.errors import CheckpointError, ExportRefused
from pelt_cli.io.atomic import atomic_dir, guard_output
from pelt_cli.io.guard import load_json
from pelt_cli.io.reader import load_file
from pelt_cli.io.writer import save_file
from pelt_cli.run import Base, Run, expected_state

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
HEAD_PREFIX = "pelt_head."  # as surgery.HEAD_PREFIX (not imported: surgery imports torch)
EXPORT_HINT = "pelt export RUN -o DIR without --peft writes a bundle that keeps every module"
# pelt's task → peft's task_type; else the model class decides (AUTO_TASK_TYPES, first match)
TASK_TYPES = {"text-classification": "SEQ_CLS", "pair-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
AUTO_TASK_TYPES = (
    ("AutoModelForCausalLM", "CAUSAL_LM"),
    ("AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("AutoModelForSequenceClassification", "SEQ_CLS"),
    ("AutoModel", "FEATURE_EXTRACTION"),
)


def _peft_method(run: Run) -> Any:
    """The one method with a PEFT form that made every row of the run.

    Raises:
        ExportRefused: other modules, pelt's own head, two methods, or two modules on one layer.
    """
    from pelt_cli.heads import is_task_head

    bad = [
        f"{r.method} at {r.disk_site}"
        for r in run.insertions
        if methods.hook(methods.of_row(r.method), "to_peft") is None
    ]
    if run.has_head_weights() and not is_task_head(run.head):
        bad.append("pelt's own mean-pool head pelt_head")
    if bad:
        raise ExportRefused(
            f"a PEFT adapter holds LoRA or IA³ only; this run also has {len(bad)} other module(s): "
            f"{', '.join(bad[:5])}{', …' if len(bad) > 5 else ''}",
            hint=EXPORT_HINT,
        )
    kinds = sorted({r.method for r in run.insertions})
    if len(kinds) != 1:
        raise ExportRefused(
            f"this run mixes {' and '.join(kinds) or 'nothing'}; one PEFT adapter is either LoRA or IA³",
            hint=f"split the recipe into two runs, or: {EXPORT_HINT}",
        )
    sites = [r.site for r in run.insertions]
    dup = sorted({s for s in sites if sites.count(s) > 1})
    if dup:
        raise ExportRefused(
            f"{dup[0]} carries two {kinds[0]} modules; PEFT allows one per layer and adapter", hint=EXPORT_HINT
        )
    return methods.get(kinds[0])


def class_task_type(model: Any) -> str | None:
    """peft's ``task_type`` for a model by its class: a causal LM, a seq2seq LM, a sequence classifier or a bare
    model (``FEATURE_EXTRACTION``); None for others (a masked LM, a speech model, …)."""
    import transformers

    for auto, kind in AUTO_TASK_TYPES:
        cls = getattr(transformers, auto)._model_mapping.get(type(model.config), None)
        classes = cls if isinstance(cls, tuple) else (cls,)
        if any(c is not None and c.__name__ == type(model).__name__ for c in classes):
            return kind
    return None


def task_type(run: Run, model: Any) -> str | None:
    """peft's ``task_type`` for a run: its head's or training's task (classification: ``SEQ_CLS``; causal LM:
    ``CAUSAL_LM``), else the class of the model peft wraps (``model``: the task model of a run with a head)."""
    task = (run.head or {}).get("task") or (run.meta.training or {}).get("task")
    if task in TASK_TYPES:
        return TASK_TYPES[task]
    return None if task == "audio-classification" else class_task_type(model)


def _in_task_model(run: Run, root: str) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """The run's rows and inserted tensors renamed from its root to the task model (``root.`` prefixed), and its
    head tensors (``pelt_head.`` stripped)."""
    adapter = run.read_adapter()
    head = {n[len(HEAD_PREFIX) :]: t for n, t in adapter.items() if n.startswith(HEAD_PREFIX)}
    if not root:
        return list(run.insertions), {n: t for n, t in adapter.items() if not n.startswith(HEAD_PREFIX)}, head
    rows = [
        dataclasses.replace(r, site=f"{root}.{r.site}", modules=[f"{root}.{m}" for m in r.modules])
        for r in run.insertions
    ]
    return rows, {f"{root}.{n}": t for n, t in adapter.items() if not n.startswith(HEAD_PREFIX)}, head


def head_modules(model: Any, params: list[str]) -> tuple[list[str], list[str]]:
    """peft's ``modules_to_save`` for a head's parameters: for each, its outermost module whose every parameter is
    the head's (``classifier``, ``bert.pooler``, ``score``); and the parameters no such module holds (a bias of a
    layer whose weight is the base's)."""
    from pelt_cli.surgery import is_inserted

    names = [n for n, _ in model.named_parameters() if not is_inserted(n)]
    head, modules, left = set(params), [], []
    for p in params:
        parts = p.split(".")[:-1]
        found = next(
            (
                m
                for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                if all(n in head for n in names if n.startswith(m + "."))
            ),
            None,
        )
        if found is None:
            left.append(p)
        elif found not in modules:
            modules.append(found)
    return modules, left


def _head_part(
    model: Any, head: dict[str, Any], params: list[str], sites: list[str], has_bias: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A task head as peft saves it: ``modules_to_save`` modules' tensors by name, trained biases (a LoRA target's
    as ``<site>.base_layer.bias``) and the config keys (``modules_to_save``, ``bias``).

    Raises:
        ExportRefused: a head parameter that is neither in a whole module nor a bias, or biases on an IA³ run.
    """
    modules, left = head_modules(model, params)
    odd = [p for p in left if not p.endswith(".bias")]
    if odd or (left and not has_bias):
        what = odd[0] if odd else f"{left[0]}: a trained bias (peft's IA³ has no bias option)"
        raise ExportRefused(
            f"{what}: a head parameter that peft cannot save (modules_to_save saves whole modules)", hint=EXPORT_HINT
        )
    tensors = {p: head[p] for p in params if p not in left}
    targets = set(sites)
    for p in left:
        layer = p[: -len(".bias")]
        tensors[f"{layer}.base_layer.bias" if layer in targets else p] = head[p]
    part: dict[str, Any] = {"modules_to_save": modules or None}
    if left:
        part["bias"] = "lora_only" if all(p[: -len(".bias")] in targets for p in left) else "all"
    return tensors, part


def peft_adapter(run_dir: str | os.PathLike[str] | Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run as PEFT adapter tensors (``base_model.model.<module>.…``, no adapter name) and config content.

    A transformers task head becomes ``modules_to_save`` (its tensors under their names in the task model), and the
    keys and ``target_modules`` are named as in the task model (``bert.encoder.…`` on a bare ``BertModel`` base).

    Raises:
        ExportRefused: the run holds modules without a PEFT form or pelt's own head, mixes methods, or has two
            modules on one layer.
    """
    from pelt_cli.heads import is_task_head

    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    method = _peft_method(run)
    spec = run.head if is_task_head(run.head) else None
    model, _ = run.skeleton(head=spec or False)
    rows, adapter, head = _in_task_model(run, (spec or {}).get("root") or "")
    tensors, part = method.to_peft(model, rows, adapter)
    sites = [r.site for r in rows]
    head_tensors, head_part = _head_part(model, head, list(spec["params"]), sites, "bias" in part) if spec else ({}, {})
    config: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": task_type(run, model),
        "inference_mode": True,
        "base_model_name_or_path": str(Path(run.meta.base.path).resolve()),
        "revision": None,
        "target_modules": sites,
        "exclude_modules": None,
        "modules_to_save": None,
        **part,
        **head_part,
    }
    return {PEFT_PREFIX + n: t for n, t in {**tensors, **head_tensors}.items()}, config


def write_peft(d: Path, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """The two PEFT files into a directory."""
    save_file(tensors, d / PEFT_WEIGHTS, metadata={"format": "pt"})
    (d / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def export_peft(run_dir: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a run as a PEFT adapter directory (see :func:`peft_adapter`)."""
    out = Path(out)
    tensors, config = peft_adapter(run_dir)
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    guard_output(out, force, [run.dir, run.meta.base.path])
    with atomic_dir(out, force) as tmp:
        write_peft(tmp, tensors, config)
        for f in run.tokenizer_files():  # AutoTokenizer.from_pretrained(DIR) works beside AutoPeftModel…
            shutil.copy2(f, tmp / f.name)
    return out


# ---------------------------------------------------------------------------------------------------------- import


def read_peft(pdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``adapter_config.json`` and the adapter's tensors, keys without the ``base_model.model.`` prefix.

    Raises:
        CheckpointError: no readable config; ExportRefused: keys without the prefix (not a PEFT adapter).
    """
    if not os.path.lexists(pdir / PEFT_CONFIG):
        raise CheckpointError(f"{pdir}: no {PEFT_CONFIG}; expected a PEFT adapter directory (save_pretrained)")
    cfg = load_json(pdir / PEFT_CONFIG, PEFT_CONFIG, CheckpointError, expect=dict)
    check_peft_config(cfg, pdir / PEFT_CONFIG)
    raw = load_file(pdir / PEFT_WEIGHTS)
    if any(not n.startswith(PEFT_PREFIX) for n in raw):
        raise ExportRefused(f"{pdir / PEFT_WEIGHTS}: keys without the {PEFT_PREFIX!r} prefix; not a PEFT adapter")
    return cfg, {n.removeprefix(PEFT_PREFIX): t for n, t in raw.items()}


NUM = (int, float)
PEFT_CONFIG_TYPES: dict[
    str, tuple[type, ...]
] = {  # the adapter_config.json keys pelt reads, with the JSON types allowed
    "peft_type": (str,),
    "task_type": (str, type(None)),
    "r": (int,),
    "lora_alpha": NUM,
    "lora_dropout": (*NUM, type(None)),
    "alpha_pattern": (dict, type(None)),
    "rank_pattern": (dict, type(None)),
    "target_modules": (list, str, type(None)),
    "feedforward_modules": (list, str, type(None)),
    "modules_to_save": (list, type(None)),
    "bias": (str, type(None)),
    "use_rslora": (bool, type(None)),
    "fan_in_fan_out": (bool, type(None)),
    "base_model_name_or_path": (str, type(None)),
}


def check_peft_config(cfg: dict[str, Any], where: Path) -> None:
    """The types of the ``adapter_config.json`` keys pelt reads (other keys are left to the method's checks).

    Raises:
        CheckpointError: a key of the wrong JSON type, or a LoRA adapter without ``lora_alpha``.
    """
    for key, allowed in PEFT_CONFIG_TYPES.items():
        value = cfg.get(key)
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if key in cfg and (not isinstance(value, allowed) or wrong_bool):
            names = " or ".join(sorted({_JSON_NAMES.get(t, t.__name__) for t in allowed}))
            raise CheckpointError(f"{where}: {key} is {json.dumps(value)[:60]}; expected {names}")
    for key in ("alpha_pattern", "rank_pattern"):
        bad = [k for k, v in (cfg.get(key) or {}).items() if not isinstance(v, NUM) or isinstance(v, bool)]
        if bad:
            raise CheckpointError(f"{where}: {key}[{bad[0]!r}] is not a number")
    if cfg.get("peft_type") == "LORA" and "lora_alpha" not in cfg:
        raise CheckpointError(f"{where}: a LORA adapter config without lora_alpha; expected a number")


_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "a list",
    bool: "true/false",
}
_JSON_NAMES[type(None)] = "null"


def split_head(cfg: dict[str, Any], state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An adapter's tensors split into the method's and the head's: ``modules_to_save`` modules' tensors and the
    biases ``bias: lora_only|all`` trained (``<layer>.base_layer.bias`` named ``<layer>.bias``), by their names in the
    model peft wrapped (the stray copies of a head's wrapper that ``bias: all`` saves are left out)."""
    saved = [str(m) for m in cfg.get("modules_to_save") or []]
    biases = (cfg.get("bias") or "none") != "none"
    head, rest = {}, {}
    for name, t in state.items():
        parts = name.split(".")
        if {"original_module", "modules_to_save"} & set(parts):  # copies of a head's wrapper ``bias: all`` saves
            continue
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        if any(o.endswith(m) for o in owners for m in saved):  # peft's modules_to_save rule: a suffix of the path
            head[name] = t
        elif biases and name.endswith(".bias") and ".lora_" not in name:
            head[name.replace(".base_layer.bias", ".bias")] = t
        else:
            rest[name] = t
    return head, rest


def _labels(config: Any) -> list[str]:
    """A config's label names in id order."""
    return [str(config.id2label[i]) for i in sorted(config.id2label)] if config.id2label else []


def _fits(directory: Path, spec: dict[str, Any], head: dict[str, Any]) -> list[str] | None:
    """The head's parameter names in task-model order if every head tensor is a parameter of the spec's task model
    with its shape, else None."""
    from pelt_cli.heads import build_task_model

    have = {
        n: tuple(p.shape) for n, p in build_task_model(directory, {**spec, "params": []}, meta=True).named_parameters()
    }
    if any(have.get(n) != tuple(t.shape) for n, t in head.items()):
        return None
    return [n for n in have if n in head]


def seq_cls_spec(base: Base, skel: Any, head: dict[str, Any], where: Path) -> dict[str, Any]:
    """The head spec of a ``SEQ_CLS`` adapter on a base: the family's sequence-classification class, built around
    the base (its ``base_model_prefix`` child when the base is bare), labels from the base's config (generic
    ``LABEL_i`` when the head's width differs), parameters from the adapter's head tensors.

    Raises:
        ExportRefused: the family has no such class, the adapter holds no head for a bare base, or its head tensors
            fit no label count.
    """
    from pelt_cli.heads import task_class

    cls = task_class(skel.config, "text-classification")
    if cls is None:
        raise ExportRefused(
            f"{where}: a SEQ_CLS adapter (a sequence-classification model), but transformers has no "
            f"AutoModelForSequenceClassification class for {skel.config.model_type} models "
            f"({type(skel).__name__})",
            hint="import it onto a base of the family it was trained on",
        )
    prefix = cls.base_model_prefix
    root = "" if type(skel).__name__ == cls.__name__ or hasattr(skel, prefix) else prefix
    if not head:
        raise ExportRefused(
            f"{where}: a SEQ_CLS adapter without its head (modules_to_save); on a "
            f"{type(skel).__name__} base its classifier would be random",
            hint=f"import it onto the {cls.__name__} checkpoint it was trained on",
        )
    own = _labels(skel.config)
    spec = {
        "task": "text-classification",
        "labels": own,
        "class": cls.__name__,
        "root": root,
        "problem_type": skel.config.problem_type or "single_label_classification",
        "pad_token_id": None,
        "new_head": False,
        "params": [],
    }
    for n in dict.fromkeys([len(own)] + sorted({int(t.shape[0]) for t in head.values() if t.dim()})):
        labels = own if n == len(own) else [f"LABEL_{i}" for i in range(n)]
        params = _fits(base.directory, {**spec, "labels": labels, "new_head": n != len(own)}, head)
        if params is not None:
            return {**spec, "labels": labels, "new_head": n != len(own), "params": params}
    name, t = next(iter(head.items()))
    raise ExportRefused(f"{where}: head tensor {name} {tuple(t.shape)} fits no {cls.__name__} on this base")


def head_spec(cfg: dict[str, Any], base: Base, skel: Any, head: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """The run's head spec for an adapter's head tensors (None: the adapter has none and needs none).

    ``SEQ_CLS``: see :func:`seq_cls_spec`. Other task types: the base's own class, the head tensors (``lm_head``, the
    embeddings, trained biases) replacing the base's.

    Raises:
        ExportRefused: a head pelt has no task for (TOKEN_CLS, QUESTION_ANS), or a tensor the base does not have.
        UsageError: a CAUSAL_LM adapter on a bare base (no language-model head).
    """
    from pelt_cli.heads import require_lm_head

    kind = cfg.get("task_type")
    if kind == "CAUSAL_LM" and class_task_type(skel) == "FEATURE_EXTRACTION":  # a bare LlamaModel, …
        require_lm_head(type(skel).__name__, skel)
    if kind == "SEQ_CLS" and (head or class_task_type(skel) != "SEQ_CLS"):
        return seq_cls_spec(base, skel, head, where)
    if not head:
        return None
    if kind in ("TOKEN_CLS", "QUESTION_ANS"):
        raise ExportRefused(
            f"{where}: a {kind} adapter with a head (modules_to_save); pelt's runs have "
            "sequence-classification and causal-LM heads only"
        )
    spec = {
        "labels": _labels(skel.config),
        "class": type(skel).__name__,
        "root": "",
        "problem_type": skel.config.problem_type,
        "pad_token_id": None,
        "new_head": False,
        "params": [],
    }
    if kind == "CAUSAL_LM":
        spec["task"] = "causal-lm"
    params = _fits(base.directory, spec, head)
    if params is None:
        have = {n: tuple(p.shape) for n, p in skel.named_parameters()}
        bad = next(n for n, t in head.items() if have.get(n) != tuple(t.shape))
        raise ExportRefused(
            f"{where}: {bad} (modules_to_save or a bias) is not a parameter of {type(skel).__name__} of this shape"
        )
    return {**spec, "params": params}


def _base_relative(state: dict[str, Any], root: str, where: Path) -> dict[str, Any]:
    """The method's tensors named from the run root (the task model's ``root.`` prefix stripped).

    Raises:
        ExportRefused: a tensor outside the root.
    """
    if not root:
        return state
    outside = sorted(n for n in state if not n.startswith(root + "."))
    if outside:
        raise ExportRefused(f"{where}: {outside[0]} lies outside the task model's base {root!r}")
    return {n[len(root) + 1 :]: t for n, t in state.items()}


def _write_run(
    base: Base,
    recipe: Any,
    values: dict[str, Any],
    spec: dict[str, Any] | None,
    head: dict[str, Any],
    out: Path,
    force: bool,
    provenance: dict[str, Any],
) -> Path:
    """Build the run (the task model when ``spec`` names one), put the adapter's tensors in, write it atomically."""
    from pelt_cli.heads import build_task_model
    from pelt_cli.keymap import quiet_transformers
    from pelt_cli.run import inserted_model
    from pelt_cli.surgery import inserted_state

    quiet_transformers()
    model = build_task_model(base.directory, spec, base.ckpt.tensors) if spec else base.load()
    rows = inserted_model(model, recipe, spec)
    state = inserted_state(model)
    for name, t in {**values, **{HEAD_PREFIX + n: t for n, t in head.items()}}.items():
        state[name] = t.to(state[name].dtype).contiguous()
    run = Run.create(
        base, recipe, rows, type(base.skeleton()).__name__, sum(r.new_params for r in rows), imported_from=provenance
    )
    run.meta.head = spec
    return run.write(out, state, force=force)


def _method_name(cfg: dict[str, Any], pdir: Path) -> str:
    """The pelt method of an adapter's ``peft_type``.

    Raises:
        ExportRefused: a type no pelt method has the form of.
    """
    ptype = cfg.get("peft_type")
    by_type = {getattr(methods.get(n), "peft_type", None): n for n in methods.names()}
    if ptype not in by_type or ptype is None:
        known = ", ".join(sorted(str(t) for t in by_type if t))
        raise ExportRefused(f"{pdir}: peft_type {ptype!r}; pelt imports {known} adapters")
    return by_type[ptype]


def import_peft(
    peft_dir: str | os.PathLike[str], model: str | os.PathLike[str], out: str | os.PathLike[str], *, force: bool = False
) -> Path:
    """Bring a PEFT adapter (of a type a pelt method has the form of) into a pelt run directory on ``model``.

    The recipe names the adapter's modules exactly (from the method's ``from_peft``), is applied to the base like
    ``pelt apply``, and the adapter's weights replace the fresh ones. Its ``modules_to_save`` tensors and trained
    biases become the run's head (see :func:`head_spec`): a ``SEQ_CLS`` adapter gives a run on the family's
    sequence-classification model, built around a bare base.

    Raises:
        ExportRefused: an adapter type or option pelt's methods cannot express (DoRA, ``lora_bias``, an IA³ vector on
            a side pelt's ia3 does not scale there, …), or a head the base's family has no class for.
        UsageError: a CAUSAL_LM adapter on a bare base (no language-model head).
    """
    from pelt_cli.insert import insert_recipe
    from pelt_cli.recipe import Recipe

    pdir, out = Path(peft_dir), Path(out)
    cfg, state = read_peft(pdir)
    name = _method_name(cfg, pdir)
    base = Base.open(model)
    base.require_config()
    skel = base.skeleton()
    head, rest = split_head(cfg, state)
    spec = head_spec(cfg, base, skel, head, pdir)
    rest = _base_relative(rest, (spec or {}).get("root") or "", pdir)
    entries, fit = methods.get(name).from_peft({**cfg, "bias": "none", "modules_to_save": None}, rest)
    recipe = Recipe.from_dict(
        {"name": f"peft-{pdir.name}", "description": f"imported from {pdir}", "inserts": entries},
        str(pdir / PEFT_CONFIG),
    )
    insert_recipe(skel, recipe)
    values = fit(skel)
    want = expected_state(skel)
    wrong = [n for n, t in values.items() if want.get(n) != tuple(t.shape)]
    if wrong:
        raise ExportRefused(f"{wrong[0]}: shape {tuple(values[wrong[0]].shape)} does not fit the layer on this base")
    guard_output(out, force, [pdir, model])
    provenance = {
        "peft_dir": str(pdir.resolve()),
        "peft_type": cfg.get("peft_type"),
        "task_type": cfg.get("task_type"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
    }
    return _write_run(base, recipe, values, spec, head, out, force, provenance)
