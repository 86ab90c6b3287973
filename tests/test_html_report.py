"""``pelt report``: one self-contained HTML page (inline SVG, no script, nothing fetched) with every chart, rendered
by headless Chromium; the per-epoch gate histograms in gates.json; ``pelt gates --png`` without matplotlib."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pelt_main

from pelt_cli.html_report import CHARTS, KEEP, PRUNED
from pelt_cli.methods.unipelt import HIST_BINS, GateController, bin_counts

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 4200)


@pytest.fixture(scope="module")
def pruned_run(tiny_bert: Path, sentiment: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny UniPELT run trained 2 epochs (a training row every step, an evaluation within each epoch), then
    pruned to its 4 highest gates."""
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply
    from pelt_cli.prune import prune_run
    from pelt_cli.train import TrainConfig, train_run

    d = tmp_path_factory.mktemp("report")
    run = apply(rc.load("unipelt"), tiny_bert, d / "run")
    cfg = TrainConfig(
        epochs=2, batch_size=32, lr=1e-2, warmup=0.0, patience=0, max_length=16, log_every=1, eval_every=4
    )
    train_run(run, str(sentiment[0]), str(sentiment[1]), cfg)
    prune_run(run, d / "pruned", keep_top_k=4)
    return d / "pruned"


def test_bin_counts_and_histograms_only_while_measuring() -> None:
    v = torch.tensor([[0.0, 0.05], [0.1, 0.5], [0.999, 1.0], [0.35, 0.0]])
    counts = bin_counts(v)
    assert counts.shape == (2, HIST_BINS)
    assert counts[0].tolist() == [1, 1, 0, 1, 0, 0, 0, 0, 0, 1]  # 0.1 opens bin 1; 0.999 is in the last bin
    assert counts[1].tolist() == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]  # 1.0 is in the last bin
    ctl = GateController(8, ["lora", "adapter"])
    h = torch.randn(5, 3, 8)
    ctl.compute(h)  # not measuring (a training step): nothing counted
    assert ctl.stats()["lora"]["hist"] == [0] * HIST_BINS
    ctl.start_measuring()
    ctl.compute(h)
    ctl.compute(h[:2])
    stats = ctl.stop_measuring()
    for i, m in enumerate(["lora", "adapter"]):
        assert sum(stats[m]["hist"]) == 7 == stats[m]["count"]
        g = torch.cat([ctl.net(h).sigmoid().mean(1), ctl.net(h[:2]).sigmoid().mean(1)])[:, i].detach()
        assert stats[m]["hist"] == bin_counts(g.unsqueeze(1))[0].tolist()


def test_gates_json_keeps_a_histogram_per_epoch(pruned_run: Path) -> None:
    doc = json.loads((pruned_run / "gates.json").read_text())
    assert sorted(doc["histograms"]) == ["1", "2"]
    for epoch, sites in doc["histograms"].items():
        assert set(sites) == set(doc["layers"]) and len(sites) == 2
        for site, mods in sites.items():
            assert set(mods) == {"lora", "prefix", "adapter"}
            for m, counts in mods.items():
                assert len(counts) == HIST_BINS and sum(counts) == 64  # every eval sentence, once
                if epoch == str(doc["epoch"]):  # the kept epoch's statistics: the histogram fits min and max
                    s = doc["layers"][site][m]
                    assert counts == s["hist"]
                    used = [b for b, c in enumerate(counts) if c]
                    assert used[0] == min(int(s["min"] * HIST_BINS), 9) and used[-1] == min(int(s["max"] * 10), 9)


def _report(run: Path, out: Path) -> str:
    r = pelt_main("report", str(run), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out) and f"wrote {out}" in r.stderr
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # atomic: no temporary file left
    return out.read_text(encoding="utf-8")


