"""Hub ids as MODEL (``org/name[@revision]``): offline from a fake Hugging Face cache, and ``pelt inspect`` over
HTTP from a local stand-in for the Hub (``HF_ENDPOINT``). Never the internet."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tiny_models
from conftest import REPO, pelt_main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaMA with a large vocabulary (about 4 MB of fp32 weights, so headers are a small share), saved
    single-file and sharded."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tiny_models.config("llama", vocab_size=16384, tie_word_embeddings=False))
    root = tmp_path_factory.mktemp("hubmodels")
    model.save_pretrained(root / "tiny")
    model.save_pretrained(root / "tiny-sharded", max_shard_size="3MB")
    (root / "longhead").mkdir()  # a header longer than the first Range request: read with a second one
    tensors = {f"layers.{i}.weight": torch.zeros(4, 4) for i in range(8)}
    save_file(tensors, root / "longhead" / "model.safetensors", metadata={"note": "x" * 40_000})
    return {"org/tiny": root / "tiny", "org/tiny-sharded": root / "tiny-sharded", "org/longhead": root / "longhead"}


def make_cache(cache: Path, repo_id: str, src: Path, refs: tuple[str, ...] = ("main", "v1")) -> Path:
    """Lay ``src``'s files out as huggingface_hub does: blobs by hash, a snapshot of links, refs → commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(COMMIT)
    return snap


