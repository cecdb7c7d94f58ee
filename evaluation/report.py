"""A side-by-side report of paired runs: one static HTML page with loss curves, score tables, sample grids.

    python -m evaluation.report --run toy=output/study/toy --run toy-e2e=output/study/toy-e2e \\
        --repae output/repae/toy --out output/study/report

The project's question is always comparative (does the E2E-tuned VAE train a better DiT than the
original?), so the report puts runs next to each other: every logged metric of every run on the
same axes, one table per checkpoint step with a column per run (and their difference for a pair),
and the held-out grids of the same prompts and seeds side by side. Optionally the REPA-E run that
produced the tuned VAE: its curves and the original-vs-tuned VAE table (PSNR/SSIM/LPIPS/rFID,
per-channel latent spatial variance). Optionally, first on the page, a multi-seed paired study
(``--study``: the summary of ``evaluation.paired_stats.summarize_study`` as JSON): a verdict per
metric, each arm's mean curve over a shaded interval band, and tables of the per-step difference
B - A, the area under the curve and the steps to a threshold.

The page is self-contained and static: no JavaScript, no external CSS or fonts, images copied next
to it and referenced by relative path, so the folder can be zipped, mailed or served as is. Plots
are drawn with PIL (always installed with the project; matplotlib is not a dependency). All text
that comes from files or the command line is HTML-escaped.

Inputs per run folder (all optional): ``metrics.jsonl`` (one JSON object per logging step with a
``step`` key), ``scores.json`` (``fusedit.tools.demo.evaluate``), ``heldout_grid.png``, and any metrics
JSON under ``<run>/<step>/`` (e.g. ``toy_scores.json`` / ``heldout_grid.png`` from
``evaluation.study``, FID JSON from ``evaluation/fid.py``) or ``<run>/eval/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.files import write_text_atomic

# tab10: distinguishable, and the same run keeps the same colour in every plot
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
NOT_PLOTTED = {"step", "time", "epoch"}
# JSON files under a checkpoint folder that are bookkeeping, not metrics
BOOKKEEPING = {"trainer_state.json", "vae.json", "config.json", "sampling_settings.json", "index_to_prompt.json"}
SKIP_DIRS = {"model", "ema", "deepspeed", "vae", "samples"}
MAX_JSON_BYTES = 1 << 20
TOY_SOURCE = "toy scores"
SETTINGS = {"prompts", "images", "guidance scale", "sampling steps", "seed"}  # rows with no meaningful difference

Series = list[tuple[float, float]]
StepTables = dict[str, dict[str, dict[str, float | int | None]]]  # step -> source -> metric -> value


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per step (the last wins), sorted by step.

    A resumed run logs again the steps after its last checkpoint, and a run being written may end
    in a partial line: duplicates keep the newest record, unreadable lines are dropped.
    """
    if not path.is_file():
        return []
    by_step: dict[float, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and _is_number(record.get("step")):
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_series(records: list[dict[str, Any]], key: str) -> Series:
    return [(float(r["step"]), float(r[key])) for r in records if _is_number(r.get(key))]


def plot_keys(records_by_run: Iterable[list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """(keys worth a plot, constant keys): losses first, then the rest in logging order.

    A key whose finite values are one constant in every run (``data/skipped`` = 0) says nothing on
    a plot; it is listed under the plots instead.
    """
    order: dict[str, None] = {}
    values: dict[str, set[float]] = {}
    for records in records_by_run:
        for record in records:
            for key, value in record.items():
                if key in NOT_PLOTTED or not _is_number(value):
                    continue
                order.setdefault(key)
                if math.isfinite(value):
                    values.setdefault(key, set()).add(float(value))
    keys = [k for k in order if len(values.get(k, ())) > 1]
    constant = [k for k in order if len(values.get(k, ())) <= 1]
    keys.sort(key=lambda k: 0 if "loss" in k.lower() else 1)  # stable: logging order within each group
    return keys, constant


def step_sort_key(step: str) -> tuple[int, float, str]:
    return (0, float(step), "") if step.replace(".", "", 1).isdigit() else (1, 0.0, step)


def load_json(path: Path) -> Any:
    """A JSON file, or None when it is missing, too large or unreadable (a report never fails on one file)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_toy_scores(data: Any) -> bool:
    return isinstance(data, Mapping) and isinstance(data.get("accuracy"), Mapping)


def score_rows(data: Mapping[str, Any]) -> dict[str, tuple[float | int | None, float | None]]:
    """metric -> (value, chance). Toy scores get named rows; any other JSON its numeric leaves."""
    if is_toy_scores(data):
        chance = data.get("chance") or {}
        rows = {f"{k} accuracy": (v, chance.get(k)) for k, v in data["accuracy"].items()}
        rows["joint accuracy"] = (data.get("joint_accuracy"), data.get("joint_chance"))
        for key, label in (("n", "prompts"), ("images", "images"), ("guidance_scale", "guidance scale")):
            if key in data:
                rows[label] = (data[key], None)
        for key, label in (("steps", "sampling steps"), ("seed", "seed")):
            value = data.get(key, (data.get("sampling") or {}).get(key))
            if value is not None:
                rows[label] = (value, None)
        return rows
    return {k: (v, None) for k, v in flatten_numbers(data).items()}


def flatten_numbers(data: Any, prefix: str = "", limit: int = 40) -> dict[str, float | int]:
    """Numeric leaves of a JSON object as dotted keys (lists and booleans skipped), at most ``limit``."""
    out: dict[str, float | int] = {}
    if not isinstance(data, Mapping):
        return out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _is_number(value):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(flatten_numbers(value, name + ".", limit - len(out)))
        if len(out) >= limit:
            break
    return dict(list(out.items())[:limit])


def json_step(data: Any, relpath: str, default: str) -> str:
    """Which checkpoint step a metrics JSON describes: its own record, else a stepNNN in its path."""
    if isinstance(data, Mapping):
        for value in (data.get("checkpoint"), (data.get("sampling") or {}).get("step")):
            if value is not None and str(value).isdigit():
                return str(value)
        hint = f"{relpath} {data.get('fake_images', '')}"
    else:
        hint = relpath
    match = re.search(r"step[_-]?(\d+)", hint)
    return match.group(1) if match else default


def _metric_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.rglob("*.json")):
        rel = path.relative_to(folder).parts
        if path.name in BOOKKEEPING or path.name.startswith("data_state_rank") or SKIP_DIRS & set(rel[:-1]):
            continue
        files.append(path)
    return files


def collect_scores(run: Path, scores_file: Path | None = None) -> StepTables:
    """Every metric table a run has, by checkpoint step and source.

    Sources: the scores JSON (``--scores`` or ``<run>/scores.json``; its step is the checkpoint
    it records), JSON files under ``<run>/<step>/`` (that step), and under ``<run>/eval/`` (step
    from the file's sampling record or a ``stepNNN`` in its path). Toy scores from any of them
    share one source name, so the same checkpoint scored twice shows as one row set.
    """
    found: list[tuple[str, str, Any]] = []  # (step, source, data)
    candidates: list[tuple[Path, str, str]] = []  # (file, default step, relpath)
    top = scores_file if scores_file is not None else run / "scores.json"
    if top.is_file():
        candidates.append((top, "final", top.name))
    for folder in sorted((p for p in run.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        candidates += [(f, folder.name, str(f.relative_to(run))) for f in _metric_files(folder)]
    candidates += [(f, "eval", str(f.relative_to(run))) for f in _metric_files(run / "eval")]
    for path, default, rel in candidates:
        data = load_json(path)
        if not isinstance(data, Mapping):
            continue
        step = default if default not in ("final", "eval") else json_step(data, rel, default)
        source = TOY_SOURCE if is_toy_scores(data) else re.sub(r"\.json$", "", rel.split("/", 1)[-1])
        found.append((step, source, data))
    tables: StepTables = {}
    for step, source, data in found:
        tables.setdefault(step, {})[source] = score_rows(data)
    return tables


def discover_grids(run: Path, tables: StepTables, given: Path | None = None) -> dict[str, Path]:
    """label -> held-out grid PNG: ``<run>/<step>/heldout_grid.png`` for each step, and the final grid.

    The final grid (``--grids`` or ``<run>/heldout_grid.png``) is labelled with the step its
    scores record, so it merges with that step's own grid instead of showing the same image twice.
    """
    grids: dict[str, Path] = {}
    if run.is_dir():
        for folder in sorted((p for p in run.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            if (folder / "heldout_grid.png").is_file():
                grids[f"step {folder.name}"] = folder / "heldout_grid.png"
    final = given if given is not None else run / "heldout_grid.png"
    if final.is_file():
        steps = [s for s, sources in tables.items() if TOY_SOURCE in sources and s.isdigit()]
        label = f"step {max(steps, key=int)}" if steps else "final"
        grids.setdefault(label, final)
    return grids


def training_samples(run: Path) -> dict[int, Path]:
    """step -> the trainer's own sample grid (``<run>/samples/<step>.png``, val prompts, fixed seed)."""
    folder = run / "samples"
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.glob("*.png"):
        digits = re.sub(r"\D", "", path.stem)
        if digits:
            found[int(digits)] = path
    return found


# --------------------------------------------------------------------------------------------
# Plots (PIL, drawn at 2x and downsampled for smooth lines)
# --------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size only
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def _tick_label(value: float, log: bool) -> str:
    if log:
        return f"{10**value:.0e}" if abs(value) >= 3 else f"{10**value:g}"
    return f"{value:.4g}"


def _use_log(values: list[float]) -> bool:
    """Log y when every value is positive and they span more than two decades (losses falling fast)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def line_plot(series: Mapping[str, Series], colors: Mapping[str, str], title: str, path: Path) -> Path:
    """One PNG: each series a line (points marked when few), shared axes, legend, step on x."""
    from PIL import Image, ImageDraw

    s, width, height = 2, 560, 320
    left, right, top, bottom = 64 * s, 14 * s, 30 * s, 40 * s
    image = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13 * s), _font(11 * s)
    points = {k: [(x, y) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    xs = [x for v in points.values() for x, _ in v]
    ys = [y for v in points.values() for _, y in v]
    log = _use_log(ys)
    ys = [math.log10(y) for y in ys] if log else ys
    draw.text((left, 8 * s), title + ("  (log scale)" if log else ""), fill="black", font=font)
    box = (left, top, width * s - right, height * s - bottom)
    draw.rectangle(box, outline="#444444", width=s)
    if not xs:
        draw.text((left + 10 * s, top + 10 * s), "no finite values", fill="#888888", font=small)
        image.resize((width, height), Image.LANCZOS).save(path)
        return path
    x0, x1 = _padded(min(xs), max(xs), 0.02)
    y0, y1 = _padded(min(ys), max(ys), 0.06)
    to_px = lambda x, y: (  # noqa: E731
        box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]),
        box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]),
    )
    _draw_ticks(draw, box, (x0, x1), (y0, y1), to_px, small, s, log)
    for name, pts in points.items():
        xy = [to_px(x, math.log10(y) if log else y) for x, y in pts]
        color = colors.get(name, "black")
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2 * s, joint="curve")
        if len(xy) <= 30:
            for px, py in xy:
                draw.ellipse((px - 3 * s, py - 3 * s, px + 3 * s, py + 3 * s), fill=color)
    _draw_legend(draw, box, list(points), colors, small, s)
    draw.text((box[2] - 30 * s, height * s - 18 * s), "step", fill="#444444", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((width, height), Image.LANCZOS).save(path)
    return path


def _padded(lo: float, hi: float, frac: float) -> tuple[float, float]:
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * frac
    return lo - pad, hi + pad


def _draw_ticks(draw, box, xr, yr, to_px, font, s: int, log: bool) -> None:
    for x in nice_ticks(*xr, count=6):
        px, _ = to_px(x, yr[0])
        draw.line((px, box[3], px, box[3] + 4 * s), fill="#444444", width=s)
        label = f"{x:g}" if abs(x) < 1e6 else f"{x:.2e}"
        draw.text((px, box[3] + 6 * s), label, fill="#444444", font=font, anchor="ma")
    yticks = [float(k) for k in range(math.ceil(yr[0]), math.floor(yr[1]) + 1)] if log else []
    for y in yticks if len(yticks) >= 2 else nice_ticks(*yr, count=5):
        _, py = to_px(xr[0], y)
        draw.line((box[0], py, box[2], py), fill="#e6e6e6", width=s)
        draw.line((box[0] - 4 * s, py, box[0], py), fill="#444444", width=s)
        draw.text((box[0] - 6 * s, py), _tick_label(y, log), fill="#444444", font=font, anchor="rm")
    draw.rectangle(box, outline="#444444", width=s)


def _draw_legend(draw, box, names: list[str], colors: Mapping[str, str], font, s: int) -> None:
    """Run names in a row above the plot's top-right corner, where no curve can hide them."""
    if len(names) < 2:
        return
    x, y = box[2], box[1] - 10 * s
    for name in reversed(names):
        x -= draw.textlength(name, font=font)
        draw.text((x, y), name, fill="black", font=font, anchor="lm")
        x -= 22 * s
        draw.line((x, y, x + 16 * s, y), fill=colors.get(name, "black"), width=3 * s)
        x -= 12 * s


# a band's opacity: the mean lines, the grid and the other arm's band stay visible through it
BAND_ALPHA = 0.22
Band = list[tuple[float, float | None, float | None, float | None]]  # (step, mean, low, high)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _band_points(points: Iterable[Mapping[str, Any]]) -> Band:
    """(step, mean, low, high) per record with a finite step, sorted; non-finite numbers become None."""
    out = []
    for point in points:
        if not isinstance(point, Mapping) or not _finite(point.get("step")):
            continue
        mean, low, high = (float(point[k]) if _finite(point.get(k)) else None for k in ("mean", "low", "high"))
        if low is not None and high is not None and low > high:
            low, high = high, low
        out.append((float(point["step"]), mean, low, high))
    return sorted(out, key=lambda p: p[0])


def _paste_vertical_text(image, text: str, x: int, y_mid: float, font, color: str) -> None:
    """``text`` rotated a quarter turn (read bottom to top), its left edge at ``x``, centred on ``y_mid``."""
    from PIL import Image, ImageColor, ImageDraw

    probe = ImageDraw.Draw(image)
    box = probe.textbbox((0, 0), text, font=font)
    mask = Image.new("L", (box[2] - box[0] + 4, box[3] - box[1] + 4), 0)
    ImageDraw.Draw(mask).text((2 - box[0], 2 - box[1]), text, fill=255, font=font)
    mask = mask.rotate(90, expand=True)
    top = max(0, int(y_mid - mask.height / 2))
    image.paste(ImageColor.getrgb(color), (x, top, x + mask.width, top + mask.height), mask)


def band_plot(
    curves: Mapping[str, list[dict]],
    colors: Mapping[str, str],
    title: str,
    path: Path,
    *,
    ylabel: str | None = None,
) -> Path:
    """One PNG: per arm a translucent band from ``low`` to ``high`` under its ``mean`` line (points marked).

    ``curves``: arm -> ``[{"step", "mean", "low", "high", ...}, ...]`` (None or non-finite where
    undefined). Neighbouring steps with both bounds make a band; an interval standing alone (a
    single step, or between steps without bounds) is an error bar instead. With a single step each
    arm is nudged sideways so that the error bars do not hide each other. Same axes, ticks and
    legend as :func:`line_plot`; log y when every value is positive and spans more than two decades.
    """
    from PIL import Image, ImageColor, ImageDraw

    s, width, height = 2, 560, 320
    left, right, top, bottom = (80 if ylabel else 64) * s, 14 * s, 30 * s, 40 * s
    image = Image.new("RGB", (width * s, height * s), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13 * s), _font(11 * s)
    points = {name: _band_points(curve) for name, curve in curves.items()}
    points = {k: v for k, v in points.items() if any(p[1] is not None or p[2] is not None for p in v)}
    xs = [p[0] for v in points.values() for p in v]
    values = [y for v in points.values() for p in v for y in p[1:] if y is not None]
    log = _use_log(values)
    ty = (lambda y: math.log10(y)) if log else (lambda y: y)
    draw.text((left, 8 * s), title + ("  (log scale)" if log else ""), fill="black", font=font)
    box = (left, top, width * s - right, height * s - bottom)
    draw.rectangle(box, outline="#444444", width=s)
    if ylabel:
        _paste_vertical_text(image, ylabel, 4 * s, (box[1] + box[3]) / 2, small, "#444444")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not xs:
        draw.text((left + 10 * s, top + 10 * s), "no finite values", fill="#888888", font=small)
        image.resize((width, height), Image.LANCZOS).save(path)
        return path
    x0, x1 = _padded(min(xs), max(xs), 0.02)
    y0, y1 = _padded(min(map(ty, values)), max(map(ty, values)), 0.06)
    to_px = lambda x, y: (  # noqa: E731
        box[0] + (x - x0) / (x1 - x0) * (box[2] - box[0]),
        box[3] - (y - y0) / (y1 - y0) * (box[3] - box[1]),
    )
    _draw_ticks(draw, box, (x0, x1), (y0, y1), to_px, small, s, log)
    single = len(set(xs)) == 1
    names = list(points)
    nudge = {n: (i - (len(names) - 1) / 2) * 8 * s if single else 0.0 for i, n in enumerate(names)}
    px = lambda name, x, y: (to_px(x, ty(y))[0] + nudge[name], to_px(x, ty(y))[1])  # noqa: E731

    # bands: runs of neighbouring steps that all have both bounds; each arm composited on its own layer
    canvas = image.convert("RGBA")
    lone: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    for name, pts in points.items():
        rgb = ImageColor.getrgb(colors.get(name, "black"))[:3]
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        layer_draw = ImageDraw.Draw(layer)
        runs: list[list[tuple[float, float, float]]] = [[]]
        for x, _, low, high in pts:
            if low is None or high is None:
                runs.append([])
            else:
                runs[-1].append((x, low, high))
        for run in runs:
            if len(run) == 1:
                lone[name].append(run[0])
            elif len(run) > 1:
                outline = [px(name, x, hi) for x, _, hi in run] + [px(name, x, lo) for x, lo, _ in reversed(run)]
                layer_draw.polygon(outline, fill=(*rgb, round(255 * BAND_ALPHA)))
        canvas = Image.alpha_composite(canvas, layer)
    image = canvas.convert("RGB")
    draw = ImageDraw.Draw(image)

    for name, pts in points.items():
        color = colors.get(name, "black")
        for x, low, high in lone[name]:  # error bars with caps
            (bx, by_low), (_, by_high) = px(name, x, low), px(name, x, high)
            draw.line((bx, by_low, bx, by_high), fill=color, width=2 * s)
            for by in (by_low, by_high):
                draw.line((bx - 4 * s, by, bx + 4 * s, by), fill=color, width=2 * s)
        xy = [px(name, x, mean) for x, mean, _, _ in pts if mean is not None]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2 * s, joint="curve")
        if len(xy) <= 30:
            for cx, cy in xy:
                draw.ellipse((cx - 3 * s, cy - 3 * s, cx + 3 * s, cy + 3 * s), fill=color)
    _draw_legend(draw, box, names, colors, small, s)
    draw.text((box[2] - 30 * s, height * s - 18 * s), "step", fill="#444444", font=small)
    image.resize((width, height), Image.LANCZOS).save(path)
    return path


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .8rem 0 1.4rem; font-size: .92rem; }
caption { text-align: left; font-weight: 600; padding: .3rem 0; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.pos { color: #1a7f37; } td.neg { color: #b42318; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: .85rem; color: #555; margin-top: .2rem; }
.grid img { image-rendering: pixelated; width: 100%; height: auto; border: 1px solid #ddd; }
.grid figure { flex: 1 1 0; min-width: 240px; max-width: 560px; }
.plots img { width: 100%; max-width: 560px; height: auto; }
.plots figure { flex: 0 1 560px; }
.missing { color: #888; font-style: italic; padding: 2rem; border: 1px dashed #ccc; }
.swatch { display: inline-block; width: .8rem; height: .8rem; border-radius: 2px; margin-right: .3rem; }
code { background: #f6f6f6; padding: 0 .2rem; } .note { color: #555; font-size: .9rem; }
.verdicts li { margin: .2rem 0; } .verdict { font-weight: 600; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """Cell text: 4 significant digits for floats, integers as is, 'n/a' for missing or non-finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.3e}"


def _num_cell(value: Any, cls: str = "num") -> str:
    attr = f' data-value="{esc(value)}"' if _is_number(value) else ""
    return f'<td class="{cls}"{attr}>{esc(fmt(value))}</td>'


def _delta_cell(a: Any, b: Any) -> str:
    if not (_is_number(a) and _is_number(b) and math.isfinite(a) and math.isfinite(b)):
        return '<td class="num">n/a</td>'
    delta = b - a
    cls = "num pos" if delta > 0 else "num neg" if delta < 0 else "num"
    text = ("+" if delta > 0 else "") + fmt(delta if not float(delta).is_integer() else int(delta))
    return f'<td class="{cls}" data-value="{esc(delta)}">{esc(text)}</td>'


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def scores_section(tables: Mapping[str, StepTables], names: list[str]) -> str:
    """One table per checkpoint step; a row per (source, metric), a column per run (+ difference of a pair)."""
    steps = sorted({s for t in tables.values() for s in t}, key=step_sort_key)
    if not steps:
        return '<p class="missing">No score files found (scores.json, &lt;run&gt;/&lt;step&gt;/*.json).</p>'
    parts = []
    for step in steps:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        chance: dict[tuple[str, str], Any] = {}
        for name in names:
            for source, metrics in tables.get(name, {}).get(step, {}).items():
                for metric, (value, ch) in metrics.items():
                    rows.setdefault((source, metric), {})[name] = value
                    if ch is not None:
                        chance[(source, metric)] = ch
        parts.append(_scores_table(step, rows, chance, names))
    return "\n".join(parts)


def _scores_table(step: str, rows: Mapping, chance: Mapping, names: list[str]) -> str:
    pair = len(names) == 2
    head = ["source", "metric"] + (["chance"] if chance else []) + names
    head += [f"{names[1]} \u2212 {names[0]}"] if pair else []
    caption = f"step {step}" if step.isdigit() else step
    out = [f'<table class="scores" id="scores-{esc(_slug(step))}" data-step="{esc(step)}">']
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    out.append(f"<caption>{esc(caption)}</caption><thead><tr>{header}</tr></thead>")
    out.append("<tbody>")
    for (source, metric), values in rows.items():
        cells = [f"<td>{esc(source)}</td>", f"<td>{esc(metric)}</td>"]
        if chance:
            ch = chance.get((source, metric))
            cells.append(_num_cell(ch) if ch is not None else "<td></td>")
        cells += [_num_cell(values.get(n)) for n in names]
        if pair:
            same = metric in SETTINGS and values.get(names[0]) == values.get(names[1])
            cells.append("<td></td>" if same else _delta_cell(values.get(names[0]), values.get(names[1])))
        out.append(f'<tr data-metric="{esc(metric)}">{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def settings_note(tables: Mapping[str, StepTables], names: list[str]) -> str:
    """Whether the runs' toy scores used the same sampling settings (the grids are only comparable then)."""
    keys = ("prompts", "guidance scale", "sampling steps", "seed")
    seen: dict[str, set] = {k: set() for k in keys}
    for name in names:
        for sources in tables.get(name, {}).values():
            metrics = sources.get(TOY_SOURCE, {})
            for k in keys:
                if k in metrics:
                    seen[k].add(metrics[k][0])
    differing = [k for k, v in seen.items() if len(v) > 1]
    if differing:
        return f'<p class="note"><b>Warning:</b> runs were scored with different {esc(", ".join(differing))}.</p>'
    same = ", ".join(f"{k} {fmt(next(iter(v)))}" for k, v in seen.items() if v)
    return f'<p class="note">All runs scored with the same settings: {esc(same)}.</p>' if same else ""


def _copy(src: Path, out: Path, rel: str) -> str:
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return rel


def _figure(rel: str | None, caption: str, alt: str) -> str:
    if rel is None:
        return f'<figure><div class="missing">{esc(caption)}: not available</div></figure>'
    return f'<figure><img src="{esc(rel)}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>'


def grids_section(grids: Mapping[str, Mapping[str, Path]], names: list[str], out: Path) -> str:
    """For each grid label (step), the runs' grids in one row; images copied into ``out/grids``."""
    labels = sorted({label for g in grids.values() for label in g}, key=lambda x: step_sort_key(x.split()[-1]))
    if not labels:
        return '<p class="missing">No sample grids found (heldout_grid.png).</p>'
    parts = []
    for label in labels:
        figures = []
        for i, name in enumerate(names):
            src = grids.get(name, {}).get(label)
            rel = _copy(src, out, f"grids/{i}-{_slug(name)}-{_slug(label)}.png") if src else None
            figures.append(_figure(rel, f"{name} \u2014 {label}", f"held-out samples of {name} at {label}"))
        parts.append(f"<h3>{esc(label)}</h3><div class='row grid'>{''.join(figures)}</div>")
    return "\n".join(parts)


def training_samples_section(runs: Mapping[str, Path], names: list[str], out: Path) -> str:
    """The trainer's own sample grids at the newest step every run has (same val prompts and seed)."""
    samples = {n: training_samples(runs[n]) for n in names}
    common = set.intersection(*(set(s) for s in samples.values())) if samples else set()
    if not common:
        return ""
    step = max(common)
    figures = [
        _figure(_copy(samples[n][step], out, f"grids/{i}-{_slug(n)}-train-{step}.png"), f"{n} \u2014 step {step}", n)
        for i, n in enumerate(names)
    ]
    return (
        f"<h3>training-time samples, step {step}</h3>"
        "<p class='note'>Written by the trainer from <code>sample.prompt_file</code> with <code>sample.seed</code>.</p>"
        f"<div class='row grid'>{''.join(figures)}</div>"
    )


def plots_section(records: Mapping[str, list[dict]], colors: Mapping[str, str], out: Path, prefix: str) -> str:
    """One PNG per logged metric with every run overlaid; constant metrics listed instead of drawn."""
    keys, constant = plot_keys(records.values())
    if not keys and not constant:
        return '<p class="missing">No metrics.jsonl records found.</p>'
    figures = []
    for key in keys:
        series = {name: metric_series(recs, key) for name, recs in records.items()}
        series = {k: v for k, v in series.items() if v}
        rel = f"plots/{prefix}{_slug(key)}.png"
        line_plot(series, colors, key, out / rel)
        figures.append(_figure(rel, key, f"{key} against step"))
    note = ""
    if constant:
        values = {k: next((r[k] for recs in records.values() for r in recs if k in r), None) for k in constant}
        listed = ", ".join(f"{k} = {fmt(v)}" for k, v in values.items())
        note = f'<p class="note">Constant in every run (not plotted): {esc(listed)}.</p>'
    return f"<div class='row plots'>{''.join(figures)}</div>{note}"


# --------------------------------------------------------------------------------------------
# REPA-E run: curves and the original-vs-tuned VAE table
# --------------------------------------------------------------------------------------------
VAE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("images", ("num_images",)),
    ("PSNR (dB)", ("metrics", "psnr_db")),
    ("SSIM", ("metrics", "ssim")),
    ("LPIPS", ("metrics", "lpips")),
    ("rFID", ("metrics", "rfid")),
    ("KL / element", ("posterior", "kl_per_element")),
    ("latent spatial variance, channel average", ("latents", "mean", "spatial_var_avg")),
    ("latent spatial share of variance, average", ("latents", "mean", "spatial_share_avg")),
    ("normalised latent spatial variance, average", ("latents", "normalised", "spatial_var_avg")),
)


def _lookup(entry: Any, keys: Iterable[str]) -> Any:
    for key in keys:
        if not isinstance(entry, Mapping) or key not in entry:
            return None
        entry = entry[key]
    return entry


def vae_table(report: Mapping[str, Any]) -> str:
    """PSNR/SSIM/LPIPS/rFID and per-channel latent spatial variance, a column per VAE (+ difference of two)."""
    vaes = report.get("vaes") if isinstance(report.get("vaes"), Mapping) else {}
    labels = list(vaes)
    if not labels:
        return '<p class="missing">vae_comparison.json holds no VAEs.</p>'
    rows = [(name, [_lookup(vaes[lb], keys) for lb in labels]) for name, keys in VAE_ROWS]
    for kind, title in (("mean", "latent spatial variance"), ("normalised", "normalised latent spatial variance")):
        per_vae = [_lookup(vaes[lb], ("latents", kind, "spatial_var")) or [] for lb in labels]
        for c in range(max(len(v) for v in per_vae)):
            rows.append((f"{title}, channel {c}", [v[c] if c < len(v) else None for v in per_vae]))
    pair = len(labels) == 2
    head = ["", *labels] + ([f"{labels[1]} \u2212 {labels[0]}"] if pair else [])
    out = ['<table class="vae" id="vae-comparison">', "<caption>original vs tuned VAE (validation images)</caption>"]
    out.append(f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>")
    for name, values in rows:
        if all(v is None for v in values):
            continue
        cells = [f"<td>{esc(name)}</td>", *(_num_cell(v) for v in values)]
        cells += [_delta_cell(values[0], values[1])] if pair else []
        out.append(f'<tr data-metric="{esc(name)}">{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    notes = [n for n in report.get("notes", []) if isinstance(n, str)]
    out += [f'<p class="note">note: {esc(n)}</p>' for n in notes]
    return "\n".join(out)


def repae_section(run: Path, out: Path) -> str:
    parts = [f"<p>Run folder: <code>{esc(run)}</code></p>"]
    comparison = load_json(run / "vae_comparison.json")
    if isinstance(comparison, Mapping):
        parts.append(vae_table(comparison))
    else:
        parts.append('<p class="missing">No vae_comparison.json (the run has not finished its comparison).</p>')
    records = read_metrics(run / "metrics.jsonl")
    parts.append("<h3>joint tuning curves</h3>")
    parts.append(plots_section({"REPA-E": records}, {"REPA-E": PALETTE[0]}, out, "repae-"))
    samples = training_samples(run)
    if samples:
        step = max(samples)
        rel = _copy(samples[step], out, f"grids/repae-samples-{step}.png")
        parts.append(f"<div class='row grid'>{_figure(rel, f'SiT samples at step {step}', 'REPA-E samples')}</div>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Paired study: statistics over seeds (evaluation.paired_stats.summarize_study)
# --------------------------------------------------------------------------------------------
DASH = "\u2014"
MINUS = "\u2212"


def _value_text(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return DASH
    return ("+" if signed and value > 0 else "") + fmt(value)


def _interval_text(entry: Any, signed: bool = False) -> str:
    """'mean [low, high]'; the mean alone without bounds; a dash for an undefined mean."""
    entry = entry if isinstance(entry, Mapping) else {}
    mean, low, high = entry.get("mean"), entry.get("low"), entry.get("high")
    if not _finite(mean):
        return DASH
    text = _value_text(mean, signed)
    if _finite(low) or _finite(high):
        text += f" [{_value_text(low, signed)}, {_value_text(high, signed)}]"
    return text


def _interval_cell(entry: Any, signed: bool = False, higher_is_better: bool | None = None) -> str:
    """A table cell of :func:`_interval_text`; a difference whose interval excludes 0 is coloured
    green when it favours arm B (up for higher-is-better metrics, down otherwise), red when not."""
    entry = entry if isinstance(entry, Mapping) else {}
    cls = "num"
    low, high = entry.get("low"), entry.get("high")
    if higher_is_better is not None and _finite(low) and _finite(high) and (low > 0 or high < 0):
        cls += " pos" if (low > 0) == higher_is_better else " neg"
    mean = entry.get("mean")
    attr = f' data-value="{esc(mean)}"' if _finite(mean) else ""
    return f'<td class="{cls}"{attr}>{esc(_interval_text(entry, signed))}</td>'


def _verdict(entry: Any) -> str:
    verdict = entry.get("verdict") if isinstance(entry, Mapping) else None
    return str(verdict) if verdict not in (None, "") else DASH


def _study_metrics(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(metric, statistics) with the higher-is-better metrics first, lower-is-better last (order kept within)."""
    metrics = summary.get("metrics") if isinstance(summary.get("metrics"), Mapping) else {}
    items = [(str(k), v) for k, v in metrics.items() if isinstance(v, Mapping)]
    return sorted(items, key=lambda kv: not kv[1].get("higher_is_better", True))


def _metric_label(metric: str, info: Mapping[str, Any]) -> str:
    return metric if info.get("higher_is_better", True) else f"{metric} (lower is better)"


def _study_arms(summary: Mapping[str, Any]) -> list[str]:
    arms = [str(a) for a in summary.get("arms") or [] if a is not None]
    if len(arms) >= 2:
        return arms[:2]
    found = {str(a): None for _, info in _study_metrics(summary) for a in (info.get("curves") or {})}
    return (arms + [a for a in found if a not in arms] + ["A", "B"])[:2]


def _by_step(points: Any) -> dict[float, Mapping[str, Any]]:
    if not isinstance(points, list):
        return {}
    return {float(p["step"]): p for p in points if isinstance(p, Mapping) and _finite(p.get("step"))}


def _step_text(step: Any) -> str:
    return fmt(step) if _finite(step) else DASH


def _verdict_item(metric: str, info: Mapping[str, Any], arms: list[str]) -> str:
    final = info.get("final") if isinstance(info.get("final"), Mapping) else {}
    auc = info.get("auc") if isinstance(info.get("auc"), Mapping) else {}
    diff = f"{arms[1]} {MINUS} {arms[0]}"
    step = f" (step {_step_text(final.get('step'))})" if final.get("step") is not None else ""
    final_text = f"final{step}: {diff} = {_interval_text(final.get('difference'), signed=True)}"
    auc_text = f"area under the curve: {diff} = {_interval_text(auc.get('difference'), signed=True)}"
    label = _metric_label(metric, info)
    return (
        f'<li data-metric="{esc(metric)}"><b>{esc(label)}</b>: {esc(final_text)}, '
        f'<span class="verdict" data-kind="final">{esc(_verdict(final))}</span>; {esc(auc_text)}, '
        f'<span class="verdict" data-kind="auc">{esc(_verdict(auc))}</span></li>'
    )


def _differences_table(metric: str, slug: str, info: Mapping[str, Any], arms: list[str], level: str) -> str:
    """A row per step: each arm's mean [interval], B - A [interval] and its verdict."""
    curves = info.get("curves") if isinstance(info.get("curves"), Mapping) else {}
    by_arm = {arm: _by_step(curves.get(arm)) for arm in arms}
    differences = _by_step(info.get("differences"))
    steps = sorted(set(differences) | {s for points in by_arm.values() for s in points})
    hib = bool(info.get("higher_is_better", True))
    head = ["step", *(f"{a} mean [{level}]" for a in arms), f"{arms[1]} {MINUS} {arms[0]} [{level}]", "verdict"]
    out = [f'<table class="study" id="study-diff-{esc(slug)}" data-metric="{esc(metric)}">']
    out.append(f"<caption>{esc(_metric_label(metric, info))}: {esc(arms[1])} {MINUS} {esc(arms[0])} by step</caption>")
    out.append(f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>")
    for step in steps:
        diff = differences.get(step, {})
        cells = [f'<td class="num">{esc(_step_text(step))}</td>']
        cells += [_interval_cell(by_arm[a].get(step)) for a in arms]
        cells += [_interval_cell(diff, signed=True, higher_is_better=hib), f"<td>{esc(_verdict(diff))}</td>"]
        out.append(f'<tr data-step="{esc(_step_text(step))}">{"".join(cells)}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _auc_table(metric: str, slug: str, info: Mapping[str, Any], arms: list[str], level: str) -> str:
    """Per arm: area under the curve [interval] and steps to the threshold (mean, seeds reaching it, per seed)."""
    auc = info.get("auc") if isinstance(info.get("auc"), Mapping) else {}
    stt = info.get("steps_to_threshold") if isinstance(info.get("steps_to_threshold"), Mapping) else {}
    reached = stt.get("reached") if isinstance(stt.get("reached"), Mapping) else {}
    threshold = f"steps to threshold {_value_text(stt.get('threshold'))}"
    if _finite(stt.get("fraction")):
        threshold += f" (fraction {fmt(stt['fraction'])})"
    head = ["arm", f"area under the curve [{level}]", threshold, "seeds reaching it", "per seed"]
    out = [f'<table class="study" id="study-auc-{esc(slug)}" data-metric="{esc(metric)}">']
    out.append(f"<caption>{esc(_metric_label(metric, info))}: area under the curve, steps to threshold</caption>")
    out.append(f"<thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>")
    for arm in arms:
        entry = stt.get(arm) if isinstance(stt.get(arm), Mapping) else {}
        per_seed = entry.get("per_seed") if isinstance(entry.get("per_seed"), list) else []
        mean = entry.get("mean")
        count = reached.get(arm)
        if _finite(count):
            count_text = f"{fmt(count)}/{len(per_seed)}" if per_seed else fmt(count)
        else:
            count_text = DASH
        seeds = ", ".join(_value_text(v) if _finite(v) else "not reached" for v in per_seed) or DASH
        cells = [
            f"<td>{esc(arm)}</td>",
            _interval_cell(auc.get(arm)),
            _num_cell(mean) if _finite(mean) else '<td class="num">not reached</td>',
            f'<td class="num">{esc(count_text)}</td>',
            f"<td>{esc(seeds)}</td>",
        ]
        out.append(f'<tr data-arm="{esc(arm)}">{"".join(cells)}</tr>')
    hib = bool(info.get("higher_is_better", True))
    diff = [
        f"<td>{esc(arms[1])} {MINUS} {esc(arms[0])}</td>",
        _interval_cell(auc.get("difference"), signed=True, higher_is_better=hib),
        f'<td colspan="3">{esc(_verdict(auc))}</td>',
    ]
    out.append(f'<tr data-arm="difference">{"".join(diff)}</tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def study_section(
    summary: Mapping[str, Any],
    out: Path,
    *,
    title: str = "Paired study",
    notes: Sequence[str] = (),
    colors: Mapping[str, str] | None = None,
) -> str:
    """HTML for a multi-seed paired study (``evaluation.paired_stats.summarize_study``'s summary).

    A verdict per metric (final step and area under the curve), then per metric: a band plot of
    both arms' mean and interval against step (``out/plots/study-<slug>.png``), a table of the
    arms and their difference B - A by step, and a table of area under the curve and steps to
    threshold per arm. Lower-is-better metrics (FD) come last and say so. ``notes``: lines on
    the study's settings (seeds, prompts, guidance chosen on validation prompts, ...).
    """
    out = Path(out)
    arms = _study_arms(summary)
    colors = {a: (colors or {}).get(a, PALETTE[i % len(PALETTE)]) for i, a in enumerate(arms)}
    level = summary.get("level")
    level_text = f"{float(level) * 100:g}% interval" if _finite(level) and 0 < level < 1 else "interval"
    metrics = _study_metrics(summary)
    seeds: dict[str, int] = {}
    for _, info in metrics:
        for arm, points in (info.get("curves") or {}).items():
            for p in points if isinstance(points, list) else []:
                if isinstance(p, Mapping) and _finite(p.get("seeds")):
                    seeds[str(arm)] = max(seeds.get(str(arm), 0), int(p["seeds"]))
    arm_items = "".join(
        f'<li><span class="swatch" style="background:{esc(colors[a])}"></span><b>{esc(a)}</b>'
        f"{esc(f': {seeds[a]} seeds' if a in seeds else '')}</li>"
        for a in arms
    )
    parts = [f'<h2 id="study">{esc(title)}</h2>', f"<ul class='runs'>{arm_items}</ul>"]
    parts.append(
        f'<p class="note">Means over seeds with their {esc(level_text)}; differences are '
        f"{esc(arms[1])} {MINUS} {esc(arms[0])}, paired by seed.</p>"
    )
    lines = [str(n) for n in ([notes] if isinstance(notes, str) else notes) if str(n).strip()]
    if lines:
        parts.append(f"<ul class='note study-notes'>{''.join(f'<li>{esc(n)}</li>' for n in lines)}</ul>")
    if not metrics:
        parts.append('<p class="missing">The study summary holds no metrics.</p>')
        return "\n".join(parts)
    parts.append(
        f"<ul class='verdicts' id='study-verdicts'>{''.join(_verdict_item(m, i, arms) for m, i in metrics)}</ul>"
    )
    used: set[str] = set()
    for metric, info in metrics:
        slug = base = _slug(metric)
        for n in range(2, len(metrics) + 2):  # "a/b" and "a_b" must not share a file
            if slug not in used:
                break
            slug = f"{base}-{n}"
        used.add(slug)
        label = _metric_label(metric, info)
        curves = info.get("curves") if isinstance(info.get("curves"), Mapping) else {}
        rel = f"plots/study-{slug}.png"
        band_plot({a: curves.get(a) or [] for a in arms}, colors, label, out / rel, ylabel=metric)
        figure = _figure(rel, f"{label}: mean and {level_text} over seeds", f"{metric} of {' and '.join(arms)}")
        parts += [f'<h3 id="study-{esc(slug)}">{esc(label)}</h3>', f"<div class='row plots'>{figure}</div>"]
        parts += [
            _differences_table(metric, slug, info, arms, level_text),
            _auc_table(metric, slug, info, arms, level_text),
        ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------
def build_report(
    runs: Mapping[str, Path],
    out: Path,
    scores: Mapping[str, Path] | None = None,
    grids: Mapping[str, Path] | None = None,
    repae: Path | None = None,
    title: str = "Paired runs",
    *,
    study: Mapping[str, Any] | None = None,
    study_notes: Sequence[str] = (),
) -> Path:
    """Write ``out/index.html`` (+ ``out/plots``, ``out/grids``) comparing ``runs`` (name -> run folder).

    ``scores`` / ``grids``: per-run scores JSON / final held-out grid when not the run's own
    ``scores.json`` / ``heldout_grid.png``. ``repae``: a REPA-E run folder to append. ``study``: a
    multi-seed study summary (``evaluation.paired_stats.summarize_study``) shown first, with
    ``study_notes`` on its settings; with a study, ``runs`` may be empty (a study-only page).
    Returns the page.
    """
    if not runs and study is None:
        raise ValueError("build_report: no runs")
    if study is not None and not isinstance(study, Mapping):
        raise ValueError(f"build_report: the study summary must be a JSON object, got {type(study).__name__}")
    unknown = (set(scores or {}) | set(grids or {})) - set(runs)
    if unknown:
        raise ValueError(f"--scores/--grids name runs that were not given with --run: {sorted(unknown)}")
    runs = {name: Path(path) for name, path in runs.items()}
    out = Path(out)
    for sub in ("plots", "grids"):  # a rebuilt report holds no stale images
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    names = list(runs)
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    scores = {k: Path(v) for k, v in (scores or {}).items()}
    tables = {n: collect_scores(runs[n], scores.get(n)) if runs[n].is_dir() else {} for n in names}
    given = {k: Path(v) for k, v in (grids or {}).items()}
    found_grids = {n: discover_grids(runs[n], tables[n], given.get(n)) for n in names}
    records = {n: read_metrics(runs[n] / "metrics.jsonl") for n in names}
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p class='note'>Generated {esc(_dt.datetime.now().isoformat(timespec='seconds'))}.</p>",
    ]
    if study is not None:
        body.append(study_section(study, out, notes=study_notes, colors=colors))
    if runs:
        body += [
            "<h2>Runs</h2>" if study is not None else "",
            _runs_list(runs, colors, records),
            "<h2>Scores by checkpoint step</h2>",
            settings_note(tables, names),
            scores_section(tables, names),
            "<h2>Samples: same prompts, same seeds</h2>",
            grids_section(found_grids, names, out),
            training_samples_section(runs, names, out),
            "<h2>Training curves</h2>",
            plots_section(records, colors, out, ""),
        ]
    if repae is not None:
        body += ["<h2>REPA-E stage: the tuned VAE</h2>", repae_section(Path(repae), out)]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = out / "index.html"
    write_text_atomic(path, page)
    return path


def _runs_list(runs: Mapping[str, Path], colors: Mapping[str, str], records: Mapping[str, list]) -> str:
    items = []
    for name, path in runs.items():
        last = records[name][-1]["step"] if records[name] else None
        steps = f", last logged step {fmt(last)}" if last is not None else ", no metrics.jsonl"
        missing = "" if path.is_dir() else " (folder missing)"
        items.append(
            f'<li><span class="swatch" style="background:{esc(colors[name])}"></span><b>{esc(name)}</b>: '
            f"<code>{esc(path)}</code>{esc(missing + steps)}</li>"
        )
    return f"<ul class='runs'>{''.join(items)}</ul>"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _pairs(values: list[str] | None, flag: str) -> dict[str, Path]:
    """NAME=PATH options (split at the first '='), in the order given; a repeated name is an error."""
    out: dict[str, Path] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects NAME=PATH, got {value!r}")
        if name in out:
            raise ValueError(f"{flag}: name {name!r} given twice")
        out[name] = Path(path)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.report",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", action="append", metavar="NAME=RUN_DIR", help="a run (repeat; order kept)")
    p.add_argument("--out", required=True, type=Path, help="report folder (index.html, plots/, grids/)")
    p.add_argument("--scores", action="append", metavar="NAME=JSON", help="scores JSON (default <run>/scores.json)")
    p.add_argument("--grids", action="append", metavar="NAME=PNG", help="final grid (default <run>/heldout_grid.png)")
    p.add_argument("--repae", type=Path, default=None, metavar="RUN_DIR", help="REPA-E run to append (curves, VAEs)")
    p.add_argument("--title", default="Paired runs", help="page title")
    p.add_argument(
        "--study", type=Path, default=None, metavar="JSON", help="multi-seed study summary to show first (statistics)"
    )
    p.add_argument("--study-note", action="append", default=[], metavar="TEXT", help="a line on the study's settings")
    args = p.parse_args(argv)
    if not args.run and args.study is None:
        p.error("give at least one --run NAME=RUN_DIR, or --study JSON")
    return args


def read_study(path: Path) -> Mapping[str, Any]:
    """The study summary JSON (``evaluation.paired_stats.summarize_study``, as written), or ValueError."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--study {path}: cannot read the summary ({err})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("metrics"), Mapping):
        raise ValueError(f"--study {path}: not a study summary (a JSON object with 'metrics')")
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = _pairs(args.run, "--run")
        for name, folder in runs.items():
            if not folder.is_dir():
                raise ValueError(f"--run {name}={folder}: no such run folder")
        study = read_study(args.study) if args.study is not None else None
        path = build_report(
            runs,
            args.out,
            _pairs(args.scores, "--scores"),
            _pairs(args.grids, "--grids"),
            args.repae,
            args.title,
            study=study,
            study_notes=args.study_note,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    from common.lifecycle import run_cli

    sys.exit(run_cli("report.py", main))
