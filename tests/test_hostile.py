"""Hostile input (issue 11): every case that gave a traceback, a hang or a wrong exit code, as a named regression.

Each case asserts the exit code (2: bad input), exactly one ``error:`` line naming the file and the problem, no
traceback, no output written, and the input unchanged. FIFOs run under an alarm: a hang fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tiny_models
from conftest import pelt_main

from pelt_cli.errors import CheckpointError
from pelt_cli.io import guard
from pelt_cli.io.checkpoint import open_checkpoint

REPO = Path(__file__).resolve().parent.parent
LORA = (REPO / "recipes" / "lora.yaml").read_text()
ENTRY = "inserts:\n  - method: lora\n    targets: [attn.q]\n"


@contextlib.contextmanager
def no_hang(seconds: int = 20) -> Iterator[None]:
    """Fail (instead of waiting forever) when the body blocks, e.g. on opening a FIFO."""

    def fire(*_: object) -> None:
        raise TimeoutError(f"hung for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def refused(*args: str, match: str, code: int = 2, lines: int = 1) -> str:
    """Run pelt in process; assert exit ``code``, ``lines`` ``error:`` lines (a recipe gets one per problem), the
    first matching ``match``, and no traceback."""
    with no_hang():
        r = pelt_main(*args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert len(errors) == lines, r.stderr
    assert match in errors[0], errors[0]
    return errors[0]


def digest(path: Path) -> str:
    """A hash over a file or a whole directory tree (names and bytes), to prove an input is unchanged."""
    h = hashlib.sha256()
    for p in sorted([path] if path.is_file() else path.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT saved with save_pretrained (config.json + model.safetensors)."""
    return tiny_models.save("bert", tmp_path_factory.mktemp("hostile") / "bert")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaMA saved with save_pretrained."""
    return tiny_models.save("llama", tmp_path_factory.mktemp("hostile") / "llama")


@pytest.fixture
def ckpt(bert: Path, tmp_path: Path) -> Path:
    """A fresh copy of the tiny BERT to damage."""
    return Path(shutil.copytree(bert, tmp_path / "ckpt"))


def rewrite_header(path: Path, change: Callable[[dict], object], extra: bytes = b"") -> None:
    """Rewrite a safetensors file's JSON header through ``change`` (data bytes kept; ``extra`` appended)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + n])
    new = change(doc)
    head = json.dumps(doc if new is None else new).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :] + extra)


def write_recipe(tmp_path: Path, text: str | bytes, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def assert_apply_refused(recipe: Path | str, model: Path, tmp_path: Path, match: str) -> str:
    """``pelt apply`` refused in one line, nothing written, the checkpoint unchanged."""
    before = digest(model)
    line = refused("apply", str(recipe), str(model), "-o", str(tmp_path / "run"), match=match)
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if ".pelt-tmp" in p.name]
    assert digest(model) == before
    return line


# ------------------------------------------------------------------------------------- recipes: tracebacks


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (f"name:\n{ENTRY}", "name: expected a string, got None"),
        (ENTRY + "    params:\n      dropout:\n", "inserts[0].params.dropout: expected a number, got None"),
        (ENTRY + "    params:\n      rank:\n", "inserts[0].params.rank: expected an integer, got None"),
        (ENTRY + "    name:\n", "inserts[0].name: expected a string, got None"),
    ],
    ids=["name", "dropout", "rank", "entry-name"],
)
def test_recipe_key_with_empty_value(tmp_path: Path, text: str, match: str) -> None:
    refused("validate", str(write_recipe(tmp_path, text)), match=match)


