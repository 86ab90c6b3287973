"""Typed errors. The library raises these and never prints or exits; the CLI maps them to exit codes."""

from __future__ import annotations


class PeltError(Exception):
    """Base of every error pelt raises on purpose.

    Attributes:
        exit_code: the process exit code the CLI uses (1 runtime failure, 2 bad input).
        hint: an optional next step shown under the one-line message.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class BadInput(PeltError):
    """Base of the errors about what the user gave (arguments, files, runs): the CLI exits with code 2."""

    exit_code = 2


class UsageError(BadInput):
    """A bad argument or option on the command line."""


class CheckpointError(BadInput):
    """A checkpoint path that is missing, malformed or in a format pelt refuses."""


class RecipeError(BadInput):
    """A recipe that fails validation; carries every problem found."""

    def __init__(self, problems: list[str], hint: str | None = None) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems), hint)


class OutputExistsError(BadInput):
    """An output path that already exists and would be overwritten."""


class DataError(BadInput):
    """A data file that is missing, malformed or does not fit the task; the message names file:line and column."""


class TrainingError(PeltError):
    """Training stopped: a non-finite loss, or a base parameter that would train."""

    exit_code = 1


class PruneRefused(BadInput):
    """A run that cannot be pruned (no gate statistics, nothing gated) or a rule that would remove everything."""


class MergeRefused(BadInput):
    """A merge that would not give the run's model; ``modules`` lists what could not be folded."""

    def __init__(self, message: str, hint: str | None = None, modules: list[dict] | None = None) -> None:
        super().__init__(message, hint)
        self.modules = list(modules or [])


class BaseMismatch(BadInput):
    """A bundle or adapter offered to a base other than the one it was made on."""


class ExportRefused(BadInput):
    """A run that the requested format cannot represent."""


class OutputBusy(PeltError):
    """An output (a run, a merged checkpoint, a bundle) another pelt process is writing now: refused at once, never
    waited for (exit 1, like any other environment problem)."""

    exit_code = 1
