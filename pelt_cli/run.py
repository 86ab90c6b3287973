"""A base checkpoint and a run directory, each opened once and passed along.

:class:`Base` is a checkpoint opened once: headers, ``config.json``, family, fingerprints (computed at most once),
the key map and a pristine ``meta`` skeleton (built once, copied for each use). :class:`Run` is a run directory:
typed metadata (:class:`RunMeta`) from ``run.json``, its recipe parsed once, the base check, the skeleton with the
run's modules inserted, the adapter tensors, and one atomic write of a whole run.

A run directory references its base (path + content fingerprint) instead of copying it:

* ``run.json``: format version, pelt version, base (path, fingerprints, family, class), the resolved recipe, and
  the insertions (site, role, method, parameter count); plus what later commands add (``head``, ``training``,
  ``pruning``, provenance);
* ``recipe.yaml``: the resolved recipe (every default filled in), for people;
* ``adapter.safetensors``: the inserted parameters only, named as in the live model (``…query.pelt_lora.A``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pelt_cli import __version__
from pelt_cli.errors import CheckpointError
from pelt_cli.headspec import check_head
from pelt_cli.insert import PlanRow, insert_recipe
from pelt_cli.io.atomic import atomic_dir, recover
from pelt_cli.io.checkpoint import Checkpoint, open_checkpoint
from pelt_cli.io.fingerprint import cached_fingerprint, fingerprint, structure_fingerprint
from pelt_cli.io.guard import load_json
from pelt_cli.keymap import quiet_transformers
from pelt_cli.recipe import Recipe

RUN_FILE = "run.json"
ADAPTER_FILE = "adapter.safetensors"
RECIPE_FILE = "recipe.yaml"
GATES_FILE = "gates.json"
PRUNED_FILE = "pruned.safetensors"
METRICS_FILE = "metrics.jsonl"
STATE_DIR = "train"
RUN_FORMAT = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def now() -> str:
    """The current UTC time as ``run.json`` records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class BaseRef:
    """What a run records of its base."""

    path: str
    fingerprint: str
    structure: str
    family: str | None = None
    model_class: str | None = None
    params: int = 0


