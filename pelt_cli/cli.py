"""The ``pelt`` command line: parse, call the library, print. torch and transformers load inside commands only."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

try:  # typer >= 0.2x vendors its own click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as _cx

from . import __version__
from .errors import PeltError, RecipeError, UsageError

app = typer.Typer(
    name="pelt",
    help="Model surgery for parameter-efficient fine-tuning: inspect checkpoints from their headers, "
    "insert LoRA/Adapter/Prefix/IA³/UniPELT modules, train, prune, merge and export them.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    # Rich help panels on a terminal; plain click help in a pipe (and 2× faster: rich is not imported).
    rich_markup_mode="rich" if sys.stdout.isatty() else None,
)


class Format(str, Enum):
    """Output formats for data on stdout."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    tsv = "tsv"


class Shell(str, Enum):
    """Shells with completion scripts."""

    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def _version(value: bool) -> None:
    if value:
        print(f"pelt {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logs on stderr.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
) -> None:
    """pelt: PEFT model surgery from the shell."""
    os.environ["PELT_VERBOSITY"] = "0" if quiet else str(1 + verbose)


def complete_model(incomplete: str) -> list[str]:
    """Complete MODEL: short names, then paths."""
    from .report import SHORT_NAMES

    names = [n for n in SHORT_NAMES if n.startswith(incomplete)]
    base = Path(incomplete).expanduser()
    parent = base if incomplete.endswith("/") else base.parent
    try:
        entries = sorted(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        entries = []
    for e in entries:
        text = str(e) if str(parent) != "." or incomplete.startswith("./") else e.name
        if text.startswith(incomplete) and (e.is_dir() or e.suffix == ".safetensors"):
            names.append(text + ("/" if e.is_dir() else ""))
    return names


@app.command(
    epilog="Examples:\n\n"
    "  pelt inspect minilm --summary\n\n"
    "  pelt inspect ./llama --filter 'model.layers.0.*' --format json | jq '.total_params'\n\n"
    "  pelt inspect ./qwen2-audio --depth 2 --sort params:desc --limit 5\n\n"
    "Exit codes: 0 ok (also when stdout closes early, e.g. '| head'); 1 runtime failure; 2 bad input.",
)
def inspect(
    model: Annotated[
        str,
        typer.Argument(
            help="A checkpoint directory, a .safetensors file, a short name (minilm), or - to read the path "
            "from stdin.",
            autocompletion=complete_model,
            show_default=False,
        ),
    ],
    summary: Annotated[
        bool, typer.Option("--summary", "-s", help="Totals per dtype, role, block and layer.", rich_help_panel="Output")
    ] = False,
    include: Annotated[
        list[str] | None,
        typer.Option("--filter", "-f", help="Keep tensors whose name (glob, {a,b}) or role matches; repeatable.",
                     rich_help_panel="Input"),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", "-x", help="Drop tensors whose name or role matches; repeatable.",
                     rich_help_panel="Input"),
    ] = None,
    depth: Annotated[
        int | None,
        typer.Option("--depth", "-d", help="Roll tensors up to their first N name segments.", rich_help_panel="Output"),
    ] = None,
    sort: Annotated[
        str | None,
        typer.Option("--sort", help="KEY[:desc], KEY in name, params, bytes, role, layer, dtype.",
                     rich_help_panel="Output"),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-n", help="Show the first N rows.", rich_help_panel="Output")
    ] = None,
    fmt: Annotated[
        Format | None,
        typer.Option("--format", help="Output format [default: table on a terminal, tsv in a pipe].",
                     rich_help_panel="Output", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.", rich_help_panel="Output")] = False,
) -> None:
    """Show a checkpoint's tensors with role, layer, dtype, shape, params and bytes, read from headers only."""
    from . import console
    from .report import inspect_checkpoint, resolve_model

    path = resolve_model(model)
    chosen = "json" if as_json else (fmt.value if fmt else console.default_format())
    if (path / "run.json").is_file():
        from .apply import run_report

        with console.closed_pipe_ok():
            console.emit_run(run_report(path), chosen)
        return
    report = inspect_checkpoint(path, include=include, exclude=exclude, depth=depth, sort=sort, limit=limit)
    if report["family"] is None:
        console.info(f"note: {path}: model family not recognised, roles are 'unknown'")
    with console.closed_pipe_ok():
        console.emit_inspect(report, chosen, summary)


OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Recipe overrides: KEY=VALUE (YAML value) or ~KEY to delete, e.g. inserts.0.params.rank=16.",
                   show_default=False),
]
RecipeArg = Annotated[
    str, typer.Argument(help="A recipe file or a bundled recipe name (pelt recipes ls).", show_default=False,
                        autocompletion=lambda incomplete: complete_recipe(incomplete)),
]


