"""The ``pelt`` command line: parse, call the library, print. torch and transformers load inside commands only.

Each command is a thin function: resolve its arguments, call one library function, hand the result to
:mod:`pelt_cli.console`. Arguments and options used by several commands are declared once, as ``Annotated`` aliases
(``RunArg``, ``ModelArg``, ``ForceOpt``, ``FormatOpt``, ``OutOpt``, …); choices are enums. :func:`main` maps errors to
one line on stderr and an exit code, and treats a closed stdout (``pelt … | head``) as success.
"""

import os
import re
import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

try:  # typer >= 0.2x vendors its own click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as _cx

from pelt_cli import __version__
from pelt_cli.errors import PeltError, RecipeError, UsageError

if TYPE_CHECKING:
    from pelt_cli.train_config import TrainConfig

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

# ------------------------------------------------------------------------------------------------ choices


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


class Per(str, Enum):
    """Groups for ``pelt prune --keep-top-k``."""

    method = "method"
    layer = "layer"


class By(str, Enum):
    """What ``pelt prune`` ranks units by (:data:`pelt_cli.prune.BY`)."""

    gate = "gate"
    contribution = "contribution"


class FreezeGates(str, Enum):
    """How ``pelt merge`` folds gated LoRA."""

    mean = "mean"


class Dtype(str, Enum):
    """Output dtypes of ``pelt merge`` (the names :data:`pelt_cli.merge.DTYPE_CODES` accepts)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    fp64 = "fp64"
    half = "half"
    float_ = "float"


class Task(str, Enum):
    """Training tasks (:data:`pelt_cli.data.TASKS`)."""

    text_classification = "text-classification"
    pair_classification = "pair-classification"
    causal_lm = "causal-lm"
    audio_classification = "audio-classification"
    domain_matching = "domain-matching"
    speech_to_text = "speech-to-text"


class Schedule(str, Enum):
    """Learning-rate schedules after warm-up."""

    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class GateSparsity(str, Enum):
    """Sparsity terms on the gates."""

    none = "none"
    entropy = "entropy"
    l1 = "l1"


class EarlyStopOn(str, Enum):
    """What ``pelt train``'s early stopping and best checkpoint follow."""

    metric = "metric"
    loss = "loss"


class ClassWeights(str, Enum):
    """Per-class weights of the training cross-entropy."""

    none = "none"
    auto = "auto"


class Device(str, Enum):
    """Where ``pelt train`` runs."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    """The autocast dtype of ``pelt train``'s forward."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class BaseDtype(str, Enum):
    """The dtype ``pelt train`` holds the frozen base in."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


# ------------------------------------------------------------------------------------------------ completion


def complete_model(incomplete: str) -> list[str]:
    """Complete MODEL: short names, Hub ids in the local cache, then paths."""
    from pelt_cli.hub import cached_ids
    from pelt_cli.report import SHORT_NAMES

    names = [n for n in SHORT_NAMES if n.startswith(incomplete)] + cached_ids(incomplete)
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


def complete_recipe(incomplete: str) -> list[str]:
    """Complete RECIPE: bundled names, then .yaml paths."""
    from pelt_cli.bundled import bundled

    names = [n for n in bundled() if n.startswith(incomplete)]
    return names + [p for p in complete_model(incomplete) if p.endswith((".yaml", ".yml", "/"))]


# ------------------------------------------------------------------------------------------------ parameters
# Declared once, used by name in the commands' signatures.

RunArg = Annotated[
    str,
    typer.Argument(
        help="Run directory from pelt apply, or - to read it from stdin.",
        show_default=False,
        autocompletion=complete_model,
    ),
]
ModelArg = Annotated[
    str,
    typer.Argument(
        help="Base checkpoint: directory, .safetensors file, short name (minilm), Hub id org/name[@revision] in the "
        "local Hugging Face cache, or - to read the path from stdin.",
        autocompletion=complete_model,
        show_default=False,
    ),
]
RecipeArg = Annotated[
    str,
    typer.Argument(
        help="A recipe file or a bundled recipe name (pelt recipes ls).",
        show_default=False,
        autocompletion=complete_recipe,
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Recipe overrides: KEY=VALUE (YAML value) or ~KEY to delete, e.g. inserts.0.params.rank=16.",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        help="Directory to write (must not exist, unless --force).",
        show_default=False,
        rich_help_panel="Output",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.", rich_help_panel="Dangerous")]
FormatOpt = Annotated[
    Format | None,
    typer.Option(
        "--format",
        help="Output format [default: table on a terminal, tsv in a pipe].",
        rich_help_panel="Output",
        show_default=False,
    ),
]


def _opt(panel: str | None, help: str, *decls: str) -> Any:
    """An option in a help panel; its name defaults to the parameter's (``batch_size`` → ``--batch-size``)."""
    return typer.Option(*decls, help=help, rich_help_panel=panel)


def _version(value: bool) -> None:
    if value:
        print(f"pelt {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[
    bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
]
VerboseOpt = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="More detail on stderr (-vv: also transformers' logs).")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only errors and warnings on stderr: no progress, no info lines.")
]


@app.callback()
def main_callback(version: VersionOpt = False, verbose: VerboseOpt = 0, quiet: QuietOpt = False) -> None:
    """pelt: PEFT model surgery from the shell."""
    from pelt_cli import console

    console.set_verbosity(console.QUIET if quiet else console.NORMAL + verbose)


# ------------------------------------------------------------------------------------------------ inspect