def test_recipe_every_empty_value_reported_once(tmp_path: Path) -> None:
    text = "description:\nseed:\n" + ENTRY + "    name:\n"
    refused("validate", str(write_recipe(tmp_path, text)), match="inserts[0].name: expected a string", lines=3)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (LORA.encode("utf-16"), "is UTF-16 text; expected a recipe (YAML) in UTF-8"),
        (b"name: caf\xe9\n" + ENTRY.encode(), "not UTF-8 text (invalid continuation byte at byte 9)"),
        (bytes(range(256)) * 4, "not UTF-8 text"),
        (b"name: x\x00\n" + ENTRY.encode(), "holds NUL bytes"),
    ],
    ids=["utf16", "latin1", "binary-garbage", "nul"],
)
def test_recipe_not_utf8(tmp_path: Path, raw: bytes, match: str) -> None:
    p = write_recipe(tmp_path, raw)
    line = refused("validate", str(p), match=match)
    assert str(p) in line


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("seed: !!float abc\n" + ENTRY, "seed: 'abc' is not a valid value (could not convert string to float"),
        ("seed: !!int 1.5.5\n" + ENTRY, "seed: '1.5.5' is not a valid value (invalid literal for int()"),
        ("seed: !custom 3\n" + ENTRY, "could not determine a constructor for the tag '!custom'"),
        ("seed: !!python/object:os.system x\n" + ENTRY, "is not a valid value"),
        ("families: !!set {a, b}\n" + ENTRY, "YAML tag 'tag:yaml.org,2002:set' is not allowed here"),
        ("inserts:\n  - method: unipelt\n    params:\n      modules: [[a]]\n", "params.modules[0]: expected a string"),
        (ENTRY + "    params:\n      alpha: !!float inf\n", "params.alpha: inf is not a finite number"),
        ("? [a, b]\n: 1\n" + ENTRY, "a key must be a plain name"),
    ],
    ids=["float-abc", "int-1.5.5", "unknown-tag", "python-tag", "set-tag", "nested-list", "inf", "complex-key"],
)
def test_recipe_bad_tags_and_values(tmp_path: Path, text: str, match: str) -> None:
    refused("validate", str(write_recipe(tmp_path, text)), match=match)


def test_recipe_alpha_nan_refused(tmp_path: Path) -> None:
    refused("validate", str(write_recipe(tmp_path, ENTRY + "    params:\n      alpha: .nan\n")), match="not a finite")


def test_recipe_recursive_alias(tmp_path: Path) -> None:
    text = "x: &a [*a]\n" + ENTRY
    refused("validate", str(write_recipe(tmp_path, text)), match="nesting too deep (recursive or exploding aliases?)")


def test_recipe_deep_nesting(tmp_path: Path) -> None:
    text = "x: " + "[" * 5000 + "]" * 5000 + "\n" + ENTRY
    refused("validate", str(write_recipe(tmp_path, text)), match="YAML syntax error: nested deeper than 64 levels")
    text = "x:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 200)) + ENTRY
    refused("validate", str(write_recipe(tmp_path, text)), match="nested deeper than 64 levels")


def test_recipe_billion_laughs_stops_quickly(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    text = "\n".join(lines) + "\n" + ENTRY
    refused("validate", str(write_recipe(tmp_path, text)), match="more than 20,000 values")
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * 2000) + "]\n" + ENTRY
    refused("validate", str(write_recipe(tmp_path, many)), match="more than 1000 aliases")


def test_recipe_larger_than_1mb_refused_without_parsing(tmp_path: Path) -> None:
    p = write_recipe(tmp_path, ENTRY + "# " + "x" * (2 * 1024 * 1024) + "\n")
    refused("validate", str(p), match="larger than 1,048,576 bytes; expected a recipe file (YAML)")