@dataclass
class RunMeta:
    """``run.json``, typed. Keys this version does not know are kept in ``extra`` and written back."""

    base: BaseRef
    recipe: dict[str, Any]
    insertions: list[PlanRow]
    new_params: int
    head: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    pruning: dict[str, Any] | None = None
    format: int = RUN_FORMAT
    pelt_version: str = __version__
    created: str = field(default_factory=now)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> RunMeta:
        """Parse ``run.json`` content.

        Raises:
            CheckpointError: a required key is missing or has the wrong type.
        """
        try:
            known = {f.name for f in fields(cls)} - {"extra"}
            meta = cls(
                **{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known}
            )
            meta.base = BaseRef(**meta.base)
            meta.insertions = [PlanRow.from_dict(r) for r in meta.insertions]
            bad = [k for k in ("path", "fingerprint", "structure") if not isinstance(getattr(meta.base, k), str)]
            if bad or not isinstance(meta.recipe, dict) or type(meta.new_params) is not int:
                raise TypeError(f"base.{bad[0]} is not a string" if bad else "recipe or new_params has the wrong type")
        except (TypeError, AttributeError) as e:
            raise CheckpointError(f"{where}: not a valid {RUN_FILE} ({e})") from None
        check_head(meta.head, where)  # before anything builds a head from it
        return meta

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``run.json`` content (unset optional sections left out)."""
        order = (
            "format",
            "pelt_version",
            "created",
            "base",
            "recipe",
            "new_params",
            "insertions",
            "head",
            "training",
            "pruning",
        )
        d = {k: getattr(self, k) for k in order}
        d["base"], d["insertions"] = asdict(self.base), [asdict(r) for r in self.insertions]
        d = {k: v for k, v in d.items() if v is not None or k not in ("head", "training", "pruning")}
        return {**d, **self.extra}


def load_base(directory: str | os.PathLike[str], device: str = "cpu", keys: Any = None) -> Any:
    """Load a checkpoint directory with transformers, keeping its stored dtype (eval mode); ``keys``: its tensor
    names, when the caller has them (saves opening the checkpoint again)."""
    import transformers

    from pelt_cli.keymap import model_class

    quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(str(directory))
    model = model_class(config, directory, keys).from_pretrained(str(directory), dtype="auto")
    return model.to(device).eval()


class Base:
    """A base checkpoint, opened once: headers, config, family, fingerprints, key map and skeleton (lazily)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._fingerprint: str | None = None
        self._structure: str | None = None
        self._skeleton: Any = None
        self._key_map: Any = None
        self._verified: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Base:
        """Open a checkpoint (a directory, a ``.safetensors`` file or a shard index) by its headers only (a merged
        output a killed ``--force`` replace left aside comes back first)."""
        recover(path)
        return cls(open_checkpoint(path))

    @property
    def root(self) -> Path:
        """The path the checkpoint was opened from."""
        return Path(self.ckpt.root)

    @property
    def directory(self) -> Path:
        """The directory holding the weights and ``config.json``."""
        return self.ckpt.directory

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` content (empty when there is none)."""
        return self.ckpt.config or {}

    @property
    def family(self) -> str | None:
        """The model family (``bert``, ``llama``, …) or None."""
        from pelt_cli.sites import detect_family

        return detect_family(self.ckpt)

    def require_config(self) -> None:
        """Raise unless the checkpoint has a ``config.json`` (building the model needs it)."""
        if not self.ckpt.config:
            raise CheckpointError(
                f"{self.directory}: no config.json beside the weights; pelt needs the model's config to build it",
                hint="save the model with save_pretrained",
            )

    def fingerprint(self) -> str:
        """The content fingerprint (hashes every tensor once; cached across processes by file identity)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.ckpt)
        return self._fingerprint

    def cached_fingerprint(self) -> str | None:
        """The content fingerprint if it is known without reading the tensors, else None."""
        if self._fingerprint is None:
            self._fingerprint = cached_fingerprint(self.ckpt)
        return self._fingerprint

    def structure(self) -> str:
        """The structure fingerprint (names, dtypes, shapes)."""
        if self._structure is None:
            self._structure = structure_fingerprint(self.ckpt)
        return self._structure

    def skeleton(self) -> Any:
        """A fresh copy of the model on the ``meta`` device (built once from ``config.json``; no weights read)."""
        from pelt_cli.keymap import skeleton

        if self._skeleton is None:
            self.require_config()
            self._skeleton = skeleton(self.directory, self.ckpt.tensors)
        return copy.deepcopy(self._skeleton)

    def key_map(self) -> Any:
        """The memory ↔ disk tensor-name map of the model (see :func:`pelt_cli.keymap.key_map`)."""
        from pelt_cli.keymap import key_map

        if self._key_map is None:
            self._key_map = key_map(self.skeleton())
        return self._key_map

    def verify(self) -> int:
        """Check, before any weight is read, that the files hold every tensor the config's model needs with the
        right shape (on the ``meta`` skeleton); done once per opened base. Returns the number of tensors checked.

        Raises:
            CheckpointError: a missing tensor, a wrong shape or dtype, or a config.json of another model.
        """
        from pelt_cli.keymap import verify_weights

        if self._verified is None:
            self._verified = verify_weights(self.ckpt, self.skeleton(), self.key_map())
        return self._verified

    def load(self, device: str = "cpu") -> Any:
        """The model with its weights, in its stored dtype, once :meth:`verify` has passed."""
        self.require_config()
        self.verify()
        return load_base(self.directory, device, self.ckpt.tensors)

    def ref(self, model_class: str) -> BaseRef:
        """What a run records of this base."""
        return BaseRef(
            str(self.root.resolve()),
            self.fingerprint(),
            self.structure(),
            self.family,
            model_class,
            self.ckpt.total_params,
        )

    def matches(self, ref: BaseRef, *, content: bool = True) -> bool:
        """Whether this is the base ``ref`` describes (structure, and content unless ``content=False``)."""
        return self.structure() == ref.structure and (not content or self.fingerprint() == ref.fingerprint)

    def check(self, ref: BaseRef, *, content: bool = True) -> None:
        """Raise unless this is the base ``ref`` describes.

        Raises:
            CheckpointError: another base (its fingerprint differs).
        """
        if not self.matches(ref, content=content):
            raise CheckpointError(
                f"{self.root}: not the base this run was made on (its fingerprint differs from {ref.fingerprint})",
                hint="pass the right base (--base), or override the check if you are sure",
            )


def inserted_model(model: Any, recipe: Recipe | None, head: dict[str, Any] | None) -> list[PlanRow]:
    """Insert a recipe into a model, real or on ``meta`` (a task model: into its run root), and pelt's own head if
    the spec names one; the insertion rows."""
    from pelt_cli.heads import attach_head, is_task_head
    from pelt_cli.surgery import run_root

    root = run_root(model)
    rows = insert_recipe(root, recipe) if recipe is not None and recipe.inserts else []
    if head and not is_task_head(head):
        attach_head(model, head)
    return rows


def expected_state(model: Any) -> dict[str, tuple]:
    """Name → shape of every inserted tensor (parameters and buffers) of a model, e.g. a ``meta`` skeleton."""
    from pelt_cli.surgery import inserted_state

    return {n: tuple(t.shape) for n, t in inserted_state(model).items()}


def check_state(state: dict[str, Any], model: Any, where: str | os.PathLike[str]) -> None:
    """Raise unless ``state`` holds exactly the model's inserted tensors with their shapes.

    Raises:
        CheckpointError: names missing or unexpected, or a shape that differs.
    """
    want, got = expected_state(model), {n: tuple(t.shape) for n, t in state.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [n for n in want if n in got and want[n] != got[n]]
        raise CheckpointError(
            f"{where}: does not match the run's recipe (missing {missing[:3]}, unexpected "
            f"{extra[:3]}, other shape {wrong[:3]})"
        )


class Run:
    """A run directory: typed metadata, the recipe (parsed once) and the files beside them.

    Attributes:
        dir: the run directory (None for a run not yet written).
        meta: ``run.json``, typed.
        recipe: the run's validated recipe.
    """

    def __init__(self, directory: Path | None, meta: RunMeta, recipe: Recipe) -> None:
        self.dir, self.meta, self.recipe = directory, meta, recipe
        self._base: Base | None = None
        self._checked = False

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Run:
        """Read ``run.json`` and validate its recipe.

        Raises:
            CheckpointError: not a run directory, or an unreadable / newer-format run.
        """
        d = Path(directory)
        recover(d)  # a run a killed command left between the two renames of its commit comes back whole
        p = d / RUN_FILE
        if not os.path.lexists(p):
            raise CheckpointError(
                f"{d}: not a pelt run directory (no {RUN_FILE})", hint="pelt apply RECIPE MODEL -o RUN creates one"
            )
        doc = load_json(p, RUN_FILE, CheckpointError, expect=dict)
        if not isinstance(doc.get("format", 0), int) or doc.get("format", 0) > RUN_FORMAT:
            raise CheckpointError(
                f"{p}: run format {doc.get('format')} is newer than this pelt understands ({RUN_FORMAT})",
                hint="upgrade pelt",
            )
        meta = RunMeta.from_dict(doc, str(p))
        return cls(d, meta, Recipe.from_dict(meta.recipe, str(p)))

    @classmethod
    def create(
        cls, base: Base, recipe: Recipe, rows: list[PlanRow], model_class: str, new_params: int, **extra: Any
    ) -> Run:
        """A new run (not yet written) of ``recipe`` on ``base``; ``extra`` keys go into ``run.json`` as they are."""
        meta = RunMeta(
            base=base.ref(model_class),
            recipe=recipe.to_dict(),
            insertions=list(rows),
            new_params=new_params,
            extra=dict(extra),
        )
        run = cls(None, meta, recipe)
        run._base, run._checked = base, True
        return run

    def path(self, name: str) -> Path:
        """A file of the run."""
        if self.dir is None:
            raise CheckpointError("internal: this run has not been written yet")
        return self.dir / name

    @property
    def where(self) -> str:
        """``DIR/run.json``, for messages."""
        return str(self.path(RUN_FILE)) if self.dir is not None else "<new run>"

    @property
    def head(self) -> dict[str, Any] | None:
        """The task head spec, if the run has one."""
        return self.meta.head

    @property
    def insertions(self) -> list[PlanRow]:
        """The insertion rows, in insertion (hook) order."""
        return self.meta.insertions

    def base(self, path: str | os.PathLike[str] | None = None, *, check: bool = True, content: bool = True) -> Base:
        """The run's base (opened once; ``path`` overrides the recorded location); ``content=False``: its first check
        compares the structure only (a process that reads none of its tensors, e.g. an FSDP rank other than 0).

        Raises:
            CheckpointError: the base is missing, or (with ``check``) its content differs from the recorded one.
        """
        if self._base is None or path is not None:
            self._base, self._checked = Base.open(path or self.meta.base.path), False
        if check and not self._checked:
            self._base.check(self.meta.base, content=content)
            self._checked = True
        return self._base

    def skeleton(
        self, base: Base | None = None, recipe: Recipe | None = None, head: dict[str, Any] | None | bool = True
    ) -> tuple[Any, list[PlanRow]]:
        """The base on ``meta`` with the run's modules (or ``recipe``'s) and head inserted; the insertion rows."""
        from pelt_cli.heads import build_task_model, is_task_head

        base = base or self.base(check=False)
        spec = self.head if head is True else (head or None)
        if is_task_head(spec):
            model = build_task_model(base.directory, spec, meta=True)
        else:
            model = base.skeleton()
        rows = inserted_model(model, self.recipe if recipe is None else recipe, spec)
        return model, rows

    def gate_units(self) -> list[Any]:
        """Every gated unit of the run (see :class:`pelt_cli.methods.GateUnit`), from the methods' hooks."""
        from pelt_cli import methods

        out = []
        for e in self.recipe.inserts:
            fn = methods.hook(methods.get(e.method), "gate_units")
            if fn is not None:
                out += fn(e.index, e.params, [(i, r) for i, r in enumerate(self.insertions) if r.entry == e.index])
        return out

    def check_rows(self, rows: list[PlanRow], base: Base) -> None:
        """Raise unless ``rows`` (a fresh insertion of the recipe) are the insertions the run recorded."""
        if [r.key for r in rows] != [r.key for r in self.insertions]:
            raise CheckpointError(f"{self.where}: its insertions differ from what its recipe inserts on {base.root}")

    def adapter_names(self) -> dict[str, Any]:
        """Name → header info of the tensors in ``adapter.safetensors`` (no data read)."""
        return open_checkpoint(self.path(ADAPTER_FILE)).tensors

    def has_head_weights(self) -> bool:
        """Whether the adapter file holds trained task-head tensors."""
        return any(n.startswith("pelt_head.") for n in self.adapter_names())

    def read_adapter(self, model: Any = None) -> dict[str, Any]:
        """Every tensor of ``adapter.safetensors`` (small); checked against ``model``'s inserted tensors if given."""
        from pelt_cli.io.reader import load_file

        state = load_file(self.path(ADAPTER_FILE))
        if model is not None:
            check_state(state, model, self.path(ADAPTER_FILE))
        return state

    def read_extra(self, name: str) -> dict[str, Any]:
        """The tensors of another safetensors file of the run (``pruned.safetensors``); empty when absent."""
        from pelt_cli.io.reader import load_file

        p = self.path(name)
        return load_file(p) if p.is_file() else {}

    def tokenizer_files(self) -> list[Path]:
        """The tokenizer (and processor) files the run goes with: those ``pelt train`` recorded, else the base's."""
        d = Path(self.meta.extra.get("tokenizer") or self.meta.base.path)
        return [d / n for n in TOKENIZER_FILES if (d / n).is_file()] if d.is_dir() else []

    def gates(self) -> dict[str, Any] | None:
        """``gates.json`` (the gate statistics ``pelt train`` records), or None."""
        p = self.path(GATES_FILE)
        if not os.path.lexists(p):
            return None
        return load_json(p, GATES_FILE, CheckpointError, expect=dict)

    def load_model(self, base: Base | None = None, device: str = "cpu") -> Any:
        """Rebuild the run: load the base, insert the recipe (and head), load the inserted weights.

        Returns:
            The model with exactly the inserted parameters trainable.
        """
        from pelt_cli.heads import build_task_model, is_task_head
        from pelt_cli.surgery import freeze_base, load_inserted_state

        base = base or self.base()
        if is_task_head(self.head):
            quiet_transformers()
            model = build_task_model(base.directory, self.head, base.ckpt.tensors).to(device).eval()
        else:
            model = base.load(device)
        inserted_model(model, self.recipe, self.head)
        state = self.read_adapter()
        check_state(state, model, self.path(ADAPTER_FILE))
        load_inserted_state(model, state)
        freeze_base(model)
        return model

    def with_recipe(self, recipe: Recipe, rows: list[PlanRow], new_params: int | None = None) -> Run:
        """A copy of this run's metadata with another recipe and insertion rows (not yet written)."""
        meta = copy.deepcopy(self.meta)
        meta.recipe, meta.insertions = recipe.to_dict(), list(rows)
        meta.new_params = sum(r.new_params for r in rows) if new_params is None else new_params
        run = Run(self.dir, meta, recipe)
        run._base, run._checked = self._base, self._checked
        return run

    def write(
        self,
        out: str | os.PathLike[str],
        tensors: dict[str, Any],
        *,
        force: bool = False,
        note: str = "",
        files: dict[str, str] | None = None,
        tensor_files: dict[str, dict] | None = None,
        copy_from: Path | None = None,
        skip: tuple[str, ...] = (),
        copy_files: list[Path] = (),
    ) -> Path:
        """Write the whole run into ``out`` in one atomic step (a temporary sibling renamed into place).

        Args:
            out: the run directory to create (or replace, with ``force``).
            tensors: the adapter tensors.
            force: replace an existing ``out``.
            note: the comment line on top of ``recipe.yaml``.
            files: more text files (name → content), e.g. ``gates.json``.
            tensor_files: more safetensors files (name → tensors), e.g. ``pruned.safetensors``.
            copy_from: copy every other file and folder of this directory (except ``skip`` and hidden ones).
            skip: names ``copy_from`` leaves out.
            copy_files: more files to copy in by name (e.g. a tokenizer's).
        """
        from pelt_cli.io.writer import save_file
        from pelt_cli.recipe import dump

        own = {ADAPTER_FILE, RUN_FILE, RECIPE_FILE, *(files or {}), *(tensor_files or {}), *skip}
        with atomic_dir(Path(out), force) as tmp:
            if copy_from is not None:
                copy_tree(copy_from, tmp, own)
            for f in copy_files:
                shutil.copy2(f, tmp / f.name)
            save_file(tensors, tmp / ADAPTER_FILE, metadata={"pelt_run_format": str(RUN_FORMAT)})
            for name, state in (tensor_files or {}).items():
                if state:
                    save_file(state, tmp / name)
            for name, text in (files or {}).items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / RECIPE_FILE).write_text(
                f"# {note or 'resolved from ' + self.recipe.source}\n" + dump(self.recipe), encoding="utf-8"
            )
            (tmp / RUN_FILE).write_text(self.meta_json(), encoding="utf-8")
        self.dir = Path(out)
        return self.dir

    def meta_json(self) -> str:
        """``run.json`` as written."""
        return json.dumps(self.meta.to_dict(), indent=2) + "\n"


def copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy every file and folder of ``src`` into ``dst`` except the names in ``skip`` and hidden ones."""
    for p in src.iterdir():
        if p.name in skip or p.name.startswith("."):
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)


def read_run(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``run.json`` of a run directory as a plain dict (for scripts; the library uses :class:`Run`)."""
    return Run.open(run_dir).meta.to_dict()


def load_run(
    run_dir: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, check_fingerprint: bool = True
) -> tuple[Any, dict[str, Any]]:
    """``(model, run.json)`` of a run: the base with the run's modules and weights (see :meth:`Run.load_model`)."""
    run = Run.open(run_dir)
    model = run.load_model(run.base(base, check=check_fingerprint))
    return model, run.meta.to_dict()