def complete_recipe(incomplete: str) -> list[str]:
    """Complete RECIPE: bundled names, then .yaml paths."""
    from .bundled import bundled

    names = [n for n in bundled() if n.startswith(incomplete)]
    return names + [p for p in complete_model(incomplete) if p.endswith((".yaml", ".yml", "/"))]


@app.command(
    epilog="Examples:\n\n"
    "  pelt apply unipelt minilm --dry-run\n\n"
    "  pelt apply lora ./llama -o runs/lora inserts.0.params.rank=16\n\n"
    "  pelt apply recipes/lora.yaml minilm -o runs/a | pelt inspect -\n\n"
    "Prints the run directory on stdout. Exit codes: 0 ok; 1 runtime failure; 2 bad recipe, model or option.",
)
def apply(
    recipe: RecipeArg,
    model: Annotated[str, typer.Argument(help="Base checkpoint: directory, .safetensors file, short name, or -.",
                                         autocompletion=complete_model, show_default=False)],
    overrides: OverridesArg = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to write (must not exist) "
                                             "[default: runs/RECIPE-TIMESTAMP].", rich_help_panel="Output")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print the plan (sites, new parameters) and "
                                          "write nothing.", rich_help_panel="Output")] = False,
    fmt: Annotated[Format | None, typer.Option("--format", help="Plan format for --dry-run [default: table on a "
                                               "terminal, tsv in a pipe].", rich_help_panel="Output",
                                               show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run directory.",
                                        rich_help_panel="Dangerous")] = False,
) -> None:
    """Insert PEFT modules where a recipe says and write a run directory that references the base."""
    from . import console
    from .apply import apply as do_apply
    from .apply import plan
    from .recipe import load
    from .report import resolve_model

    base = resolve_model(model)
    rec = load(recipe, overrides or [])
    if dry_run:
        with console.closed_pipe_ok():
            console.emit_plan(plan(rec, base).to_dict(), fmt.value if fmt else console.default_format())
        return
    run_dir = do_apply(rec, base, out or default_run_dir(rec.name), force=force)
    console.info(f"wrote {run_dir}")
    with console.closed_pipe_ok():
        print(run_dir)


@app.command(epilog="Examples:\n\n  pelt validate recipes/unipelt.yaml\n\n  pelt validate lora ./llama "
             "inserts.0.params.rank=64")
def validate(
    recipe: RecipeArg,
    model: Annotated[str | None, typer.Argument(help="Also check the recipe against this checkpoint (headers and "
                                                "config; no weights are loaded).", autocompletion=complete_model,
                                                show_default=False)] = None,
    overrides: OverridesArg = None,
) -> None:
    """Check a recipe: schema, types and ranges, and, given a MODEL, that every target matches and fits."""
    from . import console
    from .apply import plan
    from .recipe import load
    from .report import resolve_model

    if model is not None and "=" in model:
        overrides, model = [model, *(overrides or [])], None
    rec = load(recipe, overrides or [])
    if model is None:
        console.info(f"ok: {rec.source}: {len(rec.inserts)} insert(s) valid")
        return
    p = plan(rec, resolve_model(model))
    console.info(f"ok: {rec.source} on {p.base}: {len(p.rows)} site(s), {p.new_params:,} new parameters "
                 f"({100 * p.new_params / max(p.base_params, 1):.3f}% of {p.base_params:,})")