def test_recipe_50mb_does_not_hang(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    with open(p, "wb") as f:
        f.write(ENTRY.encode())
        f.truncate(50 * 1024 * 1024)
    refused("validate", str(p), match="larger than 1,048,576 bytes")


def test_recipe_blocks_not_a_list(tmp_path: Path) -> None:
    refused("validate", str(write_recipe(tmp_path, ENTRY + "    blocks: 3\n")), match="inserts[0].blocks: expected")


def test_recipe_huge_layer_range_without_model(tmp_path: Path) -> None:
    p = write_recipe(tmp_path, ENTRY + '    layers: "0-100000000000"\n')
    refused("validate", str(p), match="layer range '0-100000000000': more than 100,000 layers")
    p = write_recipe(tmp_path, ENTRY + "    layers: 100000000000\n")
    refused("validate", str(p), match="layer 100000000000: no model has that many layers")


def test_recipe_layer_range_checked_against_the_model(tmp_path: Path, bert: Path) -> None:
    p = write_recipe(tmp_path, ENTRY + '    layers: "0-5000"\n')
    line = refused("validate", str(p), str(bert), match="layer 2 is out of range: the model has 2 layers")
    assert "inserts[0].layers" in line
    assert_apply_refused(p, bert, tmp_path, "layer 2 is out of range")


def test_recipe_prefix_length_huge_refused(tmp_path: Path, bert: Path) -> None:
    text = "inserts:\n  - method: prefix\n    params:\n      length: 1000000000000000\n"
    refused("validate", str(write_recipe(tmp_path, text)), match="params.length: 1000000000000000 is too large")
    text = "inserts:\n  - method: prefix\n    params:\n      length: 9000000\n"
    p = write_recipe(tmp_path, text)
    refused("validate", str(p), str(bert), match="the recipe inserts 1,152,000,000 parameters into a model of")
    assert_apply_refused(p, bert, tmp_path, "parameters into a model of")


def test_recipe_override_goes_through_the_same_checks(bert: Path) -> None:
    refused("validate", "lora", "inserts.0.params.alpha=!!float abc", match="is not a valid value")
    refused("validate", "lora", "inserts.0.params.alpha=.nan", match="not a finite number")


# ------------------------------------------------------------------------------------- recipes: not a file


@pytest.mark.parametrize("kind", ["fifo", "dir", "loop", "devnull"])
def test_recipe_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    p = tmp_path / "r.yaml"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dir":
        p.mkdir()
    elif kind == "loop":
        p.symlink_to(p)
    else:
        p = Path(os.devnull)
    want = {
        "fifo": "is a FIFO (named pipe)",
        "dir": "is a directory",
        "loop": "symlink loop",
        "devnull": "is a character device",
    }[kind]
    refused("validate", str(p), match=want)


# ------------------------------------------------------------------------------------- checkpoints: apply crashes


def test_checkpoint_trailing_bytes(ckpt: Path, tmp_path: Path) -> None:
    with open(ckpt / "model.safetensors", "ab") as f:
        f.write(b"\0" * 24)
    refused("inspect", str(ckpt), match="24 bytes after the last tensor's data belong to no tensor")
    assert_apply_refused("lora", ckpt, tmp_path, "trailing bytes")


def test_checkpoint_empty_header_object(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    assert_apply_refused("lora", ckpt, tmp_path, "tensor(s) BertForMaskedLM needs are missing")
    refused("inspect", str(ckpt), "--verify", match="tensor(s) BertForMaskedLM needs are missing")


def test_checkpoint_gap_between_tensors(ckpt: Path) -> None:
    def gap(doc: dict) -> None:
        for v in doc.values():
            if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] > 0:
                v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
                return

    rewrite_header(ckpt / "model.safetensors", gap, extra=b"\0" * 4)
    refused("inspect", str(ckpt), match="belong to no tensor: corrupt header")


def test_checkpoint_dtype_disagrees_with_offsets(ckpt: Path, tmp_path: Path) -> None:
    name = "bert.embeddings.word_embeddings.weight"

    def to_f16(doc: dict) -> None:
        doc[name]["dtype"] = "F16"

    f = ckpt / "model.safetensors"
    original = f.read_bytes()
    rewrite_header(f, to_f16)
    refused("inspect", str(ckpt), match=f"tensor {name!r}: data_offsets")
    f.write_bytes(original)

    def to_i32(doc: dict) -> None:  # the same size: only the model check sees it
        doc[name]["dtype"] = "I32"

    rewrite_header(f, to_i32)
    line = assert_apply_refused("lora", ckpt, tmp_path, f"tensor {name!r}: dtype I32 on disk")
    assert "expects a floating-point tensor" in line


def test_checkpoint_missing_tensor(ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    del state["bert.encoder.layer.1.attention.self.query.weight"]
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    line = assert_apply_refused("lora", ckpt, tmp_path, "1 tensor(s) BertForMaskedLM needs are missing")
    assert "'bert.encoder.layer.1.attention.self.query.weight'" in line
    refused("inspect", str(ckpt), "--verify", match="'bert.encoder.layer.1.attention.self.query.weight'")


@pytest.mark.parametrize("how", ["transposed", "reshaped"])
def test_checkpoint_wrong_shape(ckpt: Path, tmp_path: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    name = "bert.encoder.layer.0.intermediate.dense.weight"  # (64, 32)
    state = load_file(ckpt / "model.safetensors")
    w = state[name]
    state[name] = w.t().contiguous() if how == "transposed" else w.reshape(-1, 16).contiguous()
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})
    found = [32, 64] if how == "transposed" else [128, 16]
    line = assert_apply_refused("lora", ckpt, tmp_path, f"tensor {name!r}: shape {found} on disk")
    assert "BertForMaskedLM expects [64, 32]" in line
    assert "ignore_mismatched_sizes" not in line


@pytest.mark.parametrize(
    ("meta", "match"),
    [([1, 2], "__metadata__ is [1, 2]; expected a JSON object of strings"), ({"a": 1}, "__metadata__ is {")],
    ids=["list", "non-string-value"],
)
def test_checkpoint_metadata_not_a_string_map(ckpt: Path, tmp_path: Path, meta: object, match: str) -> None:
    def put(doc: dict) -> None:
        doc["__metadata__"] = meta

    rewrite_header(ckpt / "model.safetensors", put)
    refused("inspect", str(ckpt), match=match)
    assert_apply_refused("lora", ckpt, tmp_path, match)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, 'unknown dtype ["F32"]'),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "shape [true] is not a list"),
        ({"dtype": "F32", "shape": [1], "data_offsets": "0-4"}, 'data_offsets "0-4" is not a pair'),
        ([1, 2], "entry is [1, 2]; expected an object"),
    ],
    ids=["dtype-list", "shape-bool", "offsets-string", "entry-list"],
)
def test_checkpoint_header_wrong_json_types(tmp_path: Path, entry: object, match: str) -> None:
    head = json.dumps({"t": entry}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 4)
    refused("inspect", str(f), match=match)