InspectArg = Annotated[
    str,
    typer.Argument(
        help="A checkpoint directory, a .safetensors file, a short name (minilm), a Hub id org/name[@revision] "
        "(from the local cache, else its headers over HTTP), a run directory, or - to read the path from stdin.",
        autocompletion=complete_model,
        show_default=False,
    ),
]
VerifyCkptOpt = Annotated[
    bool,
    _opt(
        "Input",
        "Check everything but the weights' values: headers, layout, shard index, config.json, and that every tensor "
        "the config's model needs is there with its shape (on a meta skeleton; nothing is loaded).",
        "--verify",
    ),
]
SummaryOpt = Annotated[bool, _opt("Output", "Totals per dtype, role, block and layer.", "--summary", "-s")]
FilterOpt = Annotated[
    list[str] | None,
    _opt("Input", "Keep tensors whose name (glob, {a,b}) or role matches; repeatable.", "--filter", "-f"),
]
ExcludeOpt = Annotated[
    list[str] | None, _opt("Input", "Drop tensors whose name or role matches; repeatable.", "--exclude", "-x")
]
DepthOpt = Annotated[int | None, _opt("Output", "Roll tensors up to their first N name segments.", "--depth", "-d")]
SortOpt = Annotated[str | None, _opt("Output", "KEY[:desc], KEY in name, params, bytes, role, layer, dtype.", "--sort")]
LimitOpt = Annotated[int | None, _opt("Output", "Show the first N rows.", "--limit", "-n")]
JsonOpt = Annotated[bool, _opt("Output", "Same as --format json.", "--json")]


@app.command(
    epilog="Examples:\n\n"
    "  pelt inspect minilm --summary\n\n"
    "  pelt inspect ./llama --filter 'model.layers.0.*' --format json | jq '.total_params'\n\n"
    "  pelt inspect ./qwen2-audio --depth 2 --sort params:desc --limit 5\n\n"
    "  pelt inspect Qwen/Qwen2-0.5B@main --summary   (cache, else headers over HTTP)\n\n"
    "Exit codes: 0 ok (also when stdout closes early, e.g. '| head'); 1 runtime failure; 2 bad input.",
)
def inspect(
    model: InspectArg,
    summary: SummaryOpt = False,
    include: FilterOpt = None,
    exclude: ExcludeOpt = None,
    depth: DepthOpt = None,
    sort: SortOpt = None,
    limit: LimitOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    verify: VerifyCkptOpt = False,
) -> None:
    """Show a checkpoint's tensors with role, layer, dtype, shape, params and bytes, read from headers only."""
    from pelt_cli import console
    from pelt_cli.report import inspect_checkpoint, resolve_source, verify_checkpoint

    path = resolve_source(model)
    if isinstance(path, Path) and str(path) != str(Path(model)):
        console.detail(f"{model} → {path}")
    chosen = _format(Format.json if as_json else fmt)
    if isinstance(path, Path) and (path / "run.json").is_file():
        from pelt_cli.apply import run_report

        console.emit_run(run_report(path), chosen)
        return
    if verify:
        console.info(verify_checkpoint(path))
    report = inspect_checkpoint(path, include=include, exclude=exclude, depth=depth, sort=sort, limit=limit)
    if report["family"] is None:
        console.info(f"note: {report['path']}: no role table for this family; roles are inferred from its naming")
    console.emit_inspect(report, chosen, summary)


# ------------------------------------------------------------------------------------------------ apply, validate

RunOutOpt = Annotated[
    Path | None,
    _opt("Output", "Run directory to write (must not exist) [default: runs/RECIPE-TIMESTAMP].", "--out", "-o"),
]
PlanOpt = Annotated[
    bool, _opt("Output", "Print the plan (sites, new parameters) and write nothing.", "--dry-run", "-n")
]
CheckModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Also check the recipe against this checkpoint (headers and config; no weights are loaded).",
        autocompletion=complete_model,
        show_default=False,
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  pelt apply unipelt minilm --dry-run\n\n"
    "  pelt apply lora ./llama -o runs/lora inserts.0.params.rank=16\n\n"
    "  pelt apply recipes/lora.yaml minilm -o runs/a | pelt inspect -\n\n"
    "Prints the run directory on stdout. Exit codes: 0 ok; 1 runtime failure; 2 bad recipe, model or option.",
)
def apply(
    recipe: RecipeArg,
    model: ModelArg,
    overrides: OverridesArg = None,
    out: RunOutOpt = None,
    dry_run: PlanOpt = False,
    fmt: FormatOpt = None,
    force: ForceOpt = False,
) -> None:
    """Insert PEFT modules where a recipe says and write a run directory that references the base."""
    from pelt_cli import console
    from pelt_cli.apply import apply as do_apply
    from pelt_cli.apply import plan
    from pelt_cli.recipe import load

    base = _path(model)
    rec = load(recipe, overrides or [])
    if dry_run:
        console.emit_plan(plan(rec, base).to_dict(), _format(fmt))
        return
    _wrote(do_apply(rec, base, out or default_run_dir(rec.name), force=force))


@app.command(
    epilog="Examples:\n\n  pelt validate recipes/unipelt.yaml\n\n  pelt validate lora ./llama inserts.0.params.rank=64"
)
def validate(recipe: RecipeArg, model: CheckModelArg = None, overrides: OverridesArg = None) -> None:
    """Check a recipe: schema, types and ranges, and, given a MODEL, that every target matches and fits."""
    from pelt_cli import console
    from pelt_cli.apply import plan
    from pelt_cli.recipe import load

    if model is not None and "=" in model:
        overrides, model = [model, *(overrides or [])], None
    rec = load(recipe, overrides or [])
    if model is None:
        console.info(f"ok: {rec.source}: {len(rec.inserts)} insert(s) valid")
        return
    p = plan(rec, _path(model))
    share = 100 * p.new_params / max(p.base_params, 1)
    console.info(
        f"ok: {rec.source} on {p.base}: {len(p.rows)} site(s), {p.new_params:,} new parameters "
        f"({share:.3f}% of {p.base_params:,})"
    )


# ------------------------------------------------------------------------------------------------ recipes