recipes_app = typer.Typer(help="Bundled recipes: list, show, copy.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("ls")
def recipes_ls() -> None:
    """List the bundled recipes with their descriptions."""
    from . import console
    from .bundled import bundled, description

    with console.closed_pipe_ok():
        for name, path in bundled().items():
            print(f"{name}\t{description(path)}")


@recipes_app.command("cat")
def recipes_cat(name: RecipeArg) -> None:
    """Print a bundled recipe."""
    from . import console
    from .bundled import find_recipe

    with console.closed_pipe_ok():
        sys.stdout.write(find_recipe(name).read_text(encoding="utf-8"))


@recipes_app.command("cp")
def recipes_cp(
    name: RecipeArg,
    dest: Annotated[Path, typer.Argument(help="Destination file or directory.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a bundled recipe to edit it."""
    from .bundled import find_recipe
    from .errors import OutputExistsError

    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists", hint="pass --force to overwrite")
    tmp = target.with_name(f".{target.name}.pelt-tmp")
    tmp.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    os.replace(tmp, target)
    print(target)


def default_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS`` (with a counter if that exists): where ``pelt apply`` writes without -o."""
    import time

    stem = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return out


def _run_arg(value: str) -> Path:
    from .report import resolve_model

    return resolve_model(value)


@app.command(
    epilog="Examples:\n\n"
    "  pelt apply unipelt minilm -o runs/u && pelt train runs/u --data vader --epochs 1\n\n"
    "  pelt train runs/lora --data train.jsonl --eval dev.jsonl --lr 5e-4 --schedule cosine\n\n"
    "  pelt apply r.yaml base -o run | pelt train - --data d.jsonl | pelt gates -\n\n"
    "Prints the run directory on stdout. Exit codes: 0 ok; 1 training failed (non-finite loss: the run keeps "
    "its last good checkpoint); 2 bad data, run or option; 130 interrupted.",
)
def train(
    run: Annotated[str, typer.Argument(help="Run directory from pelt apply, or - to read it from stdin.",
                                       show_default=False, autocompletion=complete_model)],
    data: Annotated[str, typer.Option("--data", help="Training data: JSONL, CSV or TSV, or a built-in dataset "
                                      "(vader).", rich_help_panel="Input", show_default=False)],
    eval_data: Annotated[str | None, typer.Option("--eval", help="Eval data (default: the built-in eval split, "
                                                  "else --eval-fraction of --data).", rich_help_panel="Input")] = None,
    task: Annotated[str | None, typer.Option("--task", help="text-classification, pair-classification, causal-lm, "
                                             "audio-classification or domain-matching (default: from the columns).",
                                             rich_help_panel="Input")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer directory if the base has none.",
                                                  rich_help_panel="Input")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Epochs.", rich_help_panel="Training")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", rich_help_panel="Training")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of the inserted modules.",
                                      rich_help_panel="Training")] = 1e-3,
    gate_lr: Annotated[float | None, typer.Option("--gate-lr", help="Learning rate of gates [default: --lr].",
                                                  rich_help_panel="Training")] = None,
    scale_lr: Annotated[float, typer.Option("--scale-lr", help="Learning rate of the domain adapter's scale.",
                                            rich_help_panel="Training")] = 1e-3,
    schedule: Annotated[str, typer.Option("--schedule", help="linear, cosine or constant (after warm-up).",
                                          rich_help_panel="Training")] = "linear",
    warmup: Annotated[float, typer.Option("--warmup", help="Warm-up: a fraction of the steps (<1) or a step count.",
                                          rich_help_panel="Training")] = 0.06,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Gradient accumulation steps.",
                                            rich_help_panel="Training")] = 1,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping (0: off).",
                                                 rich_help_panel="Training")] = 1.0,
    patience: Annotated[int, typer.Option("--patience", help="Early stopping patience in epochs (0: off).",
                                          rich_help_panel="Training")] = 3,
    gate_warmup: Annotated[int, typer.Option("--gate-warmup", help="Steps with gates frozen.",
                                             rich_help_panel="Gates")] = 0,
    gate_sparsity: Annotated[str, typer.Option("--gate-sparsity", help="none, entropy or l1.",
                                               rich_help_panel="Gates")] = "none",
    gate_lambda: Annotated[float, typer.Option("--gate-lambda", help="Weight λ of the sparsity term.",
                                               rich_help_panel="Gates")] = 0.01,
    gate_temperature: Annotated[float | None, typer.Option("--gate-temperature", help="Override the gates' T.",
                                                           rich_help_panel="Gates")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps.",
                                                  rich_help_panel="Training")] = None,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Also evaluate every N optimizer steps (0: only "
                                            "at epoch ends).", rich_help_panel="Training")] = 0,
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of --data held out when there is "
                                                 "no --eval.", rich_help_panel="Input")] = 0.1,
    max_length: Annotated[int, typer.Option("--max-length", help="Truncate token sequences to this length.",
                                            rich_help_panel="Input")] = 128,
    head_lr: Annotated[float | None, typer.Option("--head-lr", help="Learning rate of the task head [default: "
                                                  "--lr].", rich_help_panel="Training")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on the domain "
                                                "adapter's scale).", rich_help_panel="Training")] = 0.01,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel="Training")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.",
                                        rich_help_panel="Memory/Performance")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last epoch checkpoint.",
                                         rich_help_panel="Training")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress on stderr.", rich_help_panel="Output")]
    = False,
) -> None:
    """Train only what was inserted (plus a task head where needed); evaluate each epoch; record every gate."""
    from . import console
    from .train import TrainConfig, train_run

    run_dir = _run_arg(run)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, gate_lr=gate_lr, scale_lr=scale_lr,
                      schedule=schedule, warmup=warmup, grad_accum=grad_accum, max_grad_norm=max_grad_norm,
                      patience=patience, gate_warmup=gate_warmup, gate_sparsity=gate_sparsity,
                      gate_lambda=gate_lambda, gate_temperature=gate_temperature, max_steps=max_steps, seed=seed,
                      task=task, device=device, eval_every=eval_every, eval_fraction=eval_fraction,
                      max_length=max_length, head_lr=head_lr, weight_decay=weight_decay)
    progress = console.TrainProgress(quiet=quiet)
    try:
        train_run(run_dir, data, eval_data, cfg, resume=resume, tokenizer=tokenizer, on_event=progress)
    finally:
        progress.close()
    if int(os.environ.get("RANK", "0")) == 0:
        with console.closed_pipe_ok():
            print(run_dir)


@app.command(epilog="Examples:\n\n  pelt gates runs/u\n\n  pelt gates runs/u --format json | jq .layers\n\n"
             "  pelt gates runs/u --png gates.png   (needs matplotlib)")
def gates(
    run: Annotated[str, typer.Argument(help="Run directory, or - to read it from stdin.", show_default=False,
                                       autocompletion=complete_model)],
    fmt: Annotated[Format | None, typer.Option("--format", help="table, json, jsonl or tsv.",
                                               rich_help_panel="Output", show_default=False)] = None,
    png: Annotated[Path | None, typer.Option("--png", help="Also write a heatmap (layers × modules) to this PNG.",
                                             rich_help_panel="Output")] = None,
) -> None:
    """Show each gate's mean, std, min and max per layer after training, with a bar per gate."""
    from . import console
    from . import gates as gatestats
    from .errors import CheckpointError

    run_dir = _run_arg(run)
    doc = gatestats.read(run_dir)
    if doc is None:
        raise CheckpointError(f"{run_dir}: no gate statistics (gates.json)",
                              hint="pelt train writes them for runs with gated modules (unipelt, domain)")
    if png is not None:
        gatestats.heatmap(doc, png)
        console.info(f"wrote {png}")
    with console.closed_pipe_ok():
        console.emit_gates(doc, gatestats.rows(doc), fmt.value if fmt else console.default_format())


class Per(str, Enum):
    """Groups for --keep-top-k."""

    method = "method"
    layer = "layer"


@app.command(
    epilog="Examples:\n\n"
    "  pelt prune runs/u --dry-run\n\n"
    "  pelt prune runs/u --threshold 0.05 -o runs/u-pruned --data vader\n\n"
    "  pelt prune runs/u --keep-top-k 2 --per layer\n\n"
    "  pelt prune runs/u --restore\n\n"
    "Prints the run directory on stdout. Exit codes: 0 ok; 1 runtime failure; 2 no gate statistics, bad option.",
)
def prune(
    run: Annotated[str, typer.Argument(help="Trained run directory, or - to read it from stdin.", show_default=False,
                                       autocompletion=complete_model)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the pruned run here [default: prune RUN in "
                                             "place, atomically].", rich_help_panel="Output")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", "-t", help="Prune modules whose mean gate is "
                                                    "below θ [default: 0.05].", show_default=False)] = None,
    keep_top_k: Annotated[int | None, typer.Option("--keep-top-k", "-k", help="Keep only the K modules with the "
                                                   "highest mean gate.", show_default=False)] = None,
    per: Annotated[Per | None, typer.Option("--per", help="With --keep-top-k: K per method or per layer "
                                            "[default: K in all].", show_default=False)] = None,
    data: Annotated[str | None, typer.Option("--data", help="Evaluate before and after on this data (a file, or a "
                                             "built-in dataset's eval split).", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="Print every gated module, its mean gate and the "
                                          "decision; write nothing.", rich_help_panel="Output")] = False,
    restore: Annotated[bool, typer.Option("--restore", help="Bring back every pruned module.")] = False,
    fmt: Annotated[Format | None, typer.Option("--format", help="Format of --dry-run's table.",
                                               rich_help_panel="Output", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing -o directory.",
                                        rich_help_panel="Dangerous")] = False,
) -> None:
    """Remove the gated modules (UniPELT's LoRA/Prefix/Adapter per layer, domain adapters) whose gate is low."""
    from . import console
    from .prune import prune_run, restore_run

    run_dir = _run_arg(run)
    if restore:
        if threshold is not None or keep_top_k is not None or dry_run:
            raise UsageError("--restore takes no --threshold, --keep-top-k or --dry-run")
        rep = restore_run(run_dir, out, force=force).to_dict()
        console.info(f"restored {len(rep['units'])} module(s), {-rep['pruned_params']:,} parameters → {rep['out']}")
    else:
        rep = prune_run(run_dir, out, threshold=threshold, keep_top_k=keep_top_k, per=per.value if per else None,
                        dry_run=dry_run, data=data, force=force).to_dict()
        if dry_run:
            with console.closed_pipe_ok():
                console.emit_prune(rep, fmt.value if fmt else console.default_format())
            return
        console.info(console.prune_summary(rep) + f" → {rep['out']}")
        if rep["evaluation"]:
            console.info(console.evaluation_change(rep["evaluation"]))
    with console.closed_pipe_ok():
        print(rep["out"])


@app.command(
    epilog="Examples:\n\n"
    "  pelt merge runs/lora -o merged/ --verify\n\n"
    "  pelt merge runs/u -o merged/ --freeze-gates mean --keep-unmerged\n\n"
    "  pelt merge runs/lora -o merged/ --dtype bfloat16 --max-shard-size 5GB\n\n"
    "Prints the output directory on stdout. Exit codes: 0 ok; 1 runtime failure; 2 modules that cannot be folded, "
    "wrong base, bad option.",
)
def merge(
    run: Annotated[str, typer.Argument(help="Run directory, or - to read it from stdin.", show_default=False,
                                       autocompletion=complete_model)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged checkpoint directory to write (must not exist).",
                                      show_default=False, rich_help_panel="Output")],
    dtype: Annotated[str | None, typer.Option("--dtype", help="Output dtype: float32, bfloat16 or float16 "
                                              "[default: the base's].", show_default=False)] = None,
    max_shard_size: Annotated[str | None, typer.Option("--max-shard-size", help="Re-shard, e.g. 5GB or 500MB "
                                                       "[default: keep the base's shards].",
                                                       show_default=False)] = None,
    freeze_gates: Annotated[str | None, typer.Option("--freeze-gates", help="mean: fold UniPELT's gated LoRA with "
                                                     "each gate at its eval mean (approximate; the error is "
                                                     "printed).", show_default=False)] = None,
    data: Annotated[str | None, typer.Option("--data", help="With --freeze-gates mean: take the gate means from "
                                             "this data (a file or a built-in dataset's eval split) instead of "
                                             "the run's gates.json.", show_default=False)] = None,
    keep_unmerged: Annotated[bool, typer.Option("--keep-unmerged", help="Write modules that cannot be folded "
                                                "(adapter, prefix, domain, head) as a run in OUT/pelt-rest.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Run base+modules and the merged model on sample inputs "
                                         "and print max |Δ|.")] = False,
    base: Annotated[Path | None, typer.Option("--base", help="Another location of the run's base.",
                                              show_default=False)] = None,
    no_fingerprint_check: Annotated[bool, typer.Option("--no-fingerprint-check", help="Accept a base whose content "
                                                       "differs from the run's.", rich_help_panel="Dangerous")]
    = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.",
                                        rich_help_panel="Dangerous")] = False,
) -> None:
    """Fold LoRA and IA³ into the base weights, streaming, into a checkpoint plain transformers loads."""
    from . import console
    from .checkpoint import parse_size
    from .merge import merge_run, verify_merge

    run_dir = _run_arg(run)
    size = parse_size(max_shard_size) if max_shard_size else None
    stats = None
    if data is not None:
        if freeze_gates != "mean":
            raise UsageError("--data gives gate means for --freeze-gates mean; pass both")
        from .prune import measure_run

        stats = measure_run(run_dir, data)[1]
    rep = merge_run(run_dir, out, dtype=dtype, max_shard_size=size, freeze_gates=freeze_gates,
                    keep_unmerged=keep_unmerged, force=force, base=base, check_fingerprint=not no_fingerprint_check,
                    gate_stats=stats)
    console.info(console.merge_summary(rep.to_dict()))
    if verify or rep.approximate:
        delta = verify_merge(run_dir, out)
        what = "gates frozen at their means" if rep.approximate else "verify"
        console.info(f"{what}: max |Δ| = {delta:.3g} between {run_dir} (base + modules) and {out}"
                     f"{' (+ pelt-rest)' if rep.rest else ''} on sample inputs")
    with console.closed_pipe_ok():
        print(out)


