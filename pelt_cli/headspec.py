"""A task head's spec, as ``run.json`` and a bundle's manifest hold it, checked before anything builds from it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pelt_cli.errors import CheckpointError

MAX_HIDDEN = 1 << 20  # a head's input width: far above any model's, far below what allocating a meta tensor trips on


def kind_name(value: Any) -> str:
    """How a JSON value's type is named in messages."""
    return (
        "null"
        if value is None
        else {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)
    )


def is_int(value: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(where: Path | str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}")


def check_head(head: Any, where: Path | str) -> None:
    """Raise unless ``head`` is a task head spec (or None): pelt's own (task, labels, hidden, dropout) or a
    transformers class (class, labels, root, params, problem type, padding token), as ``run.json`` and a bundle's
    manifest hold it.

    Raises:
        CheckpointError: the first field of the wrong type or out of range, named with ``where``.
    """
    if head is None:
        return
    if not isinstance(head, dict):
        raise _bad(where, f"head: a {kind_name(head)}, expected an object or null")
    labels = head.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise _bad(where, f"head.labels: {labels!r}, expected a non-empty list of strings")
    if len(set(labels)) != len(labels):
        raise _bad(where, "head.labels: a label appears twice")
    if not isinstance(head.get("task"), str):
        raise _bad(where, f"head.task: {head.get('task')!r}, expected a string")
    if "class" not in head:
        hidden, dropout = head.get("hidden"), head.get("dropout", 0.1)
        if not is_int(hidden) or not 1 <= hidden <= MAX_HIDDEN:
            raise CheckpointError(
                f"{where}: " + f"head.hidden: {hidden!r}, expected an integer from 1 to {MAX_HIDDEN:,}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise _bad(where, f"head.dropout: {dropout!r}, expected a number in [0, 1)")
        return
    if not isinstance(head["class"], str) or not re.fullmatch(r"[A-Z][A-Za-z0-9]*For[A-Za-z]+", head["class"]):
        raise _bad(where, f"head.class: {head['class']!r}, expected a transformers task class name")
    params, root = head.get("params", []), head.get("root", "")
    if not isinstance(root, str) or not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise _bad(where, "head.root and head.params: expected a string and a list of strings")
    pad = head.get("pad_token_id")
    if not (pad is None or is_int(pad)) or not isinstance(head.get("problem_type") or "", str):
        raise _bad(where, "head.pad_token_id and head.problem_type: expected an integer and a string (or null)")