recipes_app = typer.Typer(help="Bundled recipes: list, show, copy.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
DestArg = Annotated[Path, typer.Argument(help="Destination file or directory.", show_default=False)]


@recipes_app.command("ls")
def recipes_ls(fmt: FormatOpt = None) -> None:
    """List the bundled recipes with their descriptions."""
    from pelt_cli import console
    from pelt_cli.bundled import bundled, description

    console.emit_recipes({name: description(path) for name, path in bundled().items()}, _format(fmt))


@recipes_app.command("cat")
def recipes_cat(name: RecipeArg) -> None:
    """Print a bundled recipe."""
    from pelt_cli.bundled import find_recipe

    sys.stdout.write(find_recipe(name).read_text(encoding="utf-8"))


@recipes_app.command("cp")
def recipes_cp(name: RecipeArg, dest: DestArg, force: ForceOpt = False) -> None:
    """Copy a bundled recipe to edit it."""
    from pelt_cli.bundled import find_recipe
    from pelt_cli.errors import OutputExistsError
    from pelt_cli.io.atomic import write_text_atomic

    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists", hint="pass --force to overwrite")
    write_text_atomic(target, src.read_text(encoding="utf-8"))
    print(target)


# ------------------------------------------------------------------------------------------------ train

TRAINING, GATES, INPUT = "Training", "Gates", "Input"
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Training data: JSONL, CSV or TSV, or a built-in dataset (vader).",
        rich_help_panel=INPUT,
        show_default=False,
    ),
]
EvalOpt = Annotated[
    str | None, _opt(INPUT, "Eval data (default: the built-in eval split, else --eval-fraction of --data).", "--eval")
]
TokenizerOpt = Annotated[str | None, _opt(INPUT, "Tokenizer directory if the base has none.")]
ResumeOpt = Annotated[bool, _opt(TRAINING, "Continue from the last checkpoint.", "--resume")]
SaveEveryOpt = Annotated[
    int, _opt(TRAINING, "Also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends).")
]
TrainQuietOpt = Annotated[bool, _opt("Output", "No progress on stderr (the same as pelt -q).", "--quiet", "-q")]
StopOnOpt = Annotated[EarlyStopOn, _opt(TRAINING, "Early stopping follows the task's metric or the eval loss.")]
MinDeltaOpt = Annotated[float, _opt(TRAINING, "An epoch improves only by more than this.")]
NewHeadOpt = Annotated[bool, _opt(TRAINING, "Train a new classification head even where the base already has one.")]
LogEveryOpt = Annotated[
    int, _opt(TRAINING, "Log training loss, lr and gradient norms to metrics.jsonl every N steps (0: off).")
]
PERF = "Memory/Performance"
PrecisionOpt = Annotated[Precision, _opt(PERF, "Autocast the forward to bf16 or fp16 (fp16 with a gradient scaler).")]
BaseDtypeOpt = Annotated[
    BaseDtype, _opt(PERF, "Hold the frozen base in this dtype (auto: as stored); what trains stays fp32.")
]
GradCheckpointOpt = Annotated[
    bool, _opt(PERF, "Activation checkpointing on the blocks: less memory, one more forward.")
]
FsdpOpt = Annotated[bool, _opt(PERF, "Under torchrun, shard the model over the processes (FSDP2) instead of DDP.")]
ClassWeightsOpt = Annotated[ClassWeights, _opt(TRAINING, "auto: weight the training loss by inverse class frequency.")]
AutoPruneOpt = Annotated[
    float | None,
    _opt(
        GATES,
        "AutoPELT: every --window steps, switch off units whose contribution relative to the largest is below θ "
        "(0–1), back on when it recovers.",
        "--auto-prune",
    ),
]
WindowOpt = Annotated[
    int, _opt(GATES, "AutoPELT: steps each unit's contribution (mean gate × gradient norm) is averaged over.")
]


@app.command(
    epilog="Examples:\n\n"
    "  pelt apply unipelt minilm -o runs/u && pelt train runs/u --data vader --epochs 1\n\n"
    "  pelt train runs/lora --data train.jsonl --eval dev.jsonl --lr 5e-4 --schedule cosine\n\n"
    "  pelt apply r.yaml base -o run | pelt train - --data d.jsonl | pelt gates -\n\n"
    "Prints the run directory on stdout. Exit codes: 0 ok; 1 training failed (non-finite loss: the run keeps "
    "its last good checkpoint); 2 bad data, run or option; 130 interrupted.",
)
def train(
    ctx: typer.Context,
    run: RunArg,
    data: DataOpt,
    eval_data: EvalOpt = None,
    tokenizer: TokenizerOpt = None,
    resume: ResumeOpt = False,
    quiet: TrainQuietOpt = False,
    # The training settings: each parameter below is the pelt_cli.train.TrainConfig field of the same name.
    task: Annotated[Task | None, _opt(INPUT, "The task [default: from the data's columns].")] = None,
    new_head: NewHeadOpt = False,
    eval_fraction: Annotated[float, _opt(INPUT, "Share of --data held out when there is no --eval.")] = 0.1,
    max_length: Annotated[int, _opt(INPUT, "Truncate token sequences to this length.")] = 128,
    epochs: Annotated[int, _opt(TRAINING, "Epochs.")] = 3,
    batch_size: Annotated[int, _opt(TRAINING, "Batch size.", "--batch-size", "-b")] = 32,
    lr: Annotated[float, _opt(TRAINING, "Learning rate of the inserted modules.")] = 1e-3,
    gate_lr: Annotated[float | None, _opt(TRAINING, "Learning rate of gates [default: --lr].")] = None,
    scale_lr: Annotated[float, _opt(TRAINING, "Learning rate of the domain adapter's scale.")] = 1e-3,
    head_lr: Annotated[float | None, _opt(TRAINING, "Learning rate of the task head [default: --lr].")] = None,
    weight_decay: Annotated[float, _opt(TRAINING, "AdamW weight decay (not on the domain adapter's scale).")] = 0.01,
    schedule: Annotated[Schedule, _opt(TRAINING, "Learning-rate schedule after warm-up.")] = Schedule.linear,
    warmup: Annotated[float, _opt(TRAINING, "Warm-up: a fraction of the steps (<1) or a step count.")] = 0.06,
    grad_accum: Annotated[int, _opt(TRAINING, "Gradient accumulation steps.")] = 1,
    max_grad_norm: Annotated[float, _opt(TRAINING, "Gradient clipping (0: off).")] = 1.0,
    patience: Annotated[int, _opt(TRAINING, "Early stopping patience in epochs (0: off).")] = 3,
    early_stop_on: StopOnOpt = EarlyStopOn.metric,
    min_delta: MinDeltaOpt = 0.0,
    class_weights: ClassWeightsOpt = ClassWeights.none,
    max_steps: Annotated[int | None, _opt(TRAINING, "Stop after N optimizer steps.")] = None,
    save_every: SaveEveryOpt = 0,
    eval_every: Annotated[int, _opt(TRAINING, "Also evaluate every N optimizer steps (0: only at epoch ends).")] = 0,
    log_every: LogEveryOpt = 10,
    seed: Annotated[int, _opt(TRAINING, "Random seed.")] = 0,
    gate_warmup: Annotated[int, _opt(GATES, "Steps with gates frozen.")] = 0,
    gate_sparsity: Annotated[GateSparsity, _opt(GATES, "Sparsity term on the gates.")] = GateSparsity.none,
    gate_lambda: Annotated[float, _opt(GATES, "Weight λ of the sparsity term.")] = 0.01,
    gate_temperature: Annotated[float | None, _opt(GATES, "Override the gates' T.")] = None,
    auto_prune: AutoPruneOpt = None,
    window: WindowOpt = 1000,
    device: Annotated[Device, _opt("Memory/Performance", "Where to train.")] = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    base_dtype: BaseDtypeOpt = BaseDtype.auto,
    grad_checkpoint: GradCheckpointOpt = False,
    fsdp: FsdpOpt = False,
) -> None:
    """Train only what was inserted (plus a task head where needed); evaluate each epoch; record every gate."""
    cfg = train_config(locals())  # first, while locals() holds only the options
    given = given_options(ctx)  # these override the run recipe's train: section, which overrides the other options
    from pelt_cli import console

    if quiet:
        console.set_verbosity(console.QUIET)
    run_dir = _path(run)
    console.detail(f"options given: {', '.join(sorted(given)) or 'none'} (the recipe's train: section fills the rest)")
    _train_and_report(run_dir, data, eval_data, cfg, resume=resume, tokenizer=tokenizer, given=given)