def test_report_is_self_contained_with_every_chart(pruned_run: Path, tmp_path: Path) -> None:
    page = _report(pruned_run, tmp_path / "out" / "report.html")
    for chart in CHARTS:
        assert page.count(f'<svg id="{chart}"') == 1, chart
    ids = re.findall(r'<svg id="([\w-]+)"', page)  # with AutoPELT's contribution, chart-contribution too
    assert set(CHARTS) <= set(ids) and len(ids) == len(set(ids)) == page.count("<svg") == page.count("</svg>")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|url\(|@import", page, re.I)
    meta = json.loads((pruned_run / "run.json").read_text())
    pruned = meta["pruning"]["history"][0]["pruned"]
    assert len(pruned) == 2  # 6 gated units, the 4 highest kept
    assert f"{meta['new_params']:,}" in page and f"{meta['pruning']['original_new_params']:,}" in page
    assert page.count('class="total"') == 2  # per method and per insertion
    assert len(re.findall(r"<tr><td>unipelt\.\w+</td><td>encoder\.layer", page)) == len(meta["insertions"])
    assert page.count(f'fill="{PRUNED}"') >= 2 and page.count(f'fill="{KEEP}"') >= 4
    hollow = re.findall(r'<circle [^>]*fill="#fff"', page)
    assert len(hollow) >= 2  # the evaluations within each epoch (--eval-every), drawn open
    r = pelt_main("report", str(pruned_run), "-o", "-")
    assert r.returncode == 0 and r.stdout.startswith("<!DOCTYPE html>") and r.stdout.rstrip().endswith("</html>")
    assert all(f'<svg id="{c}"' in r.stdout for c in CHARTS)


def test_sections_without_data_say_so(tiny_bert: Path, tmp_path: Path) -> None:
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply

    run = apply(rc.load("lora"), tiny_bert, tmp_path / "lora")
    page = _report(run, tmp_path / "out" / "r.html")
    assert "<svg" not in page
    for line in ("No training recorded", "No gate statistics", "Nothing gated to prune"):
        assert page.count(line) == 1, line
    rows = json.loads((run / "run.json").read_text())["insertions"]
    assert len(re.findall(r"<tr><td>lora</td><td>encoder", page)) == len(rows) == 4  # q and v in 2 layers


def test_bad_run_is_one_line_and_exit_2(tiny_bert: Path, tmp_path: Path) -> None:
    for bad in (tmp_path / "missing", tiny_bert):
        r = pelt_main("report", str(bad), "-o", str(tmp_path / "r.html"))
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.startswith("error: ") and str(bad) in r.stderr.splitlines()[0]
    assert not (tmp_path / "r.html").exists()


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB(A), non-interlaced PNG (what Chromium writes) → [H, W, 3] uint8, with zlib and numpy only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, 1 + w * bpp)
    out = np.zeros((h, w * bpp), dtype=np.uint8)
    prev = np.zeros(w * bpp, dtype=np.uint8)
    for y in range(h):
        f, line = raw[y, 0], raw[y, 1:]
        if f == 0:  # None, Sub, Up vectorised; Average and Paeth pixel by pixel
            cur = line.copy()
        elif f == 1:
            cur = (np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.int64) % 256).astype(np.uint8).reshape(-1)
        elif f == 2:
            cur = line + prev
        else:
            cur = _unfilter(int(f), line.tolist(), prev.tolist(), bpp)
        out[y] = prev = cur
    return out.reshape(h, w, bpp)[:, :, :3]


