"""The paired-runs report (evaluation/report.py), checked as a reader sees it: in a real headless Chromium.

Two tiny fake runs (metrics.jsonl, scores JSON, PNG grids, a FID JSON under a step folder) and a
fake REPA-E run are turned into a report; Chromium loads ``index.html`` from disk and we assert
that it loaded, logged no console or network error, shows the tables with the expected numbers,
and that every <img> decoded (naturalWidth > 0). A deliberately broken page proves the checker
sees what it should.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (fds 3/4,
NUL-separated JSON): no Python package, no browser download, no port. ``make test`` installs
Debian's ``chromium`` when missing; without the binary the browser test skips and says so.
"""

from __future__ import annotations

import html
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from evaluation.report import build_report, fmt, main, nice_ticks, read_metrics

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
EVIL = '<script>alert("x")</script>&'


# --------------------------------------------------------------------------------------------
# Fake runs
# --------------------------------------------------------------------------------------------
def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 24)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _metrics(run: Path, losses: list[float], extra: str | None = None) -> None:
    lines = [
        json.dumps({"step": 10 * (i + 1), "time": 1.0 + i, "train/loss": v, "train/lr": 1e-3, "data/skipped": 0})
        for i, v in enumerate(losses)
    ]
    if extra:
        lines.append(extra)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _toy_scores(color: float, shape: float, checkpoint: str) -> dict[str, Any]:
    return {
        "n": 72,
        "accuracy": {"color": color, "shape": shape, "position": 1.0},
        "chance": {"color": 1 / 6, "shape": 0.25, "position": 0.2},
        "joint_accuracy": color * shape,
        "joint_chance": 1 / 120,
        "guidance_scale": 1.5,
        "steps": 25,
        "seed": 0,
        "ema": True,
        "checkpoint": checkpoint,
    }


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    a, b = root / "run a", root / "run-b"  # a space in a path must survive the relative links
    for run in (a, b):
        (run / "40").mkdir(parents=True)
        (run / "40" / "trainer_state.json").write_text('{"step": 40}')  # bookkeeping, not a metric
    # a resumed run logs step 40 twice and a run being written can end in half a line
    _metrics(a, [1.0, 0.5, 0.3, 0.9], extra=json.dumps({"step": 40, "train/loss": 0.25}) + '\n{"step": 5')
    _metrics(b, [1.2, 0.4, 0.2, 0.1])
    (a / "scores.json").write_text(json.dumps(_toy_scores(0.75, 0.5, "40")))
    b_scores = root / "elsewhere" / "b_scores.json"  # given with --scores
    b_scores.parent.mkdir()
    b_scores.write_text(json.dumps(_toy_scores(0.875, 0.625, "40")))
    (a / "40" / "fid.json").write_text(json.dumps({"fid": 12.5, "num_fake": 72, "feature_extractor": "x"}))
    (b / "40" / "fid.json").write_text(json.dumps({"fid": 10.25, "num_fake": 72, "feature_extractor": "x"}))
    _png(a / "heldout_grid.png", (200, 30, 30))
    _png(root / "elsewhere" / "grid b.png", (30, 30, 200))
    _png(a / "samples" / "00000040.png", (10, 200, 10))
    _png(b / "samples" / "00000040.png", (10, 150, 10))
    repae = root / "repae"
    repae.mkdir()
    (repae / "metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "sit_loss": 2.0 / s, "vae_loss": 0.1 * s}) for s in (25, 50, 75)) + "\n"
    )
    (repae / "vae_comparison.json").write_text(json.dumps(_vae_comparison()))
    out = root / "out"
    start = time.perf_counter()
    rc = main(
        [
            *("--run", f"orig={a}", "--run", f"e2e={b}"),
            *("--scores", f"e2e={b_scores}", "--grids", f"e2e={root / 'elsewhere' / 'grid b.png'}"),
            *("--repae", str(repae), "--out", str(out), "--title", f"pair {EVIL}"),
        ]
    )
    assert rc == 0, "report CLI failed"
    return {"out": out, "page": out / "index.html", "seconds": time.perf_counter() - start, "root": root}


def _vae_comparison() -> dict[str, Any]:
    def vae(psnr: float, spatial: list[float]) -> dict[str, Any]:
        return {
            "num_images": 64,
            "metrics": {"psnr_db": psnr, "ssim": 0.9, "lpips": 0.05, "rfid": 3.5},
            "posterior": {"kl_per_element": 0.01},
            "latents": {"mean": {"spatial_var": spatial, "spatial_var_avg": sum(spatial) / len(spatial)}},
        }

    return {"vaes": {"original": vae(30.5, [1.0, 2.0, 3.0, 4.0]), "e2e": vae(29.25, [0.5, 1.5, 2.5, 3.5])}, "notes": []}