def _train_and_report(run_dir: Path, data: str, eval_data: str | None, cfg: Any, **kw: Any) -> None:
    """``train_run`` with the progress display; then rank 0 prints the peak memory (stderr) and the run (stdout)."""
    from pelt_cli import console
    from pelt_cli.precision import describe_peak
    from pelt_cli.train import train_run

    progress = console.TrainProgress()
    try:
        res = train_run(run_dir, data, eval_data, cfg, on_event=progress, **kw)
    finally:
        progress.close()
    if int(os.environ.get("RANK", "0")) == 0:
        console.info(f"peak memory: {describe_peak(res.peak_memory)}")
        print(run_dir)


# ------------------------------------------------------------------------------------------------ gates, prune

PngOpt = Annotated[Path | None, _opt("Output", "Also write a heatmap (layers × modules) to this PNG.", "--png")]


@app.command(
    epilog="Examples:\n\n  pelt gates runs/u\n\n  pelt gates runs/u --format json | jq .layers\n\n"
    "  pelt gates runs/u --png gates.png   (needs matplotlib: pip install 'pelt[plot]')\n\n"
    "Exit codes: 0 ok; 1 --png without matplotlib (after the table); 2 no gates.json, no per-layer gates to plot."
)
def gates(run: RunArg, fmt: FormatOpt = None, png: PngOpt = None) -> None:
    """Show each gate's mean, std, min and max per layer after training, with a bar per gate, each layer's gate
    entropy, the mean gates of every epoch, and the guide's remedy hints where they apply."""
    from pelt_cli import console
    from pelt_cli import gates as gatestats
    from pelt_cli.errors import CheckpointError

    run_dir = _path(run)
    doc = gatestats.read(run_dir)
    if doc is None:
        raise CheckpointError(
            f"{run_dir}: no gate statistics (gates.json)",
            hint="pelt train writes them for runs with gated modules (unipelt, domain)",
        )
    hints, history = gatestats.hints(doc), gatestats.history_rows(doc)
    console.emit_gates(doc, gatestats.rows(doc), _format(fmt), history=history, hints=hints)
    if png is not None:  # after the table: without matplotlib the table is still printed, then one line, exit 1
        gatestats.heatmap(doc, png)
        console.info(f"wrote {png}")


ReportOutOpt = Annotated[
    str, _opt("Output", "HTML file to write (replaced atomically if it exists), or - for stdout.", "--out", "-o")
]


@app.command(
    epilog="Examples:\n\n  pelt report runs/u -o report.html\n\n  pelt report runs/u -o - > report.html\n\n"
    "One file: inline SVG charts and styles, no script, nothing fetched; opens offline. Prints the path written.\n\n"
    "Exit codes: 0 ok; 1 runtime failure; 2 not a run directory, unreadable run files."
)
def report(run: RunArg, out: ReportOutOpt) -> None:
    """Write a self-contained HTML report of a run: loss and metric curves, the gate heatmap, per-epoch gate
    histories and histograms, prune decisions against the parameter budget, and the inserted parameters."""
    from pelt_cli.html_report import render, write_report

    run_dir = _path(run)
    if out == "-":
        sys.stdout.write(render(run_dir))
        return
    _wrote(write_report(run_dir, out))


PruneOutOpt = Annotated[
    Path | None, _opt("Output", "Write the pruned run here [default: prune RUN in place, atomically].", "--out", "-o")
]
ThresholdOpt = Annotated[
    float | None, _opt(None, "Prune modules whose mean gate is below θ [default: 0.05].", "--threshold", "-t")
]
KeepTopKOpt = Annotated[
    int | None, _opt(None, "Keep only the K modules with the highest mean gate.", "--keep-top-k", "-k")
]
PerOpt = Annotated[Per | None, _opt(None, "With --keep-top-k: K per method or per layer [default: K in all].", "--per")]
ByOpt = Annotated[
    By, _opt(None, "Rank by the mean gate, or by AutoPELT's contribution relative to the largest (0–1).", "--by")
]
EvalDataOpt = Annotated[
    str | None,
    _opt(None, "Evaluate before and after on this data (a file, or a built-in dataset's eval split).", "--data"),
]
PruneDryRunOpt = Annotated[
    bool, _opt("Output", "Print every gated module, its mean gate and the decision; write nothing.", "--dry-run", "-n")
]
RestoreOpt = Annotated[bool, typer.Option("--restore", help="Bring back every pruned module.")]


