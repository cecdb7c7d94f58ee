"""The paired-runs report (evaluation/report.py), checked as a reader sees it: in a real headless Chromium.

Two tiny fake runs (metrics.jsonl, scores JSON, PNG grids, a FID JSON under a step folder) and a
fake REPA-E run are turned into a report; Chromium loads ``index.html`` from disk and we assert
that it loaded, logged no console or network error, shows the tables with the expected numbers,
and that every <img> decoded (naturalWidth > 0). A deliberately broken page proves the checker
sees what it should. A synthetic multi-seed study summary (the format of
``evaluation.paired_stats.summarize_study``) gets the same treatment, plus a look at its band plots'
pixels.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (fds 3/4,
NUL-separated JSON): no Python package, no browser download, no port. ``make test`` installs
Debian's ``chromium`` when missing; without the binary the browser test skips and says so.
"""

from __future__ import annotations

import html
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from evaluation.report import BAND_ALPHA, PALETTE, band_plot, build_report, fmt, main, nice_ticks, read_metrics

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
# The paired-study section
# --------------------------------------------------------------------------------------------
ARMS = ("orig", "e2e")


def _curve(means: list[float], half: float, steps: list[int]) -> list[dict[str, Any]]:
    return [{"step": s, "mean": m, "low": m - half, "high": m + half, "seeds": 3} for s, m in zip(steps, means)]


def _differences(means: list[float], half: float, steps: list[int], verdicts: list[str]) -> list[dict[str, Any]]:
    return [
        {"step": s, "mean": m, "low": m - half, "high": m + half, "verdict": v}
        for s, m, v in zip(steps, means, verdicts)
    ]


def _study_summary(steps: list[int] = [100, 200, 300]) -> dict[str, Any]:  # noqa: B006 (read only)
    """Two arms, two metrics (``fd`` lower-is-better and listed first: the report must put it last)."""
    keep = slice(-len(steps), None)  # a shorter study keeps the last steps
    one = len(steps) == 1
    undefined = {"mean": None, "low": None, "high": None}
    fd_diff = _differences(
        [-5.0, -8.0, -10.0][keep], 4.0, steps, ["fd: no call", "fd: e2e lower", "fd: e2e lower"][keep]
    )
    acc_diff = _differences(
        [0.05, 0.15, 0.2][keep],
        0.06,
        steps,
        ["acc: no detectable difference", "acc: e2e higher", "acc: e2e higher"][keep],
    )
    return {
        "arms": list(ARMS),
        "level": 0.95,
        "metrics": {
            "fd": {
                "higher_is_better": False,
                "curves": {
                    "orig": _curve([40.0, 30.0, 25.0][keep], 3.0, steps),
                    "e2e": _curve([35.0, 22.0, 15.0][keep], 2.5, steps),
                },
                "differences": fd_diff,
                "final": {"step": steps[-1], "difference": fd_diff[-1], "verdict": "FD-FINAL: e2e lower"},
                "auc": {
                    "orig": undefined if one else {"mean": 6000.0, "low": 5500.0, "high": 6500.0},
                    "e2e": undefined if one else {"mean": 4000.0, "low": 3600.0, "high": 4400.0},
                    "difference": undefined if one else {"mean": -2000.0, "low": -2600.0, "high": -1400.0},
                    "verdict": None if one else "FD-AUC: e2e lower",
                },
                "steps_to_threshold": {
                    "threshold": 26.5,
                    "fraction": 0.9,
                    "orig": {"mean": None, "per_seed": [None, None, None]},
                    "e2e": {"mean": 200.0, "per_seed": [200.0, 200.0, 200.0]},
                    "reached": {"orig": 0, "e2e": 3},
                },
            },
            "joint accuracy": {
                "higher_is_better": True,
                "curves": {
                    "orig": _curve([0.5, 0.6, 0.7][keep], 0.05, steps),
                    "e2e": _curve([0.55, 0.75, 0.9][keep], 0.06, steps),
                },
                "differences": acc_diff,
                "final": {"step": steps[-1], "difference": acc_diff[-1], "verdict": "ACC-FINAL: e2e higher"},
                "auc": {
                    "orig": {"mean": 120.0, "low": 110.0, "high": 130.0},
                    "e2e": {"mean": 150.0, "low": 140.0, "high": 160.0},
                    "difference": {"mean": 30.0, "low": 20.0, "high": 40.0},
                    "verdict": "ACC-AUC: e2e higher",
                },
                "steps_to_threshold": {
                    "threshold": 0.68,
                    "fraction": 0.9,
                    "orig": {"mean": 300.0, "per_seed": [300.0, None, None]},
                    "e2e": {"mean": 200.0, "per_seed": [200.0, 200.0, 200.0]},
                    "reached": {"orig": 1, "e2e": 3},
                },
            },
        },
    }