@pytest.fixture
def cache(tmp_path: Path, saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_CACHE → a fake cache holding org/tiny (refs main and v1), offline."""
    root = tmp_path / "hub"
    make_cache(root, "org/tiny", saved["org/tiny"])
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def errors(stderr: str) -> list[str]:
    """The non-empty lines of stderr."""
    return [line for line in stderr.splitlines() if line.strip()]


def inspect_json(model: str) -> dict[str, Any]:
    """``pelt inspect MODEL --format json`` in this process, as a dict without its ``path``."""
    r = pelt_main("inspect", model, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    doc.pop("path")
    return doc


# ------------------------------------------------------------------------------------------------ offline, cache


@pytest.mark.parametrize("rev", ["", "@main", "@v1", f"@{COMMIT}"])
def test_cached_id_resolves_to_snapshot(cache: Path, rev: str) -> None:
    from pelt_cli.report import resolve_model

    path = resolve_model(f"org/tiny{rev}")
    assert path == cache / "models--org--tiny" / "snapshots" / COMMIT
    assert (path / "model.safetensors").is_file()


def test_cached_id_inspects_and_validates_like_disk(cache: Path, saved: dict[str, Path]) -> None:
    assert inspect_json("org/tiny@v1") == inspect_json(str(saved["org/tiny"]))
    r = pelt_main("validate", "lora", "org/tiny")
    assert r.returncode == 0, r.stderr
    assert "site(s)" in r.stderr


@pytest.mark.parametrize("cmd", [("inspect",), ("apply", "lora", "--dry-run"), ("validate", "lora")])
def test_id_not_in_cache_is_one_line(cache: Path, cmd: tuple[str, ...]) -> None:
    args = [*cmd[:-1], "other/model", cmd[-1]] if cmd[0] == "apply" else [*cmd, "other/model"]
    r = pelt_main(*args)
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "other/model" in line and "not in the Hugging Face cache" in line
    assert "hf download other/model" in line


def test_revision_not_in_cache_is_one_line(cache: Path) -> None:
    r = pelt_main("apply", "lora", "org/tiny@nope", "--dry-run")
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "'nope'" in line and "cached: main, v1" in line and "hf download org/tiny --revision nope" in line


@pytest.mark.parametrize("bad", ["org/na me", "org/name@", "org/bad--name", "org/-name", "org/name@a@b"])
def test_malformed_id_is_one_line(cache: Path, bad: str) -> None:
    r = pelt_main("inspect", bad)
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "not a Hub id" in line and "org/name@revision" in line


def test_incomplete_snapshot_is_one_line(cache: Path, saved: dict[str, Path]) -> None:
    snap = make_cache(cache, "org/partial", saved["org/tiny"])
    (snap / "model.safetensors").unlink()
    r = pelt_main("validate", "lora", "org/partial")
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "incomplete" in line and "hf download org/partial" in line


def test_paths_still_win(cache: Path, tmp_path: Path, saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from pelt_cli.hub import cached_ids, parse_hub_id

    monkeypatch.chdir(tmp_path)
    shutil.copytree(saved["org/tiny"], tmp_path / "org" / "tiny")
    assert inspect_json("org/tiny")["files"] == ["model.safetensors"]
    r = pelt_main("inspect", "org/typo")  # a mistyped local path: the usual message, not the cache's
    assert r.returncode == 2 and "no such file or directory" in r.stderr and "Hugging Face" not in r.stderr
    assert parse_hub_id("./org/tiny") is None and parse_hub_id("a/b/c") is None
    assert parse_hub_id("dir/model.safetensors") is None
    assert str(parse_hub_id("Qwen/Qwen2.5-0.5B@refs/pr/1")) == "Qwen/Qwen2.5-0.5B@refs/pr/1"
    assert cached_ids("org/") == ["org/tiny"]


# ------------------------------------------------------------------------------------------------ online, stand-in Hub


class FakeHub(BaseHTTPRequestHandler):
    """Serves ``/{org}/{name}/resolve/{rev}/{file}`` (HEAD and GET with Range) like the Hub, and counts bytes."""

    repos: dict[str, Path] = {}
    served: dict[str, int] = {}
    requests: list[str] = []

    def log_message(self, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        FakeHub.requests.append(f"{self.command} {self.path}")
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
        if m is None or m[1] not in self.repos:
            return self._error("RepoNotFound")
        if m[2] not in ("main", "v1", COMMIT):
            return self._error("RevisionNotFound")
        f = self.repos[m[1]] / m[3]
        if not f.is_file():
            return self._error("EntryNotFound")
        data = f.read_bytes()
        rng = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        lo, hi = (int(rng[1]), min(int(rng[2]), len(data) - 1)) if rng else (0, len(data) - 1)
        chunk = data[lo : hi + 1]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if body:
            self.wfile.write(chunk)
            FakeHub.served[m[3]] = FakeHub.served.get(m[3], 0) + len(chunk)

    def _error(self, code: str) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def hub(tmp_path: Path, saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeHub]]:
    """A stand-in Hub on 127.0.0.1 (HF_ENDPOINT), online for this test only, with an empty cache."""
    from huggingface_hub import constants

    FakeHub.repos, FakeHub.served, FakeHub.requests = dict(saved), {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    try:
        yield FakeHub
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("repo", ["org/tiny", "org/tiny-sharded"])
def test_inspect_over_http_matches_disk(hub: type[FakeHub], saved: dict[str, Path], repo: str) -> None:
    remote = inspect_json(repo)
    assert remote == inspect_json(str(saved[repo]))
    weights = sum(f.stat().st_size for f in saved[repo].glob("*.safetensors"))
    fetched = sum(n for name, n in hub.served.items() if name.endswith(".safetensors"))
    shards = len(remote["files"])
    assert 0 < fetched <= shards * 16 * 1024 and fetched < weights / 100, (fetched, weights)
    assert remote["total_bytes"] > 0.9 * weights
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not cache.exists() or not any(cache.rglob("*.safetensors*"))  # headers only, nothing cached


def test_inspect_over_http_long_header(hub: type[FakeHub], saved: dict[str, Path]) -> None:
    assert inspect_json("org/longhead") == inspect_json(str(saved["org/longhead"]))
    gets = [r for r in hub.requests if r.startswith("GET") and r.endswith("model.safetensors")]
    assert len(gets) == 2 and hub.served["model.safetensors"] < 60_000


def test_inspect_over_http_revision(hub: type[FakeHub], saved: dict[str, Path]) -> None:
    assert inspect_json("org/tiny@v1") == inspect_json(str(saved["org/tiny"]))
    r = pelt_main("inspect", "org/tiny@nope")
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "no revision 'nope' on the Hub" in line


def test_inspect_over_http_unknown_repo(hub: type[FakeHub]) -> None:
    r = pelt_main("inspect", "org/missing")
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "org/missing" in line and "no such model on the Hub" in line


def test_apply_never_downloads(hub: type[FakeHub]) -> None:
    r = pelt_main("apply", "lora", "org/tiny", "--dry-run")
    assert r.returncode == 2
    (line,) = errors(r.stderr)
    assert "not in the Hugging Face cache" in line and "hf download org/tiny" in line
    assert hub.requests == []


def test_help_and_local_inspect_do_not_import_huggingface_hub(saved: dict[str, Path]) -> None:
    code = (
        "import sys\nfrom pelt_cli.cli import main\nmain(['--help'])\nmain(['inspect', sys.argv[1], '--summary'])\n"
        "print('HUB', 'huggingface_hub' in sys.modules, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(saved["org/tiny"])], capture_output=True, text=True, cwd=REPO)
    assert "HUB False" in r.stderr, r.stderr