@app.command(
    epilog="Examples:\n\n"
    "  pelt prune runs/u --dry-run\n\n"
    "  pelt prune runs/u --threshold 0.05 -o runs/u-pruned --data vader\n\n"
    "  pelt prune runs/u --keep-top-k 2 --per layer\n\n"
    "  pelt prune runs/u --by contribution --threshold 0.05\n\n"
    "  pelt prune runs/u --restore\n\n"
    "Prints the run directory on stdout. Exit codes: 0 ok; 1 runtime failure; 2 no gate statistics, bad option.",
)
def prune(
    run: RunArg,
    out: PruneOutOpt = None,
    threshold: ThresholdOpt = None,
    keep_top_k: KeepTopKOpt = None,
    per: PerOpt = None,
    by: ByOpt = By.gate,
    data: EvalDataOpt = None,
    dry_run: PruneDryRunOpt = False,
    restore: RestoreOpt = False,
    fmt: FormatOpt = None,
    force: ForceOpt = False,
) -> None:
    """Remove the gated modules (UniPELT's LoRA/Prefix/Adapter per layer, domain adapters) whose gate (or AutoPELT
    contribution) is low."""
    from pelt_cli import console
    from pelt_cli.prune import prune_run

    run_dir = _path(run)
    if restore:
        if threshold is not None or keep_top_k is not None or dry_run:
            raise UsageError("--restore takes no --threshold, --keep-top-k or --dry-run")
        print(_restore(run_dir, out, force))
        return
    rule = {"threshold": threshold, "keep_top_k": keep_top_k, "per": _value(per)}
    rep = prune_run(run_dir, out, **rule, dry_run=dry_run, data=data, force=force, by=by.value).to_dict()
    if dry_run:
        console.emit_prune(rep, _format(fmt))
        return
    console.info(console.prune_summary(rep) + f" → {rep['out']}")
    if rep["evaluation"]:
        console.info(console.evaluation_change(rep["evaluation"]))
    print(rep["out"])


# ------------------------------------------------------------------------------------------------ merge

DtypeOpt = Annotated[Dtype | None, _opt(None, "Output dtype [default: the base's].", "--dtype")]
ShardSizeOpt = Annotated[
    str | None, _opt(None, "Re-shard, e.g. 5GB or 500MB [default: keep the base's shards].", "--max-shard-size")
]
FreezeGatesOpt = Annotated[
    FreezeGates | None,
    _opt(
        None,
        "mean: fold UniPELT's gated LoRA with each gate at its eval mean (approximate; the error is printed).",
        "--freeze-gates",
    ),
]
GateDataOpt = Annotated[
    str | None,
    _opt(
        None,
        "With --freeze-gates mean: take the gate means from this data (a "
        "file or a built-in dataset's eval split) instead of the run's gates.json.",
        "--data",
    ),
]
KeepUnmergedOpt = Annotated[
    bool,
    typer.Option(
        "--keep-unmerged",
        help="Write modules that cannot be folded (adapter, prefix, domain, head) as a run in OUT/pelt-rest.",
    ),
]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Run base+modules and the merged model on sample inputs and print max |Δ|.")
]
BaseOpt = Annotated[Path | None, _opt(None, "Another location of the run's base.", "--base")]
NoFingerprintOpt = Annotated[
    bool,
    typer.Option(
        "--no-fingerprint-check",
        help="Accept a base whose content differs from the run's.",
        rich_help_panel="Dangerous",
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  pelt merge runs/lora -o merged/ --verify\n\n"
    "  pelt merge runs/u -o merged/ --freeze-gates mean --keep-unmerged\n\n"
    "  pelt merge runs/lora -o merged/ --dtype bfloat16 --max-shard-size 5GB\n\n"
    "Prints the output directory on stdout. Exit codes: 0 ok; 1 runtime failure; 2 modules that cannot be folded, "
    "wrong base, bad option.",
)
def merge(
    run: RunArg,
    out: OutOpt,
    dtype: DtypeOpt = None,
    max_shard_size: ShardSizeOpt = None,
    freeze_gates: FreezeGatesOpt = None,
    data: GateDataOpt = None,
    keep_unmerged: KeepUnmergedOpt = False,
    verify: VerifyOpt = False,
    base: BaseOpt = None,
    no_fingerprint_check: NoFingerprintOpt = False,
    force: ForceOpt = False,
) -> None:
    """Fold LoRA and IA³ into the base weights, streaming, into a checkpoint plain transformers loads."""
    from pelt_cli import console
    from pelt_cli.io.writer import parse_size
    from pelt_cli.merge import merge_run

    run_dir = _path(run)
    size = parse_size(max_shard_size) if max_shard_size else None
    stats = _gate_stats(run_dir, data, freeze_gates)
    rep = merge_run(
        run_dir,
        out,
        dtype=_value(dtype),
        max_shard_size=size,
        freeze_gates=_value(freeze_gates),
        keep_unmerged=keep_unmerged,
        force=force,
        base=base,
        check_fingerprint=not no_fingerprint_check,
        gate_stats=stats,
    )
    console.info(console.merge_summary(rep.to_dict()))
    if verify or rep.approximate:
        _verify_merge(run_dir, out, approximate=rep.approximate, rest=bool(rep.rest))
    print(out)


# ------------------------------------------------------------------------------------------------ export, import

BundleOutOpt = Annotated[str, _opt("Output", "Bundle directory to write, or - for a tar on stdout.", "--out", "-o")]
PeftOpt = Annotated[
    bool,
    typer.Option(
        "--peft",
        help="Also write a PEFT adapter (adapter_config.json + "
        "adapter_model.safetensors) for LoRA-only or IA³-only runs.",
    ),
]
BundleArg = Annotated[
    Path,
    typer.Argument(help="Bundle directory or tar (from pelt export), or - for a tar on stdin.", show_default=False),
]
ExpectDigestOpt = Annotated[
    str | None,
    _opt(
        "Input",
        "Refuse the bundle unless its digest is this one (sha256:…, as pelt export prints it).",
        "--expect-digest",
    ),
]
MergeBundleOpt = Annotated[
    bool,
    typer.Option(
        "--merge", help="Write the merged model instead of a run (LoRA/IA³; other modules go to OUT/pelt-rest)."
    ),
]
ForceBaseOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Accept a base whose fingerprint differs (warns), and replace an existing output.",
        rich_help_panel="Dangerous",
    ),
]
AdapterArg = Annotated[
    Path,
    typer.Argument(
        help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors).", show_default=False
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  pelt export runs/lora -o bundles/lora\n\n"
    "  pelt export runs/lora -o bundles/lora --peft   (also loadable by peft's AutoPeftModelFor….from_pretrained)\n\n"
    "  pelt export runs/u -o - | ssh host 'tar -x -C bundle'\n\n"
    "Prints the bundle directory on stdout (with -o -, the tar stream). Exit codes: 0 ok; 1 runtime failure; 2 bad "
    "run or option.",
)
def export(run: RunArg, out: BundleOutOpt, peft: PeftOpt = False, force: ForceOpt = False) -> None:
    """Write a diffed bundle: only the tensors that differ from the base, and a manifest with checksums."""
    from pelt_cli import console
    from pelt_cli.bundle import export_bundle

    run_dir = _path(run)
    if out == "-":
        if sys.stdout.isatty():
            raise UsageError("-o - writes a tar stream to stdout, which is a terminal", hint="pipe or redirect it")
        manifest = export_bundle(run_dir, "-", stream=sys.stdout.buffer, peft=peft)
    else:
        manifest = export_bundle(run_dir, out, force=force, peft=peft)
    console.info(console.bundle_summary(manifest, out))
    console.info(f"digest {manifest['digest']}")
    if out != "-":
        print(out)