@app.command(
    epilog="Examples:\n\n"
    "  pelt export runs/lora -o bundles/lora\n\n"
    "  pelt export runs/lora -o bundles/lora --peft   (also loadable by peft.PeftModel.from_pretrained)\n\n"
    "  pelt export runs/u -o - | ssh host 'tar -x -C bundle'\n\n"
    "Prints the bundle directory on stdout (with -o -, the tar stream). Exit codes: 0 ok; 1 runtime failure; 2 bad "
    "run or option.",
)
def export(
    run: Annotated[str, typer.Argument(help="Run directory, or - to read it from stdin.", show_default=False,
                                       autocompletion=complete_model)],
    out: Annotated[str, typer.Option("--out", "-o", help="Bundle directory to write, or - for a tar on stdout.",
                                     show_default=False, rich_help_panel="Output")],
    peft: Annotated[bool, typer.Option("--peft", help="Also write a PEFT adapter (adapter_config.json + "
                                       "adapter_model.safetensors) for LoRA-only or IA³-only runs.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing bundle directory.",
                                        rich_help_panel="Dangerous")] = False,
) -> None:
    """Write a diffed bundle: only the tensors that differ from the base, and a manifest with checksums."""
    from . import console
    from .bundle import export_bundle

    run_dir = _run_arg(run)
    if out == "-":
        if sys.stdout.isatty():
            raise UsageError("-o - writes a tar stream to stdout, which is a terminal", hint="pipe or redirect it")
        manifest = export_bundle(run_dir, "-", stream=sys.stdout.buffer, peft=peft)
    else:
        manifest = export_bundle(run_dir, out, force=force, peft=peft)
    console.info(console.bundle_summary(manifest, out))
    if out != "-":
        with console.closed_pipe_ok():
            print(out)