@pytest.fixture(scope="module")
def study(report: dict[str, Any]) -> dict[str, Any]:
    """The fake report again, now with a study summary given by --study, and a study-only single-step page."""
    root = report["root"]
    summary = root / "study summary.json"
    summary.write_text(json.dumps(_study_summary()))
    out, single = root / "study-out", root / "study-single"
    start = time.perf_counter()
    rc = main(
        [
            *("--run", f"orig={root / 'run a'}", "--run", f"e2e={root / 'run-b'}", "--study", str(summary)),
            *("--study-note", "3 seeds per arm; guidance 1.5 chosen on validation prompts", "--study-note", EVIL),
            *("--scores", f"e2e={root / 'elsewhere' / 'b_scores.json'}", "--repae", str(root / "repae")),
            *("--grids", f"e2e={root / 'elsewhere' / 'grid b.png'}", "--out", str(out), "--title", "study"),
        ]
    )
    assert rc == 0, "report CLI with --study failed"
    page = build_report({}, single, study=_study_summary([300]), title="single step")
    return {"out": out, "page": out / "index.html", "single": page, "seconds": time.perf_counter() - start}


def test_study_section_html(study: dict[str, Any]) -> None:
    page = study["page"].read_text()
    assert study["seconds"] < 10
    # first after the title, before the runs' own sections; notes escaped
    assert page.index("<h1>") < page.index('<h2 id="study">') < page.index("Scores by checkpoint step")
    assert "3 seeds per arm; guidance 1.5 chosen on validation prompts" in page
    assert EVIL not in page and html.escape(EVIL) in page
    # a verdict item per metric, lower-is-better last and labelled
    items = re.findall(r'<li data-metric="([^"]+)">(.*?)</li>', page)
    assert [m for m, _ in items] == ["joint accuracy", "fd"]
    acc, fd = (re.sub(r"<[^>]+>", "", text) for _, text in items)
    assert "ACC-FINAL: e2e higher" in acc and "ACC-AUC: e2e higher" in acc and "(lower is better)" not in acc
    assert fd.startswith("fd (lower is better)") and "FD-FINAL: e2e lower" in fd and "FD-AUC: e2e lower" in fd
    assert "final (step 300): e2e \u2212 orig = +0.2 [+0.14, +0.26]" in acc
    assert page.index('id="study-diff-joint_accuracy"') < page.index('id="study-diff-fd"')
    parser = Tables()
    parser.feed(page)
    diff = parser.tables["study-diff-joint_accuracy"]
    assert diff[0] == [
        "step",
        "orig mean [95% interval]",
        "e2e mean [95% interval]",
        "e2e \u2212 orig [95% interval]",
        "verdict",
    ]
    assert diff[1] == [
        "100",
        "0.5 [0.45, 0.55]",
        "0.55 [0.49, 0.61]",
        "+0.05 [-0.01, +0.11]",
        "acc: no detectable difference",
    ]
    assert diff[3] == ["300", "0.7 [0.65, 0.75]", "0.9 [0.84, 0.96]", "+0.2 [+0.14, +0.26]", "acc: e2e higher"]
    assert parser.tables["study-diff-fd"][2] == [
        "200",
        "30 [27, 33]",
        "22 [19.5, 24.5]",
        "-8 [-12, -4]",
        "fd: e2e lower",
    ]
    # a difference whose interval excludes 0 is coloured by whether it favours e2e (down is good for fd)
    assert re.search(r'<td class="num pos" data-value="-8\.0">', page) and re.search(
        r'class="num pos" data-value="0\.15"', page
    )
    assert re.search(r'<td class="num" data-value="0\.05">', page)  # interval straddles 0: no colour
    auc = {r[0]: r for r in parser.tables["study-auc-joint_accuracy"]}
    assert auc["arm"][2] == "steps to threshold 0.68 (fraction 0.9)"
    assert auc["orig"][1:] == ["120 [110, 130]", "300", "1/3", "300, not reached, not reached"]
    assert auc["e2e"][1:] == ["150 [140, 160]", "200", "3/3", "200, 200, 200"]
    assert auc["e2e \u2212 orig"][1:] == ["+30 [+20, +40]", "ACC-AUC: e2e higher"]
    assert {r[0]: r for r in parser.tables["study-auc-fd"]}["orig"][2:4] == ["not reached", "0/3"]
    # the runs' report is all still there, plus one band plot per metric
    assert "scores-40" in parser.tables and "vae-comparison" in parser.tables
    assert len(parser.images) == 9 and parser.images[:2] == ["plots/study-joint_accuracy.png", "plots/study-fd.png"]
    for src in parser.images:
        assert (study["out"] / src).is_file(), src