@app.command(
    "apply-bundle",
    epilog="Examples:\n\n"
    "  pelt apply-bundle bundles/lora minilm -o runs/lora\n\n"
    "  pelt apply-bundle bundle.tar ./llama -o merged/ --merge\n\n"
    "  pelt export runs/lora -o - | pelt apply-bundle - minilm -o runs/copy --expect-digest sha256:…\n\n"
    "Checks the bundle's digest (and every file's SHA-256) first. Exit codes: 0 ok; 1 runtime failure; 2 a changed "
    "or malformed bundle, a digest other than --expect-digest, a base whose fingerprint differs (without --force).",
)
def apply_bundle_cmd(
    bundle: BundleArg,
    model: ModelArg,
    out: OutOpt,
    merge_out: MergeBundleOpt = False,
    expect_digest: ExpectDigestOpt = None,
    force: ForceBaseOpt = False,
) -> None:
    """Rebuild a run (or the merged model) from a bundle and its base; refuses a changed bundle or another base."""
    from pelt_cli.bundle import apply_bundle

    if str(bundle) == "-" and model == "-":
        raise UsageError("BUNDLE - and MODEL - both read stdin", hint="give one of them as a path")
    if str(bundle) == "-" and sys.stdin.isatty():
        raise UsageError("BUNDLE - reads a tar from stdin, which is a terminal", hint="pipe or redirect a tar in")
    base, stream = _path(model), sys.stdin.buffer if str(bundle) == "-" else None
    if merge_out:
        _wrote(_merged_bundle(bundle, base, out, force, expect_digest, stream))
        return
    run_dir = apply_bundle(bundle, base, out, force=force, expect_digest=expect_digest, stream=stream)
    _bundle_notes(run_dir, base)
    _wrote(run_dir)


VerifyArg = Annotated[
    str,
    typer.Argument(
        help="A bundle (directory or tar), a run directory or a checkpoint; - reads the path from stdin.",
        autocompletion=complete_model,
        show_default=False,
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "  pelt verify bundles/lora --expect-digest sha256:…\n\n"
    "  pelt verify runs/lora --format json | jq '.checks[] | select(.status == \"fail\")'\n\n"
    "  pelt verify ./llama\n\n"
    "One row per check: status ok, fail, warn or skip. Exit codes: 0 every check passed; 1 runtime failure; 2 a "
    "check failed, or the path is none of the three.",
)
def verify(target: VerifyArg, expect_digest: ExpectDigestOpt = None, fmt: FormatOpt = None) -> None:
    """Check a bundle (digest, files, tensors), a run (run.json, adapter header, tensor table, base) or a
    checkpoint (headers, offsets, the tensors its config needs) without loading a model."""
    from pelt_cli import console
    from pelt_cli.verify import raise_if_failed, verify_path

    report = verify_path(_path(target), expect_digest=expect_digest)
    console.emit_checks(report, _format(fmt))
    raise_if_failed(report)


@app.command(
    "import-peft",
    epilog="Examples:\n\n  pelt import-peft ./my-lora ./llama -o runs/imported && pelt merge runs/imported -o m/\n\n"
    "Exit codes: 0 ok; 1 runtime failure; 2 an adapter pelt cannot express (DoRA, lora_bias, a head the base's "
    "family has no class for, …).",
)
def import_peft_cmd(adapter: AdapterArg, model: ModelArg, out: OutOpt, force: ForceOpt = False) -> None:
    """Bring an existing PEFT LoRA or IA³ adapter into a pelt run directory."""
    from pelt_cli.peft_format import import_peft

    _wrote(import_peft(adapter, _path(model), out, force=force))


# ------------------------------------------------------------------------------------------------ predict, eval

TargetArg = Annotated[
    str,
    typer.Argument(
        help="A checkpoint directory (e.g. from pelt merge), a run directory, or a bundle (directory or tar); "
        "- reads the path from stdin.",
        autocompletion=complete_model,
        show_default=False,
    ),
]
RowsOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Rows: JSONL, CSV or TSV (column text; text_a+text_b or text+text_pair for pairs), a .txt file of "
        "plain text lines, or - for plain text lines on stdin.",
        rich_help_panel=INPUT,
        show_default=False,
    ),
]
LabelledOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Labelled rows: JSONL, CSV or TSV (text,label or text_a,text_b,label; causal LMs: text), or a "
        "built-in dataset's eval split (vader).",
        rich_help_panel=INPUT,
        show_default=False,
    ),
]
RowBatchOpt = Annotated[int, _opt(None, "Rows per forward pass (results do not depend on it).", "--batch-size", "-b")]
GENERATION = "Generation (causal LMs)"
MaxNewTokensOpt = Annotated[int, _opt(GENERATION, "Tokens to generate per row.", "--max-new-tokens")]
SampleOpt = Annotated[bool, _opt(GENERATION, "Sample instead of greedy decoding.", "--sample")]
TemperatureOpt = Annotated[float | None, _opt(GENERATION, "With --sample: the temperature [default: 1.0].")]
SeedOpt = Annotated[int, _opt(GENERATION, "With --sample: the random seed.", "--seed")]