@app.command(
    "apply-bundle",
    epilog="Examples:\n\n"
    "  pelt apply-bundle bundles/lora minilm -o runs/lora\n\n"
    "  pelt apply-bundle bundle.tar ./llama -o merged/ --merge\n\n"
    "Exit codes: 0 ok; 1 runtime failure; 2 a base whose fingerprint differs (without --force), bad bundle.",
)
def apply_bundle_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory or tar (from pelt export).", show_default=False)],
    model: Annotated[str, typer.Argument(help="Base checkpoint: directory, .safetensors file, short name, or -.",
                                         autocompletion=complete_model, show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (or with --merge, merged checkpoint) to "
                                      "write.", show_default=False, rich_help_panel="Output")],
    merge_out: Annotated[bool, typer.Option("--merge", help="Write the merged model instead of a run (LoRA/IA³; "
                                            "other modules go to OUT/pelt-rest).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Accept a base whose fingerprint differs (warns), and "
                                        "replace an existing output.", rich_help_panel="Dangerous")] = False,
) -> None:
    """Rebuild a run (or the merged model) from a bundle and its base; refuses a different base."""
    import tempfile

    from . import console
    from .apply import read_run
    from .bundle import apply_bundle
    from .report import resolve_model

    base = resolve_model(model)
    if not merge_out:
        run_dir = apply_bundle(bundle, base, out, force=force)
        meta = read_run(run_dir)
        if meta["base"]["fingerprint"] != meta["from_bundle"]["base_fingerprint"]:
            console.info(f"warning: {base} is not the base the bundle was exported from (--force); the run's "
                         "outputs may differ from the exported run's")
    else:
        from .merge import merge_run

        with tempfile.TemporaryDirectory(prefix="pelt-bundle-run-") as tmp:
            run_dir = apply_bundle(bundle, base, Path(tmp) / "run", force=force)
            rep = merge_run(run_dir, out, keep_unmerged=True, force=force)
            console.info(console.merge_summary(rep.to_dict()))
        run_dir = out
    console.info(f"wrote {run_dir}")
    with console.closed_pipe_ok():
        print(run_dir)


