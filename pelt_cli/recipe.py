"""Recipes: YAML files that say which method goes where. Validated strictly, every problem reported at once.

Each problem carries ``file:line:col`` (from PyYAML's node marks) and its YAML path, e.g.
``lora.yaml:9:7: inserts[0].params.rnak: unknown key (did you mean 'rank'?)``.

Top level: ``name``, ``description``, ``families`` (the model families the recipe is meant for), ``seed`` and
``inserts``, a list of entries with ``method``, ``targets`` (roles such as ``attn.q`` or module-path globs),
``layers``, ``blocks`` and ``params`` (the method's hyper-parameters), and optionally ``train``: the training
settings of ``pelt train`` (:class:`pelt_cli.train.TrainConfig` fields), which options given on its command line
override.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError
from .io.guard import (
    MAX_RECIPE_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    ScalarBuilder,
    compose_yaml,
    decode_utf8,
    read_bytes,
    require_regular,
)

Pos = tuple[int, int]
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
MAX_SEED = 2**63 - 1  # what torch.manual_seed takes
TOP_KEYS = {"name": str, "description": str, "families": list, "seed": int, "inserts": list, "train": dict}
TRAIN_EXCLUDED = ("device", "new_head", "task", "fsdp")  # where and how one invocation runs, not a recipe's settings
# The train: section: each pelt_cli.train.TrainConfig field but TRAIN_EXCLUDED, with its type and range (the checks of
# TrainConfig.check); kept here so that validating a recipe needs no torch (tests/test_recipe.py keeps them in step).
TRAIN_FIELDS: dict[str, tuple[Any, dict[str, Any]]] = {
    "epochs": (int, {"min": 1}),
    "batch_size": (int, {"min": 1}),
    "lr": (float, {"min": 1e-12}),
    "gate_lr": (float | None, {"min": 1e-12}),
    "scale_lr": (float, {"min": 1e-12}),
    "head_lr": (float | None, {"min": 1e-12}),
    "weight_decay": (float, {"min": 0.0}),
    "warmup": (float, {"min": 0.0}),
    "schedule": (str, {"choices": ["linear", "cosine", "constant"]}),
    "max_grad_norm": (float, {"min": 0.0}),
    "grad_accum": (int, {"min": 1}),
    "gate_warmup": (int, {"min": 0}),
    "gate_sparsity": (str, {"choices": ["none", "entropy", "l1"]}),
    "gate_lambda": (float, {"min": 0.0}),
    "gate_temperature": (float | None, {"min": 1e-6}),
    "patience": (int, {"min": 0}),
    "early_stop_on": (str, {"choices": ["metric", "loss"]}),
    "min_delta": (float, {"min": 0.0}),
    "class_weights": (str, {"choices": ["none", "auto"]}),
    "eval_every": (int, {"min": 0}),
    "log_every": (int, {"min": 0}),
    "eval_fraction": (float, {"min": 1e-9, "max": 0.999999}),
    "max_length": (int, {"min": 2}),
    "max_steps": (int | None, {"min": 1}),
    "save_every": (int, {"min": 0}),
    "seed": (int, {"min": 0, "max": 2**63 - 1}),
    "precision": (str, {"choices": ["fp32", "bf16", "fp16"]}),
    "base_dtype": (str, {"choices": ["auto", "fp32", "bf16", "fp16"]}),
    "grad_checkpoint": (bool, {}),
    "auto_prune": (float | None, {"min": 0.0, "max": 1.0}),
    "window": (int, {"min": 1}),
}
ENTRY_KEYS = {"method": str, "name": str, "targets": list, "layers": object, "blocks": list, "params": dict}
MAX_MESSAGE = 300
MAP_TAG, SEQ_TAG = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
LAYER_RANGE = re.compile(r"\s*(\d{1,30})\s*-\s*(\d{1,30})\s*", re.ASCII)
MAX_LAYER_RANGE = 100_000  # no model has more blocks; with a model, layers are checked against its own count
MAX_PARAM_INT = 10_000_000  # a method's integer setting (rank, prefix length, widths) above this cannot fit memory
BLOCKS = ["encoder", "decoder", "cross-attention", "audio", "vision", "projector", "-"]


@dataclass(frozen=True)
class Entry:
    """One validated ``inserts`` item."""

    method: str
    params: Any
    targets: tuple[str, ...] = ()
    layers: tuple[int, ...] | None = None
    blocks: tuple[str, ...] = ()
    name: str = ""
    index: int = 0
    where: str = ""  # "file:line:col" of the entry's targets (or the entry), for problems found later

    def at(self, key: str = "targets") -> str:
        """``file:line:col: inserts[i].key`` for messages about this entry."""
        return f"{self.where}: inserts[{self.index}].{key}"


@dataclass(frozen=True)
class Recipe:
    """A validated recipe."""

    name: str
    inserts: tuple[Entry, ...]
    description: str = ""
    families: tuple[str, ...] = ()
    seed: int = 0
    source: str = ""
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # only the keys the recipe's train: sets

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<recipe>") -> Recipe:
        """Validate already-parsed recipe data (e.g. ``run.json``'s ``recipe``) without a YAML round trip.

        Raises:
            RecipeError: every problem found, each located at ``where`` and its YAML path.
        """
        return validate(data, {}, where)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in), ready to dump as YAML or JSON."""
        return {
            "name": self.name,
            "description": self.description,
            "families": list(self.families),
            "seed": self.seed,
            "inserts": [
                {
                    "method": e.method,
                    **({"name": e.name} if e.name else {}),
                    "targets": list(e.targets),
                    "layers": list(e.layers) if e.layers is not None else "all",
                    "blocks": list(e.blocks),
                    "params": params_to_dict(e.params),
                }
                for e in self.inserts
            ],
            **({"train": dict(self.train)} if self.train else {}),
        }


def params_to_dict(params: Any) -> dict[str, Any]:
    """A Params dataclass as plain data (nested dataclasses too)."""
    return dataclasses.asdict(params)


# ---------------------------------------------------------------------------------------------- YAML with positions


class _Walk:
    """Turns composed YAML nodes into data, keeping positions and counting nodes (aliases expand here)."""

    def __init__(self, where: str, pos: dict[tuple, Pos], problems: list[str]) -> None:
        self.where, self.pos, self.problems, self.nodes = where, pos, problems, 0
        self.build = ScalarBuilder()

    def at(self, node: yaml.Node) -> str:
        return f"{self.where}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"

    def data(self, node: yaml.Node, path: tuple, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
            limit = f"more than {MAX_YAML_NODES:,} values" if depth <= MAX_YAML_DEPTH else "nesting too deep"
            shown = fmt_path(path[:8]) + ("…" if len(path) > 8 else "")
            raise RecipeError([f"{self.at(node)}: {shown}: {limit} (recursive or exploding aliases?)"])
        self.pos[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if node.tag not in (MAP_TAG, SEQ_TAG):
            self.problems.append(f"{self.at(node)}: {fmt_path(path)}: YAML tag {node.tag!r} is not allowed here")
            return None
        if isinstance(node, yaml.SequenceNode):
            return [self.data(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        out: dict[str, Any] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.problems.append(f"{self.at(k)}: {fmt_path(path)}: a key must be a plain name, not a list or map")
                continue
            key = k.value
            if key in out:
                self.problems.append(f"{self.at(k)}: {fmt_path(path + (key,))}: duplicate key")
            out[key] = self.data(v, path + (key,), depth + 1)
            self.pos[path + (key,)] = (k.start_mark.line + 1, k.start_mark.column + 1)
        return out

    def scalar(self, node: yaml.ScalarNode, path: tuple) -> Any:
        try:
            return self.build(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
            problem = getattr(e, "problem", None) or str(e)
            self.problems.append(f"{self.at(node)}: {fmt_path(path)}: {node.value!r} is not a valid value ({problem})")
            return None


def fmt_path(path: tuple) -> str:
    """``("inserts", 0, "params", "rank")`` → ``inserts[0].params.rank``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def parse_yaml(text: str, where: str) -> tuple[Any, dict[tuple, Pos]]:
    """Parse YAML text keeping each node's line and column.

    Raises:
        RecipeError: a YAML syntax error, with its position.
    """
    try:
        node = compose_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise RecipeError([f"{at}: YAML syntax error: {getattr(e, 'problem', None) or e}"]) from None
    except RecursionError:
        raise RecipeError([f"{where}: YAML nested too deeply"]) from None
    if node is None:
        raise RecipeError([f"{where}: the recipe is empty"])
    pos: dict[tuple, Pos] = {}
    problems: list[str] = []
    data = _Walk(where, pos, problems).data(node, ())
    if problems:
        raise RecipeError(problems)
    return data, pos


# ---------------------------------------------------------------------------------------------- overrides


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for raw in key.replace("[", ".").replace("]", "").split("."):
        if raw:
            parts.append(int(raw) if raw.lstrip("-").isdigit() else raw)
    return parts


def apply_overrides(data: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` (value parsed as YAML) and ``~key`` (delete) overrides to parsed recipe data.

    Keys are dotted paths; list items by index: ``inserts.0.params.rank=16`` or ``inserts[0].params.rank=16``.

    Raises:
        RecipeError: a malformed override or a path that does not exist.
    """
    problems = []
    for ov in overrides:
        delete = ov.startswith("~")
        key, eq, value = ov.lstrip("~").partition("=")
        if (not delete and not eq) or (delete and eq) or not key:
            problems.append(f"override {ov!r}: expected KEY=VALUE or ~KEY")
            continue
        parts = _split_key(key)
        node = data
        try:
            for p in parts[:-1]:
                node = node[p]
            last = parts[-1]
            if delete:
                del node[last]
            else:
                node[last] = _override_value(value, ov) if value != "" else ""
        except RecipeError as e:
            problems.extend(e.problems)
        except (KeyError, IndexError, TypeError):
            problems.append(f"override {ov!r}: {fmt_path(tuple(parts))} does not exist in the recipe")
    if problems:
        raise RecipeError(problems)
    return data


def _override_value(value: str, ov: str) -> Any:
    """An override's value parsed as YAML, with the limits and checks of a recipe file (blank: null)."""
    if not value.strip():
        return None
    data, _ = parse_yaml(value, f"override {ov!r}")
    return data


# ---------------------------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self, where: str, pos: dict[tuple, Pos]) -> None:
        self.where, self.pos, self.problems = where, pos, []

    def add(self, path: tuple, message: str) -> None:
        p = path
        while p and p not in self.pos:
            p = p[:-1]
        line, col = self.pos.get(p, (0, 0))
        at = f"{self.where}:{line}:{col}" if line else f"{self.where}"
        if len(message) > MAX_MESSAGE:  # a huge or deeply nested value is named, not printed whole
            message = message[: MAX_MESSAGE - 1] + "…"
        self.problems.append(f"{at}: {fmt_path(path)}: {message}")

    def keys(self, data: dict, allowed: typing.Iterable[str], path: tuple) -> None:
        allowed = list(allowed)
        for k in data:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (expected one of {', '.join(allowed)})"
                self.add(path + (k,), f"unknown key{hint}")


def _type_name(tp: Any) -> str:
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }.get(tp, getattr(tp, "__name__", str(tp)))


def _check_value(ck: _Checker, value: Any, tp: Any, meta: dict, path: tuple) -> Any:
    """Validate one value against a type hint and field metadata; return the converted value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(ck, value, args[0], meta, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            ck.add(path, f"expected a mapping of {tp.__name__} settings, got {value!r}")
            return tp()
        return build_params(ck, tp, value, path)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            ck.add(path, f"expected a list, got {value!r}")
            return []
        return [_check_value(ck, v, item_tp, meta, path + (i,)) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        ck.add(path, f"{value!r} is not a finite number")
        return value
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        ck.add(path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if "choices" in meta and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        ck.add(path, f"{value!r} is not one of {', '.join(map(str, meta['choices']))}{hint}")
    if "min" in meta and isinstance(value, (int, float)) and value < meta["min"]:
        ck.add(path, f"{value!r} is too small: expected ≥ {meta['min']}")
    if "max" in meta and isinstance(value, (int, float)) and value > meta["max"]:
        ck.add(path, f"{value!r} is too large: expected ≤ {meta['max']}")
    return value


def build_params(ck: _Checker, cls: type, data: dict, path: tuple) -> Any:
    """Validate a mapping against a Params dataclass and build it (defaults for what is not given)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    ck.keys(data, fields, path)
    kwargs = {}
    before = len(ck.problems)
    for name, value in data.items():
        if name in fields:
            meta = dict(fields[name].metadata)
            if hints[name] in (int, int | None):
                meta.setdefault("max", MAX_PARAM_INT)
            kwargs[name] = _check_value(ck, value, hints[name], meta, path + (name,))
    if hasattr(cls, "validate"):  # cross-field rules, reported beside the fields' own problems
        try:
            messages = cls.validate(kwargs)
        except (TypeError, ValueError, ArithmeticError):  # tripped on a value already reported as wrong
            messages = []
        for message in messages:
            ck.add(path, message)
    if len(ck.problems) > before:
        return cls()  # a bad value: the constructor would only trip on it
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:
        ck.add(path, str(e))
        return cls()


def parse_layers(spec: Any, ck: _Checker, path: tuple) -> tuple[int, ...] | None:
    """``all`` → None; ``3`` → (3,); ``"0-5"`` → (0..5); ``[0, "4-6", -1]`` → those (negative = from the end)."""
    if spec is None or spec == "all":
        return None
    items = spec if isinstance(spec, list) else [spec]
    out: list[int] = []
    for i, item in enumerate(items):
        p = path + (i,) if isinstance(spec, list) else path
        if isinstance(item, int) and not isinstance(item, bool):
            if abs(item) >= MAX_LAYER_RANGE:
                ck.add(p, f"layer {item}: no model has that many layers")
            out.append(item)
        elif isinstance(item, str) and "-" in item.strip("-"):
            found = LAYER_RANGE.fullmatch(item)
            a, b = (int(found.group(1)), int(found.group(2))) if found else (1, 0)
            if not found or a > b:
                ck.add(p, f"layer range {item!r}: expected 'A-B' with A ≤ B")
            elif b - a + 1 > MAX_LAYER_RANGE or len(out) + b - a + 1 > MAX_LAYER_RANGE:
                ck.add(p, f"layer range {item!r}: more than {MAX_LAYER_RANGE:,} layers; no model has that many")
            else:
                out.extend(range(a, b + 1))
        else:
            ck.add(p, f"expected a layer index, a range 'A-B', a list of them or 'all', got {item!r}")
    return tuple(out)


def validate(data: Any, pos: dict[tuple, Pos], where: str) -> Recipe:
    """Validate parsed recipe data and build a :class:`Recipe`.

    Raises:
        RecipeError: with every problem found, each with ``file:line:col`` and its YAML path.
    """
    from . import methods

    ck = _Checker(where, pos)
    if not isinstance(data, dict):
        raise RecipeError([f"{where}: expected a mapping with 'inserts', got {type(data).__name__}"])
    ck.keys(data, TOP_KEYS, ())
    inserts = data.get("inserts")
    if not isinstance(inserts, list) or not inserts:
        ck.add(("inserts",), "expected a non-empty list of inserts (each with a 'method')")
        inserts = []
    entries = []
    for i, raw in enumerate(inserts):
        path = ("inserts", i)
        if not isinstance(raw, dict):
            ck.add(path, f"expected a mapping with 'method', got {raw!r}")
            continue
        ck.keys(raw, ENTRY_KEYS, path)
        entry = _entry(ck, raw, path, i, methods)
        if entry is not None:
            entries.append(entry)
    for key, tp in (("name", str), ("description", str), ("seed", int)):
        if key in data and not isinstance(data[key], tp):
            ck.add((key,), f"expected {_type_name(tp)}, got {data[key]!r}")
    if isinstance(data.get("seed"), int) and not 0 <= data["seed"] <= MAX_SEED:
        ck.add(("seed",), f"{data['seed']!r}: expected an integer from 0 to 2**63 - 1")
    families = data.get("families") or []
    if not isinstance(families, list) or not all(isinstance(f, str) for f in families):
        ck.add(("families",), f"expected a list of model families, got {families!r}")
        families = []
    train = train_section(ck, data.get("train"))
    if ck.problems:
        raise RecipeError(ck.problems, hint="pelt validate RECIPE checks a recipe; pelt recipes cat NAME shows one")
    return Recipe(
        name=str(data.get("name") or Path(where).stem),
        inserts=tuple(entries),
        description=str(data.get("description") or ""),
        families=tuple(families),
        seed=int(data.get("seed", 0)),
        source=where,
        train=train,
    )


def train_section(ck: _Checker, raw: Any) -> dict[str, Any]:
    """Validate the optional ``train:`` mapping against :data:`TRAIN_FIELDS`; the keys it sets, values converted."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        ck.add(("train",), f"expected a mapping of training settings (pelt train's options), got {raw!r}")
        return {}
    for k in TRAIN_EXCLUDED:
        if k in raw:
            ck.add(("train", k), f"not a recipe setting: give it to pelt train (--{k.replace('_', '-')})")
    ck.keys({k: v for k, v in raw.items() if k not in TRAIN_EXCLUDED}, TRAIN_FIELDS, ("train",))
    return {k: _check_value(ck, v, *TRAIN_FIELDS[k], ("train", k)) for k, v in raw.items() if k in TRAIN_FIELDS}


def _entry(ck: _Checker, raw: dict, path: tuple, index: int, methods: Any) -> Entry | None:
    name = raw.get("method")
    if not isinstance(name, str):
        ck.add(path + ("method",), f"expected a method name ({', '.join(methods.names())}), got {name!r}")
        return None
    try:
        method = methods.get(name)
    except RecipeError as e:
        ck.add(path + ("method",), e.problems[0])
        return None
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict):
        ck.add(path + ("params",), f"expected a mapping of {name} settings, got {params_raw!r}")
        params_raw = {}
    params = build_params(ck, method.Params, params_raw, path + ("params",))
    targets = raw.get("targets", list(method.default_targets))
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        ck.add(path + ("targets",), f"expected a list of roles or module globs, got {targets!r}")
        targets = []
    blocks = raw.get("blocks") or []
    if isinstance(blocks, str):
        blocks = [blocks]
    if not isinstance(blocks, list):
        ck.add(path + ("blocks",), f"expected a block kind or a list of them ({', '.join(BLOCKS)}), got {blocks!r}")
        blocks = []
    for j, b in enumerate(blocks):
        if not isinstance(b, str) or b not in BLOCKS:
            close = difflib.get_close_matches(str(b), BLOCKS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ck.add(path + ("blocks", j), f"unknown block kind {b!r}{hint}; expected one of {', '.join(BLOCKS)}")
    if not isinstance(raw.get("name", ""), str):
        ck.add(path + ("name",), f"expected a string, got {raw['name']!r}")
    layers = parse_layers(raw.get("layers"), ck, path + ("layers",))
    line, col = ck.pos.get(path + ("targets",), ck.pos.get(path, (0, 0)))
    return Entry(
        method=name,
        params=params,
        targets=tuple(targets),
        layers=layers,
        blocks=tuple(blocks),
        name=str(raw.get("name") or ""),
        index=index,
        where=f"{ck.where}:{line}:{col}",
    )


def load(path_or_name: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file or a bundled recipe name.

    Raises:
        RecipeError: every problem found.
    """
    from .bundled import find_recipe

    if os.path.lexists(path_or_name):  # an existing path that is not a regular file is refused, never opened
        require_regular(path_or_name, "a recipe file (YAML)", _recipe_error)
    path = find_recipe(str(path_or_name))
    raw = read_bytes(path, "a recipe file (YAML)", MAX_RECIPE_BYTES, _recipe_error)
    text = decode_utf8(raw, str(path), "a recipe (YAML)", _recipe_error)
    return loads(text, str(path), overrides)


def _recipe_error(message: str) -> RecipeError:
    return RecipeError([message])


def loads(text: str, where: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe text (see :func:`load`)."""
    data, pos = parse_yaml(text, where)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, pos, where)


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