def test_study_single_step_page(study: dict[str, Any]) -> None:
    page = study["single"].read_text()
    parser = Tables()
    parser.feed(page)
    assert "Scores by checkpoint step" not in page and "run a" not in page  # a study-only page
    assert [r[0] for r in parser.tables["study-diff-fd"]] == ["step", "300"]
    auc = {r[0]: r for r in parser.tables["study-auc-fd"]}
    assert auc["orig"][1] == "\u2014" and auc["e2e \u2212 orig"][1:] == ["\u2014", "\u2014"]  # None shown as a dash
    assert sorted(parser.images) == ["plots/study-fd.png", "plots/study-joint_accuracy.png"]


def _rgb(color: str) -> tuple[int, int, int]:
    from PIL import ImageColor

    return ImageColor.getrgb(color)[:3]


def _tint(color: str) -> tuple[int, int, int]:
    """A band's colour over the white background."""
    return tuple(round(255 * (1 - BAND_ALPHA) + c * BAND_ALPHA) for c in _rgb(color))


def _near(pixels, color: tuple[int, int, int], tol: int = 4):
    """Boolean mask (height x width, or per pixel of a column) of pixels within ``tol`` of ``color``."""
    import numpy as np

    return (np.abs(pixels.astype(int) - np.array(color)) <= tol).all(axis=-1)


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_band_plot_pixels(study: dict[str, Any], tmp_path: Path) -> None:
    import numpy as np

    colors = {"orig": PALETTE[0], "e2e": PALETTE[1]}
    for name in ("study-joint_accuracy.png", "study-fd.png"):
        image = _pixels(study["out"] / "plots" / name)
        h, w, _ = image.shape
        assert (w, h) == (560, 320) and len(np.unique(image.reshape(-1, 3), axis=0)) > 50, name  # drawn, not blank
        # down the middle column: each arm's mean line lies inside its band, tinted above and below it
        column = image[:, w // 2]
        for arm, color in colors.items():
            line = np.flatnonzero(_near(column, _rgb(color), 30))
            assert line.size, (name, arm)
            y = round(line.mean())
            for side in (slice(y - 10, y - 3), slice(y + 4, y + 11)):
                assert _near(column[side], _tint(color)).sum() >= 4, (name, arm, column[side].tolist())
            assert _near(image, _tint(color)).sum() > 2000, (name, arm)
    # control: intervals of zero width draw no band
    flat = {
        arm: [{"step": s, "mean": m + shift, "low": m + shift, "high": m + shift} for s, m in ((1, 0.1), (2, 0.4))]
        for arm, shift in (("orig", 0.0), ("e2e", 0.3))
    }
    image = _pixels(band_plot(flat, colors, "flat", tmp_path / "flat.png"))
    assert not any(_near(image, _tint(c), 2).any() for c in colors.values())
    # a single step: per arm an error bar (its colour over a tall, thin span inside the axes), no band
    image = _pixels(study["single"].parent / "plots" / "study-joint_accuracy.png")
    for arm, color in colors.items():
        ys, xs = np.nonzero(_near(image[33:], _rgb(color), 30))  # below the title and legend
        assert ys.size and np.ptp(ys) > 40 and np.ptp(xs) < 20, (arm, xs.min(), xs.max())
        assert not _near(image, _tint(color), 2).any(), arm


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


def test_study_report_in_headless_chromium(study: dict[str, Any], browser: Browser) -> None:
    for page, images in ((study["page"], 9), (study["single"], 2)):
        browser.load(page.resolve().as_uri())
        state = json.loads(browser.evaluate(PAGE_STATE))
        assert browser.errors() == [], page
        assert state["scripts"] == 0 and len(state["images"]) == images
        broken = [i for i in state["images"] if not (i["complete"] and i["w"] > 0)]
        assert broken == [], broken
        assert {i["w"] for i in state["images"] if i["src"].startswith("plots/study-")} == {560}
        fd = {r[0]: r for r in state["tables"]["study-auc-fd"]}
        assert fd["orig"][2:4] == ["not reached", "0/3"]
    diff = state["tables"]["study-diff-joint_accuracy"]
    assert diff[1] == ["300", "0.7 [0.65, 0.75]", "0.9 [0.84, 0.96]", "+0.2 [+0.14, +0.26]", "acc: e2e higher"]