@app.command(
    epilog="Examples:\n\n"
    "  printf 'what a film\\nso dull\\n' | pelt predict merged/ --data -\n\n"
    "  pelt predict runs/lora --data test.jsonl > predictions.jsonl\n\n"
    "  pelt predict runs/llama-lora --data prompts.txt --max-new-tokens 64 --sample --temperature 0.7\n\n"
    "Writes one JSON line per input row, in input order: {label, score, scores} (classifiers) or {generated} "
    "(causal LMs). Exit codes: 0 ok; 1 runtime failure; 2 bad data, a model without a task head, a run never "
    "trained.",
)
def predict(
    model: TargetArg,
    data: RowsOpt,
    batch_size: RowBatchOpt = 32,
    max_new_tokens: MaxNewTokensOpt = 32,
    sample: SampleOpt = False,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Classify rows (or continue prompts, or transcribe audio with a Qwen2-Audio) with a model, a run or a bundle:
    one JSON line per row on stdout."""
    from pelt_cli import console
    from pelt_cli.predict import GenerateOptions, load_predictor, predict_rows, read_inputs

    if temperature is not None and not sample:
        raise UsageError("--temperature applies to --sample; greedy decoding has none")
    if model == "-" and data == "-":
        raise UsageError("MODEL - and --data - both read stdin", hint="give one of them as a path")
    rows, where = read_inputs(data)
    pred = load_predictor(_path(model))
    opts = GenerateOptions(max_new_tokens, sample, 1.0 if temperature is None else temperature, seed)
    with console.RowProgress("predict", batch_size) as progress:
        console.write_jsonl(predict_rows(pred, rows, where, batch_size, opts, on_batch=progress))


AblateOpt = Annotated[
    bool,
    _opt(
        "Diagnostics",
        "Also measure with every UniPELT gate held at 1 (the no-gate ablation) and show the change per metric.",
        "--ablate-gates",
    ),
]


@app.command(
    "eval",
    epilog="Examples:\n\n"
    "  pelt eval runs/lora --data test.jsonl\n\n"
    "  pelt eval merged/ --data vader --format json | jq .macro_f1\n\n"
    "  pelt eval runs/unipelt --data vader --ablate-gates   (what the learned gates buy)\n\n"
    "Exit codes: 0 ok; 1 runtime failure; 2 bad data, labels the model never saw in training, a model without a "
    "task head.",
)
def eval_cmd(
    model: TargetArg, data: LabelledOpt, batch_size: RowBatchOpt = 32, fmt: FormatOpt = None, ablate: AblateOpt = False
) -> None:
    """Measure a model, run or bundle on labelled rows: accuracy, macro-F1, per-class P/R/F1 and the confusion
    matrix (classifiers); loss and perplexity (causal LMs; Qwen2-Audio on audio,text rows)."""
    from pelt_cli import console
    from pelt_cli.evaluate import ablate_gates, evaluate_predictor
    from pelt_cli.predict import load_predictor

    pred = load_predictor(_path(model))
    measure = ablate_gates if ablate else evaluate_predictor
    with console.RowProgress("eval", batch_size) as progress:
        doc = measure(pred, data, batch_size, on_batch=progress)
    console.emit_eval(doc, _format(fmt))


ShellArg = Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]


@app.command(
    epilog="Examples:\n\n  pelt completion bash > ~/.local/share/bash-completion/completions/pelt\n\n"
    "  pelt completion fish > ~/.config/fish/completions/pelt.fish"
)
def completion(shell: ShellArg) -> None:
    """Print the shell completion script (the same as the files in completions/)."""
    from typer._completion_shared import get_completion_script

    print(get_completion_script(prog_name="pelt", complete_var="_PELT_COMPLETE", shell=shell.value))


# ------------------------------------------------------------------------------------------------ helpers


def _path(value: str) -> Path:
    """A MODEL or RUN argument as a path (a short name or ``-`` resolved; shown with -v)."""
    from pelt_cli import console
    from pelt_cli.report import resolve_model

    path = resolve_model(value)
    if str(path) != str(Path(value)):
        console.detail(f"{value} → {path}")
    return path


def _format(fmt: Format | None) -> str:
    """``--format``'s value, or the default for where stdout goes."""
    from pelt_cli import console

    return fmt.value if fmt else console.default_format()


def _value(choice: Enum | None) -> Any:
    """An enum option's plain value (None stays None), for the library."""
    return None if choice is None else choice.value


def _wrote(path: Path) -> None:
    """Log ``wrote PATH`` and print the path on stdout, for the next command in a pipe."""
    from pelt_cli import console

    console.info(f"wrote {path}")
    print(path)


def default_run_dir(name: str) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS`` (with a counter if that exists): where ``pelt apply`` writes without -o."""
    stem = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = stem, 1
    while out.exists():
        n += 1
        out = stem.with_name(f"{stem.name}-{n}")
    return out


def train_config(options: dict[str, Any]) -> "TrainConfig":
    """The :class:`~pelt_cli.train.TrainConfig` of ``pelt train``'s options: each field from the option of its name.

    Args:
        options: the command's parameters by name (enum choices are turned into their values).
    """
    from dataclasses import fields

    from pelt_cli.train_config import TrainConfig

    return TrainConfig(**{f.name: _plain(options[f.name]) for f in fields(TrainConfig)})


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters of the running command given on its command line (or through an environment variable).

    Args:
        ctx: the command's context.
    """
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, src in sources.items() if getattr(src, "name", "") in ("COMMANDLINE", "ENVIRONMENT")}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _restore(run_dir: Path, out: Path | None, force: bool) -> str:
    """``pelt prune --restore``: bring back every pruned module; returns the run directory written."""
    from pelt_cli import console
    from pelt_cli.prune import restore_run

    rep = restore_run(run_dir, out, force=force).to_dict()
    console.info(f"restored {len(rep['units'])} module(s), {-rep['pruned_params']:,} parameters → {rep['out']}")
    return rep["out"]