# ------------------------------------------------------------------------------------- inspect itself


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    return tiny_models.save("bert", tmp_path / "sharded", max_shard_size="40KB")


def test_index_weight_map_values_not_strings(sharded: Path) -> None:
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = 3
    index.write_text(json.dumps(doc))
    refused("inspect", str(sharded), match=f"weight_map[{first!r}] is 3; expected a shard file name")


def test_index_weight_map_path_outside_the_folder(sharded: Path) -> None:
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    first = next(iter(doc["weight_map"]))
    doc["weight_map"][first] = "../../etc/passwd"
    index.write_text(json.dumps(doc))
    refused("inspect", str(sharded), match="expected a shard file name in the same folder")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[1, 2]", "index is a JSON array, expected a JSON object"),
        ("[" * 100000, "nested too deeply"),
        ("\xff", "is not valid JSON"),
    ],
    ids=["list", "deep", "garbage"],
)
def test_index_not_an_object(sharded: Path, text: str, match: str) -> None:
    (sharded / "model.safetensors.index.json").write_text(text)
    refused("inspect", str(sharded), match=match)


def test_config_json_that_is_a_list(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").write_text("[1, 2, 3]")
    refused("inspect", str(ckpt), match="config.json: config.json is a JSON array, expected a JSON object")
    assert_apply_refused("lora", ckpt, tmp_path, "config.json is a JSON array")


def test_config_json_with_nonsense_values(ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_attention_heads"] = "four"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_apply_refused("lora", ckpt, tmp_path, "config.json")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("architectures", 1, "config.json: architectures is 1; expected a list of names"),
        ("num_hidden_layers", [], "config.json: num_hidden_layers is []; expected a positive integer"),
        ("hidden_size", True, "config.json: hidden_size is true; expected a positive integer"),
        ("model_type", ["bert"], 'config.json: model_type is ["bert"]; expected a string'),
    ],
    ids=["architectures", "layers-list", "size-bool", "model-type"],
)
def test_config_json_wrong_types(ckpt: Path, tmp_path: Path, key: str, value: object, match: str) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[key] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    refused("inspect", str(ckpt), match=match)
    assert_apply_refused("lora", ckpt, tmp_path, match)