@app.command(
    "import-peft",
    epilog="Examples:\n\n  pelt import-peft ./my-lora ./llama -o runs/imported && pelt merge runs/imported -o m/\n\n"
    "Exit codes: 0 ok; 1 runtime failure; 2 an adapter pelt cannot express (DoRA, biases, modules_to_save, …).",
)
def import_peft_cmd(
    adapter: Annotated[Path, typer.Argument(help="PEFT adapter directory (adapter_config.json + "
                                            "adapter_model.safetensors).", show_default=False)],
    model: Annotated[str, typer.Argument(help="Its base checkpoint: directory, short name, or -.",
                                         autocompletion=complete_model, show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.", show_default=False,
                                      rich_help_panel="Output")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run directory.",
                                        rich_help_panel="Dangerous")] = False,
) -> None:
    """Bring an existing PEFT LoRA or IA³ adapter into a pelt run directory."""
    from . import console
    from .peft_format import import_peft
    from .report import resolve_model

    run_dir = import_peft(adapter, resolve_model(model), out, force=force)
    console.info(f"wrote {run_dir}")
    with console.closed_pipe_ok():
        print(run_dir)


@app.command(epilog="Examples:\n\n  pelt completion bash > ~/.local/share/bash-completion/completions/pelt\n\n"
             "  pelt completion fish > ~/.config/fish/completions/pelt.fish")
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print the shell completion script (the same as the files in completions/)."""
    from typer._completion_shared import get_completion_script

    from . import console

    with console.closed_pipe_ok():
        sys.stdout.write(get_completion_script(prog_name="pelt", complete_var="_PELT_COMPLETE", shell=shell.value))
        sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map errors to one line on stderr and an exit code.

    Exit codes: 0 ok (including a closed pipe on stdout), 1 runtime failure, 2 usage or bad input, 130 Ctrl-C.
    """
    from . import console

    debug = os.environ.get("PELT_DEBUG") == "1"
    try:
        command = typer.main.get_command(app)
        rv = command.main(args=argv, prog_name="pelt", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except RecipeError as e:
        if debug:
            raise
        for problem in e.problems:
            console.error(problem)
        if e.hint:
            console.info(f"hint: {e.hint}")
        code = e.exit_code
    except PeltError as e:
        if debug:
            raise
        console.error(e.message, e.hint)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except _cx.ClickException as e:
        e.show()
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # stdout was closed early (e.g. `pelt inspect m | head`): not an error; silence the flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except OSError as e:
        if debug:
            raise
        console.error(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
        code = 1
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return code


def run() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    run()