def _gate_stats(run_dir: Path, data: str | None, freeze_gates: FreezeGates | None) -> dict | None:
    """``pelt merge --data``: the gate statistics measured on that data (None: use the run's gates.json)."""
    if data is None:
        return None
    if freeze_gates is not FreezeGates.mean:
        raise UsageError("--data gives gate means for --freeze-gates mean; pass both")
    from pelt_cli.evaluate import measure_run

    return measure_run(run_dir, data)[1]


def _verify_merge(run_dir: Path, out: Path, approximate: bool, rest: bool) -> None:
    """Log max |Δ| between the run (base + modules) and the merged checkpoint on sample inputs."""
    from pelt_cli import console
    from pelt_cli.merge import verify_merge

    delta = verify_merge(run_dir, out)
    what = "gates frozen at their means" if approximate else "verify"
    console.info(
        f"{what}: max |Δ| = {delta:.3g} between {run_dir} (base + modules) and {out}"
        f"{' (+ pelt-rest)' if rest else ''} on sample inputs"
    )


def _merged_bundle(bundle: Path, base: Path, out: Path, force: bool, expect: str | None, stream: Any) -> Path:
    """``pelt apply-bundle --merge``: rebuild the run in a temporary directory, then merge it into ``out``."""
    import tempfile

    from pelt_cli import console
    from pelt_cli.bundle import apply_bundle
    from pelt_cli.merge import merge_run

    with tempfile.TemporaryDirectory(prefix="pelt-bundle-run-") as tmp:
        run_dir = apply_bundle(bundle, base, Path(tmp) / "run", force=force, expect_digest=expect, stream=stream)
        _bundle_notes(run_dir, base)
        rep = merge_run(run_dir, out, keep_unmerged=True, force=force)
    console.info(console.merge_summary(rep.to_dict()))
    return out


def _bundle_notes(run_dir: Path, base: Path) -> None:
    """After apply-bundle: the digest checked, or a warning for a bundle without one, or one put on another base."""
    from pelt_cli import console
    from pelt_cli.run import Run

    meta = Run.open(run_dir).meta
    prov = meta.extra["from_bundle"]
    if prov.get("digest"):
        console.info(f"digest {prov['digest']} checked")
    else:
        console.warning(
            "the bundle has no digest (exported by an older pelt), so its manifest is not checked; re-export it, "
            "or pass --expect-digest to refuse such bundles"
        )
    if meta.base.fingerprint != prov["base_fingerprint"]:
        console.warning(
            f"{base} is not the base the bundle was exported from (--force); the run's outputs may "
            "differ from the exported run's"
        )


# ------------------------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, map errors to one line on stderr and an exit code.

    Exit codes: 0 ok (including a closed pipe on stdout), 1 runtime failure, 2 usage or bad input, 130 Ctrl-C.
    Set ``PELT_DEBUG=1`` for the traceback of a pelt or OS error instead of its one line.
    """
    started = time.perf_counter()
    try:
        rv = typer.main.get_command(app).main(args=argv, prog_name="pelt", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except SystemExit as e:  # click ends a command whose stdout closed early with sys.exit(1)
        if not _closed_pipe(e):
            raise
        code = _stdout_closed()
    except BrokenPipeError:
        code = _stdout_closed()
    except (PeltError, OSError) as e:
        if os.environ.get("PELT_DEBUG") == "1":
            raise
        code = _report(e)
    except (_cx.ClickException, typer.Exit, typer.Abort, KeyboardInterrupt) as e:
        code = _report(e)
    atomic = sys.modules.get("pelt_cli.io.atomic")
    if atomic is not None:  # outputs a refused command had claimed are free again (main may run again: tests)
        atomic.release_claims()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_closed()
    console = sys.modules.get("pelt_cli.console")  # loaded once a command ran; never by plain --help (start-up time)
    if code == 0 and console is not None:
        console.detail(f"done in {time.perf_counter() - started:.2f} s")
    return code


def _closed_pipe(e: BaseException | None) -> bool:
    """Whether ``e`` comes from writing to a stdout whose reader has gone (``pelt … | head``)."""
    while e is not None:
        if isinstance(e, BrokenPipeError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _stdout_closed() -> int:
    """Point stdout at /dev/null (what is left to flush, at exit too, goes nowhere) and return 0: not an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def _report(e: BaseException) -> int:
    """Print a failure as pelt does (``error: …`` on stderr, a hint under it) and return its exit code."""
    from pelt_cli import console

    if isinstance(e, RecipeError):
        console.error(*e.problems, hint=e.hint)
        return e.exit_code
    if isinstance(e, PeltError):
        console.error(e.message, hint=e.hint)
        return e.exit_code
    if isinstance(e, OSError):
        console.error(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
        return 1
    if isinstance(e, typer.Exit):
        return e.exit_code
    if isinstance(e, _cx.BadParameter) and _choice_error(e):
        return e.exit_code
    if isinstance(e, _cx.ClickException):
        e.show()
        return e.exit_code
    print("interrupted", file=sys.stderr)
    return 130


def _choice_error(e: Any) -> bool:
    """Show a value outside an enum's choices as ``error: --opt 'value': expected a, b or c``, as the library does."""
    from pelt_cli import console

    choices = getattr(getattr(e.param, "type", None), "choices", None)
    found = re.match(r"(.+?) is not (one of )?", e.message)
    if not choices or not found:
        return False
    name = e.param.opts[0] if e.param.param_type_name == "option" else e.param.human_readable_name.upper()
    console.error(f"{name} {found.group(1)}: expected {console.one_of(str(_plain(c)) for c in choices)}")
    return True


def run() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    run()