def _unfilter(f: int, line: list[int], prev: list[int], bpp: int) -> np.ndarray:
    cur = [0] * len(line)
    for i, x in enumerate(line):
        a, b = (cur[i - bpp] if i >= bpp else 0), prev[i]
        if f == 3:
            cur[i] = (x + ((a + b) >> 1)) & 255
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cur[i] = (x + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return np.array(cur, dtype=np.uint8)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM.exists(), "needs Chromium: apt-get install -y chromium (scripts/test.sh installs it as root)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'p'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


def _pixels(img: np.ndarray, hex_color: str) -> int:
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return int((np.abs(img.astype(int) - rgb).max(axis=2) <= 2).sum())


def test_report_renders_in_headless_chromium(pruned_run: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    _report(pruned_run, page)
    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    for chart in CHARTS:  # the browser parsed every chart as an SVG element
        assert re.search(rf'<svg id="{chart}"[^>]*viewBox=', dom.stdout), chart
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", page.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = decode_png(shot.read_bytes())
    assert img.shape == (WINDOW[1], WINDOW[0], 3)
    ink = (img < 200).any(axis=2)
    assert ink.mean() > 0.02, f"{ink.mean():.4f} of the page is drawn: blank?"
    rows = np.flatnonzero(ink.any(axis=1))
    assert rows[-1] - rows[0] > 2500  # drawn from the title down to the parameter table
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # charts, not only text
    assert _pixels(img, KEEP) > 2000 and _pixels(img, PRUNED) > 300  # the kept and pruned bars are painted


def test_gates_png_prints_the_table_first(pruned_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "gates.png"
    r = pelt_main("gates", str(pruned_run), "--format", "tsv", "--png", str(png))
    assert len(r.stdout.splitlines()) == 1 + 2 * 3  # the table, whatever happens to the PNG
    if importlib.util.find_spec("matplotlib") is None:
        assert r.returncode == 1 and not png.exists()
        assert r.stderr.splitlines() == [
            "error: --png needs matplotlib, which is not installed: pip install 'pelt[plot]' "
            "(or: pelt report RUN -o report.html, which needs nothing more)"
        ]
    else:
        assert r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_domain_gate_histogram_and_report(tiny_bert: Path, tmp_path: Path) -> None:
    """A domain adapter's per-timestep gate: its histogram per epoch in gates.json, drawn by the report."""
    from pelt_cli import gates as gatestats
    from pelt_cli import recipe as rc
    from pelt_cli.apply import apply

    meter = gatestats.DomainGateMeter()
    meter.add(torch.tensor([0.05, 0.31, 0.35, 0.99]).reshape(1, 4, 1))
    meter.add(torch.tensor([0.62, 1.0]).reshape(2, 1, 1))
    assert meter.stats()["hist"] == [1, 0, 0, 2, 0, 0, 1, 0, 0, 2] and meter.stats()["count"] == 6
    snap = {"layers": {}, "domain": {"gate": meter.stats(), "scale": 0.1, "healthy": True}}
    doc = gatestats.merge_history(None, snap, 1)
    doc = gatestats.merge_history(doc, snap, 2)
    assert doc["histograms"] == {e: {"domain": {"gate": [1, 0, 0, 2, 0, 0, 1, 0, 0, 2]}} for e in ("1", "2")}
    run = apply(rc.load("lora"), tiny_bert, tmp_path / "run")
    (run / "gates.json").write_text(json.dumps(doc))  # as a domain run's training leaves it
    page = _report(run, tmp_path / "out" / "r.html")
    for chart in ("chart-gate-history", "chart-gate-histograms", "chart-prune"):
        assert f'<svg id="{chart}"' in page, chart
    assert "chart-contribution" not in page and "Switched during training" not in page
    # AutoPELT's records (pelt_cli/autopelt.py): gates.json's contribution, metrics.jsonl's autoprune rows
    site = "encoder.layer.0.attention.self.query"
    con = {m: {"value": v, "relative": v / 0.4, "off": v < 0.1} for m, v in (("lora", 0.4), ("adapter", 0.02))}
    doc["contribution"] = {
        "window": 8,
        "auto_prune": 0.2,
        "epoch": 2,
        "layers": {site: con},
        "off": [f"{site}/adapter"],
    }
    (run / "gates.json").write_text(json.dumps(doc))
    rows = [
        {"kind": "autoprune", "step": s, "epoch": 1, "threshold": 0.2, "pruned": p, "reactivated": [], "off": p}
        for s, p in ((8, [f"{site}/adapter"]), (16, []))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = _report(run, tmp_path / "out2" / "r.html")
    assert page.count('<svg id="chart-contribution"') == 1 and "(--auto-prune 0.2)" in page
    assert f"<tr><td class=n>8</td><td class=n>1</td><td>{site}/adapter</td><td>–</td><td class=n>1</td></tr>" in page
    assert "No per-layer gates (UniPELT)" in page and "Domain adapter: mean gate 0.5533" in page
    assert page.count("<title>domain adapter · gate, epoch ") == 2  # one outline per epoch
