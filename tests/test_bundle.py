"""``pelt export``: diffed bundles (nothing that equals the base, exact round trip, fingerprints, tar)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import make_run, outputs
from safetensors.torch import load_file

from pelt_cli.bundle import BUNDLE_FILE, MANIFEST_FILE, apply_bundle, export_bundle
from pelt_cli.errors import BaseMismatch
from pelt_cli.io.checkpoint import open_checkpoint
from pelt_cli.io.fingerprint import tensor_digest
from pelt_cli.io.writer import save_file
from pelt_cli.run import ADAPTER_FILE, RUN_FILE, load_run


@pytest.mark.parametrize("family,recipe", [("bert", "lora"), ("gpt2", "ia3-gpt2"), ("llama", "lora-all-linear")])
def test_bundle_round_trip(tiny_dir: Path, tmp_path: Path, family: str, recipe: str) -> None:
    run = make_run(recipe, tiny_dir / family, tmp_path / "run")
    manifest = export_bundle(run, tmp_path / "bundle")
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [BUNDLE_FILE, MANIFEST_FILE]
    base = open_checkpoint(tiny_dir / family)
    base_digests = {tensor_digest(i) for i in base.tensors.values()}
    bundle = open_checkpoint(tmp_path / "bundle" / BUNDLE_FILE)
    assert not {tensor_digest(i) for i in bundle.tensors.values()} & base_digests  # nothing equals the base
    rows = {t["name"]: t for t in manifest["tensors"]}
    adapter = open_checkpoint(run / ADAPTER_FILE)
    assert set(rows) == set(adapter.tensors)
    by_ref = {n for n, t in rows.items() if t["stored"] == "base"}
    assert set(bundle.tensors) == set(adapter.tensors) - by_ref
    if family == "gpt2":  # the fixed-at-one q thirds equal a LayerNorm weight of ones: referenced, not stored
        assert by_ref and all(n.endswith(".ones") for n in by_ref)
    assert manifest["base"]["fingerprint"] == json.loads((run / RUN_FILE).read_text())["base"]["fingerprint"]
    size = sum(p.stat().st_size for p in (tmp_path / "bundle").iterdir())
    manifest_size = (tmp_path / "bundle" / MANIFEST_FILE).stat().st_size
    assert size <= 1.01 * (run / ADAPTER_FILE).stat().st_size + manifest_size
    assert sum(i.nbytes for i in bundle.tensors.values()) <= adapter.total_bytes
    rebuilt = apply_bundle(tmp_path / "bundle", tiny_dir / family, tmp_path / "rebuilt")
    a, b = load_file(run / ADAPTER_FILE), load_file(rebuilt / ADAPTER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1, _ = load_run(run)
    m2, _ = load_run(rebuilt)
    assert torch.equal(outputs(m1, family), outputs(m2, family))


def test_wrong_base_refused_force_overrides(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run("lora", tiny_dir / "llama", tmp_path / "run")
    export_bundle(run, tmp_path / "bundle")
    other = tmp_path / "other"
    shutil.copytree(tiny_dir / "llama", other)
    state = load_file(other / "model.safetensors")
    state["model.norm.weight"] += 0.5
    save_file(state, other / "model.safetensors")
    with pytest.raises(BaseMismatch) as e:
        apply_bundle(tmp_path / "bundle", other, tmp_path / "r")
    want = json.loads((tmp_path / "bundle" / MANIFEST_FILE).read_text())["base"]["fingerprint"]
    got = json.loads((run / RUN_FILE).read_text())["base"]["fingerprint"]
    assert e.value.exit_code == 2 and want in str(e.value) and "blake2b:" in str(e.value).replace(want, "")
    assert want == got and not (tmp_path / "r").exists()
    out = apply_bundle(tmp_path / "bundle", other, tmp_path / "r", force=True)
    model, meta = load_run(out)  # recorded on the new base: the fingerprint check passes
    assert meta["base"]["fingerprint"] != want and meta["from_bundle"]["base_fingerprint"] == want
    # a tensor the bundle takes from the base must match whatever force says
    run2 = make_run("ia3-gpt2", tiny_dir / "gpt2", tmp_path / "run2")
    export_bundle(run2, tmp_path / "b2")
    g2 = tmp_path / "gpt2b"
    shutil.copytree(tiny_dir / "gpt2", g2)
    st = load_file(g2 / "model.safetensors")
    for k in st:
        if k.endswith("ln_1.weight"):
            st[k] = st[k] * 2
    save_file(st, g2 / "model.safetensors")
    with pytest.raises(BaseMismatch, match="no --force"):
        apply_bundle(tmp_path / "b2", g2, tmp_path / "r2", force=True)


def test_tar_stream(tiny_dir: Path, tmp_path: Path) -> None:
    run = make_run("ia3", tiny_dir / "bert", tmp_path / "run")
    export_bundle(run, tmp_path / "bundle")
    buf = io.BytesIO()
    manifest = export_bundle(run, "-", stream=buf)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.getnames() == [MANIFEST_FILE, BUNDLE_FILE]
        tar.extractall(tmp_path / "untarred", filter="data")
    assert (tmp_path / "untarred" / BUNDLE_FILE).read_bytes() == (tmp_path / "bundle" / BUNDLE_FILE).read_bytes()
    m2 = json.loads((tmp_path / "untarred" / MANIFEST_FILE).read_text())
    m1 = json.loads((tmp_path / "bundle" / MANIFEST_FILE).read_text())
    assert m2 == manifest and {**m1, "created": None} == {**m2, "created": None}
    (tmp_path / "b.tar").write_bytes(raw)
    rebuilt = apply_bundle(tmp_path / "b.tar", tiny_dir / "bert", tmp_path / "rebuilt")  # a tar file works too
    a, b = load_file(run / ADAPTER_FILE), load_file(rebuilt / ADAPTER_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)