def test_config_with_fewer_layers_than_the_weights(ckpt: Path, tmp_path: Path) -> None:
    """transformers would load the first layer and silently drop the second; pelt refuses before loading."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    line = assert_apply_refused("lora", ckpt, tmp_path, "is in a layer BertForMaskedLM does not have")
    assert "'bert.encoder.layer.1." in line


def test_llama_config_beside_bert_weights_refused_at_apply(ckpt: Path, llama: Path, tmp_path: Path) -> None:
    shutil.copy(llama / "config.json", ckpt / "config.json")
    line = assert_apply_refused("lora", ckpt, tmp_path, "the weights do not fit its config.json (llama)")
    assert "LlamaForCausalLM needs are missing" in line
    refused("validate", "lora", str(ckpt), match="the weights do not fit its config.json (llama)")
    refused("inspect", str(ckpt), "--verify", match="the weights do not fit its config.json (llama)")


def test_inspect_verify_passes_a_good_checkpoint(bert: Path, sharded: Path) -> None:
    for path, shards in ((bert, "1 file(s)"), (sharded, "file(s): headers, layout, shard index")):
        r = pelt_main("inspect", str(path), "--verify", "--summary")
        assert r.returncode == 0, r.stderr
        assert "verified:" in r.stderr and shards in r.stderr, r.stderr
        assert "tensor(s) BertForMaskedLM loads" in r.stderr


# ------------------------------------------------------------------------------------- hangs: FIFOs


def test_fifo_named_model_safetensors_does_not_hang(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    refused("inspect", str(ckpt), match="model.safetensors: is a FIFO (named pipe)")
    assert_apply_refused("lora", ckpt, tmp_path, "is a FIFO")


def test_fifo_inside_a_checkpoint_directory_does_not_hang(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "a.safetensors")
    os.mkfifo(ckpt / "b.safetensors")
    refused("inspect", str(ckpt), match="b.safetensors: is a FIFO")
    assert_apply_refused("lora", ckpt, tmp_path, "b.safetensors: is a FIFO")


def test_fifo_config_json_does_not_hang(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    refused("inspect", str(ckpt), match="config.json: is a FIFO")


def test_fifo_as_model_exits_2(tmp_path: Path) -> None:
    fifo = tmp_path / "model"
    os.mkfifo(fifo)
    refused("inspect", str(fifo), match="is a FIFO (named pipe); expected a regular file or a directory")
    assert_apply_refused("lora", fifo, tmp_path, "is a FIFO")


def test_fifo_swapped_in_after_the_check_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    real = guard.require_regular
    try:
        guard.require_regular = lambda *a, **k: None  # the stat said "regular file"; then the file became a FIFO
        with no_hang(5), pytest.raises(CheckpointError, match="is a FIFO"):
            guard.open_regular(fifo, "a file", CheckpointError)
    finally:
        guard.require_regular = real


def test_fifo_as_data_file(tmp_path: Path) -> None:
    from pelt_cli.data import load_data
    from pelt_cli.errors import DataError

    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(DataError, match="is a FIFO"):
        load_data(fifo)


# ------------------------------------------------------------------------------------- exit codes


def test_symlink_loop_checkpoint_exits_2(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    refused("inspect", str(loop), match="symlink loop")
    inner = tmp_path / "ck"
    inner.mkdir()
    (inner / "model.safetensors").symlink_to(inner / "model.safetensors")
    refused("inspect", str(inner), match="model.safetensors: symlink loop")


def test_permission_denied_checkpoint_exits_2(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open
    target = str(ckpt / "model.safetensors")

    def deny(path: object, *a: object, **k: object) -> int:
        if os.fspath(path) == target:  # tests run as root, where chmod 000 does not stop a read
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    refused("inspect", str(ckpt), match="model.safetensors: permission denied")


# ------------------------------------------------------------------------------------- data files


def test_data_line_longer_than_the_row_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pelt_cli import data
    from pelt_cli.errors import DataError

    monkeypatch.setattr(data, "MAX_ROW_CHARS", 1000)
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok", "label": "a"}\n{"text": "' + "x" * 5000 + '", "label": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: a line longer than 1,000 characters"):
        data.load_data(f)


def test_data_csv_field_over_the_csv_limit(tmp_path: Path) -> None:
    import csv

    from pelt_cli import data
    from pelt_cli.errors import DataError

    f = tmp_path / "d.csv"
    f.write_text('text,label\n"' + ("x\n" * 3000) + '",a\n')
    old = csv.field_size_limit(1000)
    try:
        with pytest.raises(DataError, match=r"d\.csv:\d+: not valid CSV/TSV \(field larger than field limit"):
            data.load_data(f)
    finally:
        csv.field_size_limit(old)


@pytest.mark.parametrize(
    ("name", "body", "match"),
    [
        ("deep.jsonl", "[" * 100000 + "\n", "deep.jsonl:1: bad JSON (nested too deeply)"),
        ("deep.json", "[" * 100000 + "]" * 100000, "deep.json: bad JSON (nested too deeply)"),
        ("bigint.jsonl", '{"text": "a", "label": ' + "9" * 5000 + "}\n", "bigint.jsonl:1: bad JSON (Exceeds the limit"),
        ("utf16.csv", "text,label\nab,a\n".encode("utf-16").decode("latin-1"), "not UTF-8 text"),
    ],
    ids=["deep-jsonl", "deep-array", "huge-int", "utf16"],
)
def test_data_parser_failures_are_one_line(tmp_path: Path, name: str, body: str, match: str) -> None:
    from pelt_cli.data import load_data
    from pelt_cli.errors import DataError

    f = tmp_path / name
    f.write_bytes(body.encode("latin-1") if name == "utf16.csv" else body.encode())
    with pytest.raises(DataError) as e:
        load_data(f)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_open_checkpoint_library_error_names_file(tmp_path: Path) -> None:
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with no_hang(), pytest.raises(CheckpointError, match=r"x\.safetensors: is a FIFO"):
        open_checkpoint(fifo)


def test_text_only_data_on_a_bert_base_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    """A text-only file means causal-lm; a BERT base has no language-model head: one line, not AttributeError."""
    run = tmp_path / "run"
    assert pelt_main("apply", "lora", str(tiny_bert), "-o", str(run)).returncode == 0
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "good film"}\n{"text": "bad film"}\n')
    before = digest(run)
    refused("train", str(run), "--data", str(data), "--epochs", "1", match="causal-lm needs a base with a language")
    assert digest(run) == before


# ------------------------------------------------------------------------------------- adapter_config.json, run.json


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("[1, 2]", "adapter_config.json: adapter_config.json is a JSON array, expected a JSON object"),
        ('{"peft_type": ["LORA"]}', 'peft_type is ["LORA"]; expected a string'),
        ('{"peft_type": "LORA", "lora_alpha": "16"}', 'lora_alpha is "16"; expected'),
        ('{"peft_type": "LORA"}', "a LORA adapter config without lora_alpha"),
        ('{"peft_type": "LORA", "lora_alpha": 8, "alpha_pattern": {"q": "x"}}', "alpha_pattern['q'] is not a number"),
        ('{"peft_type": "LORA", "lora_alpha": 8, "modules_to_save": 3}', "modules_to_save is 3; expected"),
        ("\xff\xfe{", "is UTF-16 text; expected adapter_config.json in UTF-8"),
    ],
    ids=["list", "type-list", "alpha-string", "no-alpha", "pattern", "modules-to-save", "garbage"],
)
def test_import_peft_bad_adapter_config(bert: Path, tmp_path: Path, config: str, match: str) -> None:
    import torch
    from safetensors.torch import save_file

    pdir = tmp_path / "adapter"
    pdir.mkdir()
    (pdir / "adapter_config.json").write_bytes(config.encode("latin-1"))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(2, 2)}, pdir / "adapter_model.safetensors")
    before = digest(pdir)
    refused("import-peft", str(pdir), str(bert), "-o", str(tmp_path / "run"), match=match)
    assert digest(pdir) == before and not (tmp_path / "run").exists()


def test_import_peft_adapter_config_fifo(bert: Path, tmp_path: Path) -> None:
    pdir = tmp_path / "adapter"
    pdir.mkdir()
    os.mkfifo(pdir / "adapter_config.json")
    refused("import-peft", str(pdir), str(bert), "-o", str(tmp_path / "run"), match="adapter_config.json: is a FIFO")


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("[]", "run.json is a JSON array, expected a JSON object"),
        (
            '{"base": {"path": 1, "fingerprint": "f", "structure": "s"}, "recipe": {}, "insertions": [], '
            '"new_params": 0}',
            "base.path is not a string",
        ),
        ('{"base": [], "recipe": {}, "insertions": [], "new_params": 0}', "not a valid run.json"),
        ("{" * 100000, "not valid JSON"),
    ],
    ids=["list", "path-int", "base-list", "deep"],
)
def test_run_json_bad(tmp_path: Path, doc: str, match: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(doc)
    refused("inspect", str(run), match=match)


@pytest.mark.parametrize(
    ("head", "match"),
    [
        ({"task": "text-classification", "labels": 3}, "head.labels: 3, expected a non-empty list of strings"),
        ({"task": "text-classification", "labels": ["a"], "hidden": 32, "dropout": 7}, "head.dropout: 7"),
        ({"labels": ["a", "b"], "hidden": 32}, "head.task: None, expected a string"),
    ],
)
def test_run_json_with_a_bad_head(bert: Path, tmp_path: Path, head: dict, match: str) -> None:
    """A hand-edited head in run.json is refused where run.json is read, before train or merge builds from it."""
    run = tmp_path / "run"
    assert pelt_main("apply", "lora", str(bert), "-o", str(run)).returncode == 0
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, "head": head}))
    before = digest(run)
    refused("merge", str(run), "-o", str(tmp_path / "merged"), match=match)
    refused("train", str(run), "--data", "vader", "--epochs", "1", match=match)
    assert digest(run) == before and not (tmp_path / "merged").exists()


def test_lone_surrogate_escape_in_json_inputs(ckpt: Path) -> None:
    """``"\\ud800"`` is valid JSON but not text (printing it would fail): refused in any JSON pelt reads."""
    doc = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**doc, "model_type": "bert", "label": "\ud800"}))
    refused("inspect", str(ckpt), match="a lone surrogate escape that is not text")
    doc["label"] = "\ud83d\ude00"  # a pair is a character: fine
    (ckpt / "config.json").write_text(json.dumps(doc))
    assert pelt_main("inspect", str(ckpt)).returncode == 0


def test_recipe_seed_beyond_64_bits(tmp_path: Path) -> None:
    text = LORA.replace("name:", "seed: 18446744073709551616\nname:", 1)
    refused("validate", str(write_recipe(tmp_path, text)), match="expected an integer from 0 to 2**63 - 1")