# --------------------------------------------------------------------------------------------
# Without a browser: files, numbers, escaping
# --------------------------------------------------------------------------------------------
class Tables(HTMLParser):
    """Every <table> as {id: [[cell text, ...], ...]} and every <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_report_files_numbers_and_escaping(report: dict[str, Any]) -> None:
    page = report["page"].read_text()
    assert report["seconds"] < 20
    parser = Tables()
    parser.feed(page)
    scores = parser.tables["scores-40"]
    assert scores[0] == ["source", "metric", "chance", "orig", "e2e", "e2e \u2212 orig"]
    rows = {r[1]: r for r in scores[1:]}
    assert rows["color accuracy"][2:] == ["0.1667", "0.75", "0.875", "+0.125"]
    assert rows["shape accuracy"][2:] == ["0.25", "0.5", "0.625", "+0.125"]
    assert rows["joint accuracy"][3:5] == ["0.375", "0.5469"]
    assert rows["fid"][0] == "fid" and rows["fid"][3:] == ["12.5", "10.25", "-2.25"]  # JSON under <run>/40/
    assert rows["seed"][3:] == ["0", "0", ""]  # a setting: no difference column
    vae = {r[0]: r for r in parser.tables["vae-comparison"][1:]}
    assert vae["PSNR (dB)"][1:] == ["30.5", "29.25", "-1.25"]
    assert vae["rFID"][1:3] == ["3.5", "3.5"]
    assert vae["latent spatial variance, channel 3"][1:] == ["4", "3.5", "-0.5"]
    # the page escapes what it was given, and links only to files it copied next to itself
    assert EVIL not in page and html.escape(EVIL) in page
    assert "http" not in page.replace("http-equiv", "") and "<script" not in page and "<link" not in page
    assert len(parser.images) == 7  # 2 held-out grids, 2 training samples, 3 plots
    for src in parser.images:
        assert not src.startswith(("/", "file:")) and (report["out"] / src).is_file(), src
    assert {p.name for p in (report["out"] / "plots").glob("*.png")} >= {"train_loss.png", "repae-sit_loss.png"}
    assert "data/skipped = 0" in page  # constant: listed, not plotted
    assert "train_lr.png" not in page  # constant lr too


def test_metrics_reader_and_helpers(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 2, "loss": 1}\n{"step": 1, "loss": 3}\n{"step": 2, "loss": 0.5}\nnot json\n{"x": 1}\n')
    assert [(r["step"], r["loss"]) for r in read_metrics(f)] == [(1, 3), (2, 0.5)]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(0.013, 0.087, 4) == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert fmt(float("nan")) == "n/a" and fmt(None) == "n/a" and fmt(72) == "72" and fmt(1 / 3) == "0.3333"
    with pytest.raises(ValueError, match="not given with --run"):
        build_report({"a": tmp_path}, tmp_path / "o", scores={"b": f})


# --------------------------------------------------------------------------------------------
# In Chromium
# --------------------------------------------------------------------------------------------
def chromium_binary() -> str | None:
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


class Browser:
    """Headless Chromium over the DevTools pipe: one page, events collected while waiting for replies."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()

        def child_fds() -> None:  # the protocol's fixed descriptors: 3 = commands in, 4 = replies out
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
        args += ["--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            [binary, *args],
            pass_fds=(3, 4),
            preexec_fn=child_fds,  # only dup2, between fork and exec
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._out = os.fdopen(to_browser_w, "wb")
        self._in = from_browser_r
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=self.session)

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._in, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _next(self, deadline: float) -> dict[str, Any]:
        try:
            message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("chromium did not answer in time") from None
        if message is None:
            raise RuntimeError(f"chromium exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
        return message

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        self._out.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def load(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait for the load event (all images fetched and decoded or failed)."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=self.session)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._next(deadline))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries (failed resource loads among them)."""
        found = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                found.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


PAGE_STATE = """JSON.stringify({
  title: document.title,
  images: [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete, w: i.naturalWidth})),
  tables: Object.fromEntries([...document.querySelectorAll('table')].map(t => [t.id,
    [...t.rows].map(r => [...r.cells].map(c => c.textContent.trim()))])),
  scripts: document.scripts.length,
  stylesheets: [...document.styleSheets].map(s => s.href),
})"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    binary = chromium_binary()
    if binary is None:
        pytest.skip(
            "no Chromium binary (looked for $CHROMIUM, " + ", ".join(CHROMIUM_NAMES) + "): `make test` installs "
            "Debian's package with apt-get install chromium; install it to run the browser check"
        )
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def test_report_in_headless_chromium(report: dict[str, Any], browser: Browser) -> None:
    start = time.perf_counter()
    browser.load(report["page"].resolve().as_uri())
    state = json.loads(browser.evaluate(PAGE_STATE))
    assert browser.errors() == []
    assert state["title"] == f"pair {EVIL}"  # escaped in the source, shown as written
    assert state["scripts"] == 0 and state["stylesheets"] == [None]  # one inline <style>, nothing fetched
    assert len(state["images"]) == 7
    broken = [i for i in state["images"] if not (i["complete"] and i["w"] > 0)]
    assert broken == [], broken
    scores = {r[1]: r for r in state["tables"]["scores-40"][1:]}
    assert scores["color accuracy"][2:] == ["0.1667", "0.75", "0.875", "+0.125"]
    assert scores["fid"][3:5] == ["12.5", "10.25"]
    vae = {r[0]: r for r in state["tables"]["vae-comparison"][1:]}
    assert vae["PSNR (dB)"][1:3] == ["30.5", "29.25"] and vae["LPIPS"][1:3] == ["0.05", "0.05"]
    grids = [i for i in state["images"] if i["src"].startswith("grids/")]
    assert {i["w"] for i in grids} == {40}  # the fake 40x24 grids, copied and decoded
    assert time.perf_counter() - start < 15


def test_checker_sees_broken_pages(tmp_path: Path, browser: Browser) -> None:
    """The browser check is only worth something if a broken page fails it."""
    _png(tmp_path / "ok.png", (1, 2, 3))
    page = tmp_path / "broken.html"
    page.write_text('<img src="ok.png"><img src="missing.png"><script>console.error("boom"); undefinedFn();</script>')
    browser.load(page.as_uri())
    errors = browser.errors()
    assert any("boom" in e for e in errors) and any("exception" in e for e in errors)
    assert any("missing.png" in e for e in errors)
    widths = json.loads(browser.evaluate("JSON.stringify([...document.images].map(i => i.naturalWidth))"))
    assert widths == [40, 0]
