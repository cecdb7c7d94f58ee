"""Try user mistakes on every entry point and report how each one ends (docs/user-errors.md).

    python scripts/user_error_sweep.py --toy /tmp/world --out /tmp/sweep       # ~5 minutes on 2 cores
    python scripts/user_error_sweep.py --toy /tmp/world --out /tmp/sweep --only train.py

A mistake must end in one ``error:`` line naming the culprit and exit 2 (argparse's usage line
before its ``error:`` line is allowed), never a traceback. The sweep builds what it needs (a
quick toy world if ``--toy`` has none, a 2-step run of each stage), damages copies of the runs,
runs every (entry point, mistake) and writes ``<out>/sweep.json`` and ``<out>/sweep.md``. Exit 1
when any case ends otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T2I_CONFIG = str(ROOT / "configs" / "e2e-vae" / "toy.yaml")
REPAE_CONFIG = str(ROOT / "configs" / "repae" / "toy.yaml")


@dataclass
class Case:
    entry: str  # how a user names it
    mistake: str
    argv: list[str]
    culprit: str  # a word the error line must contain


def _python(argv: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def t2i_overrides(world: Path, run: Path) -> list[str]:
    """The test suite's 2-step text-to-image run (tests/conftest.py), so the sweep tries what the tests train."""
    from tests.conftest import tiny_train_overrides

    return tiny_train_overrides(world, run, **{"trainer.max_steps": 2, "trainer.checkpointing_steps": 2})


def repae_overrides(world: Path, run: Path) -> list[str]:
    from tests.test_repae_train import tiny_overrides

    return tiny_overrides(world, run)


def prepare(toy: Path, out: Path) -> dict[str, Path]:
    """A quick world with the REPA-E encoder, one 2-step run per stage, and damaged copies of them."""
    if not (toy / "world.json").is_file():
        proc = _python(["dataset_download.py", "--toy", str(toy), "--quick", "--quiet"], timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    if not (toy / "repae" / "encoder" / "model.safetensors").is_file():
        from repae.toy import build_toy_encoder

        build_toy_encoder(toy, quick=True, progress=False)
    runs = {"t2i": out / "runs" / "t2i", "repae": out / "runs" / "repae"}
    if not (runs["t2i"] / "latest").is_file():
        proc = _python(["train.py", "-c", T2I_CONFIG, *t2i_overrides(toy, runs["t2i"])])
        assert proc.returncode == 0, proc.stderr[-3000:]
    if not (runs["repae"] / "latest").is_file():
        proc = _python(["-m", "repae.train", "-c", REPAE_CONFIG, *repae_overrides(toy, runs["repae"])])
        assert proc.returncode == 0, proc.stderr[-3000:]
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "bad.yaml").write_text("trainer:\n  max_steps: [1\nmodel: {\n")
    (files / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (files / "list.yaml").write_text("- a\n- b\n")
    (files / "nan.yaml").write_text(Path(T2I_CONFIG).read_text().replace("lr: 1.0e-3", "lr: .nan"))
    (files / "a-folder.yaml").mkdir(exist_ok=True)
    (files / "empty-run").mkdir(exist_ok=True)
    for stage in ("t2i", "repae"):
        runs[f"{stage}-latest"] = _damaged(runs[stage], out / "runs" / f"{stage}-latest", "latest")
        runs[f"{stage}-weights"] = _damaged(runs[stage], out / "runs" / f"{stage}-weights", "weights")
        runs[f"{stage}-config"] = _damaged(runs[stage], out / "runs" / f"{stage}-config", "config")
    runs["files"] = files
    return runs


def _damaged(run: Path, copy: Path, how: str) -> Path:
    if copy.exists():
        return copy
    shutil.copytree(run, copy)
    if how == "latest":
        (copy / "latest").write_text("999\n")
    elif how == "weights":
        for f in sorted((copy / "2").rglob("*.safetensors")):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "config":
        for name in ("config.yaml", "2/config.yaml"):
            if (copy / name).is_file():
                (copy / name).write_text("trainer: [unclosed\n")
    return copy


def cases(toy: Path, runs: dict[str, Path], out: Path) -> list[Case]:
    files = runs["files"]
    coco = ["evaluation/sample_coco_ckpt.py", "--prompts", str(toy / "prompts" / "heldout.json"), "--max-prompts", "1"]
    coco += ["--save-dir", str(out / "coco")]
    t2i = t2i_overrides(toy, out / "scratch" / "t2i")
    rep = repae_overrides(toy, out / "scratch" / "repae")
    found: list[Case] = []
    trainers = {
        "train.py": ["train.py", "-c", T2I_CONFIG],
        "repae.train": ["-m", "repae.train", "-c", REPAE_CONFIG],
        "repae.train_ldm": ["-m", "repae.train_ldm", "-c", REPAE_CONFIG],
    }
    for name, head in trainers.items():
        over = t2i if name == "train.py" else rep
        lr = "optimizer.lr" if name == "train.py" else "optimizer.sit_lr"
        steps = "trainer.max_steps"
        batch = "data.batch_size_per_gpu" if name == "train.py" else "data.global_batch_size"
        config_file = head[:-1]
        found += [
            Case(name, "YAML syntax error", [*config_file, str(files / "bad.yaml")], "bad.yaml"),
            Case(name, "binary config file", [*config_file, str(files / "binary.yaml")], "binary.yaml"),
            Case(name, "config is a list", [*config_file, str(files / "list.yaml")], "list.yaml"),
            Case(name, "config is a folder", [*config_file, str(files / "a-folder.yaml")], "a-folder.yaml"),
            Case(name, "config missing", [*config_file, str(files / "missing.yaml")], "missing.yaml"),
            Case(name, "NaN learning rate", [*head, *over, f"{lr}=.nan"], lr),
            Case(name, "inf learning rate", [*head, *over, f"{lr}=.inf"], lr),
            Case(name, "negative steps", [*head, *over, f"{steps}=-5"], steps),
            Case(name, "zero batch", [*head, *over, f"{batch}=0"], batch),
            Case(name, "string for a number", [*head, *over, f"{steps}=many"], steps),
            Case(name, "unknown key", [*head, *over, "trainer.no_such_field=1"], "no_such_field"),
            Case(name, "override without =", [*head, *over, "trainer.max_steps"], "trainer.max_steps"),
            Case(name, "unknown flag", [*head, "--no-such-flag"], "--no-such-flag"),
        ]
    found.append(Case("train.py", "NaN in the YAML file", ["train.py", "-c", str(files / "nan.yaml"), *t2i], "lr"))
    found.append(
        Case(
            "repae.train_ldm",
            "the joint trainer's run folder",
            ["-m", "repae.train_ldm", "-c", REPAE_CONFIG, *repae_overrides(toy, runs["repae"]), "trainer.max_steps=4"],
            "joint trainer",
        )  # fmt: skip
    )
    # readers of run folders
    for stage, reader, head in (
        ("t2i", "fusedit.tools.export", ["-m", "fusedit.tools.export", "--out", str(out / "x"), "--checkpoint"]),
        ("t2i", "sample_coco_ckpt.py", [*coco, "--checkpoint"]),
        ("repae", "repae.export", ["-m", "repae.export", "--out", str(out / "y"), "--run"]),
        ("repae", "repae.generate", ["-m", "repae.generate", "--num-samples", "2", "--out", str(out / "z"), "--run"]),
    ):
        other = "repae" if stage == "t2i" else "t2i"
        found += [
            Case(reader, "latest names a missing step", [*head, str(runs[f"{stage}-latest"])], "999"),
            Case(reader, "truncated weights", [*head, str(runs[f"{stage}-weights"])], "safetensors"),
            Case(reader, "config.yaml not YAML", [*head, str(runs[f"{stage}-config"])], "config.yaml"),
            Case(reader, "empty folder", [*head, str(files / "empty-run")], "empty-run"),
            Case(reader, "missing folder", [*head, str(files / "no-such-run")], "no-such-run"),
            Case(reader, "the other stage's run", [*head, str(runs[other])], str(runs[other].name)),
            Case(reader, "unknown flag", [*head, str(runs[stage]), "--no-such-flag"], "--no-such-flag"),
        ]
    found += [
        Case("common.verify", "missing folder", ["-m", "common.verify", str(files / "no-such-run")], "no-such-run"),
        Case(
            "repae.generate",
            "negative sample count",
            ["-m", "repae.generate", "--run", str(runs["repae"]), "--num-samples", "-3", "--out", str(out / "g")],
            "num-samples",
        ),  # fmt: skip
        Case(
            "repae.generate",
            "NaN guidance",
            [
                "-m",
                "repae.generate",
                "--run",
                str(runs["repae"]),
                "--cfg-scale",
                "nan",
                "--num-samples",
                "2",
                "--out",
                str(out / "g2"),
            ],
            "cfg-scale",
        ),  # fmt: skip
        Case(
            "sample_coco_ckpt.py",
            "NaN guidance",
            [
                "evaluation/sample_coco_ckpt.py",
                "--checkpoint",
                str(runs["t2i"]),
                "--guidance-scale",
                "nan",
                "--max-prompts",
                "1",
            ],
            "guidance-scale",
        ),  # fmt: skip
        Case(
            "sample_coco_ckpt.py",
            "zero steps",
            [
                "evaluation/sample_coco_ckpt.py",
                "--checkpoint",
                str(runs["t2i"]),
                "--num-inference-steps",
                "0",
                "--max-prompts",
                "1",
            ],
            "num-inference-steps",
        ),  # fmt: skip
        Case("fusedit.tools.demo", "unknown flag", ["-m", "fusedit.tools.demo", "--no-such-flag"], "--no-such-flag"),
        Case(
            "train.py --dry-run",
            "NaN learning rate",
            [
                "train.py",
                "-c",
                T2I_CONFIG,
                "--dry-run",
                "model.text_hidden_size=64",
                "model.in_channels=4",
                "optimizer.lr=.nan",
            ],
            "optimizer.lr",
        ),  # fmt: skip
        Case(
            "fusedit.tools.bench",
            "YAML syntax error",
            ["-m", "fusedit.tools.bench", "-c", str(files / "bad.yaml")],
            "bad.yaml",
        ),  # fmt: skip
        Case(
            "fusedit.tools.sweep",
            "YAML syntax error",
            ["-m", "fusedit.tools.sweep", "--configs", str(files / "bad.yaml"), "--dry-run", "--executor", "local"],
            "bad.yaml",
        ),  # fmt: skip
        Case(
            "fusedit.tools.sweep",
            "unknown flag",
            ["-m", "fusedit.tools.sweep", "--configs", T2I_CONFIG, "--no-such-flag"],
            "--no-such-flag",
        ),  # fmt: skip
        Case(
            "repae.cache_latents",
            "missing shards",
            [
                "-m",
                "repae.cache_latents",
                "--vae",
                str(toy / "vae"),
                "--shards",
                str(files / "no-such-shards-{0..1}.tar"),
                "--out",
                str(out / "c"),
            ],
            "no-such-shards",
        ),  # fmt: skip
        Case(
            "repae.cache_latents",
            "missing VAE",
            [
                "-m",
                "repae.cache_latents",
                "--vae",
                str(files / "no-such-vae"),
                "--shards",
                str(toy / "shards" / "train-000000.tar"),
                "--out",
                str(out / "c2"),
            ],
            "no-such-vae",
        ),  # fmt: skip
        Case(
            "repae.diagnostics",
            "missing VAE",
            [
                "-m",
                "repae.diagnostics",
                "--vae",
                str(files / "no-such-vae"),
                "--shards",
                str(toy / "shards" / "train-000000.tar"),
                "--no-lpips",
                "--no-rfid",
                "--out",
                str(out / "d"),
            ],
            "no-such-vae",
        ),  # fmt: skip
        Case(
            "repae.preprocess",
            "missing ImageNet folder",
            ["-m", "repae.preprocess", "--imagenet-path", str(files / "no-such-imagenet"), "--out", str(out / "p")],
            "no-such-imagenet",
        ),  # fmt: skip
        Case(
            "evaluation/fid.py",
            "missing image folder",
            [
                "evaluation/fid.py",
                "--real-images",
                str(files / "no-such-real"),
                "--fake-images",
                str(files / "no-such-fake"),
                "--resolution",
                "32",
            ],
            "no-such",
        ),  # fmt: skip
        Case(
            "evaluation/toy_eval.py",
            "missing image folder",
            ["evaluation/toy_eval.py", "--images", str(files / "no-such-images"), "--toy", str(toy)],
            "no-such-images",
        ),  # fmt: skip
        Case(
            "evaluation/report.py",
            "missing run",
            ["evaluation/report.py", "--run", f"a={files / 'no-such-run'}", "--out", str(out / "r")],
            "no-such-run",
        ),  # fmt: skip
        Case(
            "evaluation/report.py",
            "--run without a name",
            ["evaluation/report.py", "--run", str(runs["t2i"]), "--out", str(out / "r2")],
            "--run",
        ),  # fmt: skip
        Case(
            "evaluation/check_latents.py",
            "missing VAE",
            ["evaluation/check_latents.py", "--vae", str(files / "no-such-vae"), "--toy", str(toy)],
            "no-such-vae",
        ),  # fmt: skip
        Case(
            "common.verify",
            "unknown flag",
            ["-m", "common.verify", str(runs["t2i"]), "--no-such-flag"],
            "--no-such-flag",
        ),  # fmt: skip
        Case("dataset_download.py", "unknown flag", ["dataset_download.py", "--no-such-flag"], "--no-such-flag"),
    ]
    return found


def verdict(proc: subprocess.CompletedProcess, case: Case) -> tuple[bool, str]:
    err = proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    last = errors[-1] if errors else (lines[-1] if lines else "")
    if "Traceback (most recent call last)" in err:
        return False, f"traceback (exit {proc.returncode}): {lines[-1][:160] if lines else ''}"
    if proc.returncode != 2:
        return False, f"exit {proc.returncode}: {last[:160]}"
    if not errors:
        return False, f"exit 2 without an error: line: {last[:160]}"
    if case.culprit.lower() not in errors[-1].lower():
        return False, f"does not name {case.culprit!r}: {errors[-1][:160]}"
    return True, errors[-1][:200]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--toy", type=Path, required=True, help="a quick toy world (built there if missing)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder and results")
    p.add_argument("--only", default=None, help="run only the cases of this entry point")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = prepare(args.toy, args.out)
    results = []
    for case in cases(args.toy, runs, args.out):
        if args.only and case.entry != args.only:
            continue
        t0 = time.perf_counter()
        proc = _python(case.argv)
        ok, what = verdict(proc, case)
        results.append({"entry": case.entry, "mistake": case.mistake, "ok": ok, "exit": proc.returncode, "what": what})
        took = time.perf_counter() - t0
        print(f"{'ok  ' if ok else 'FAIL'} {case.entry:22s} {case.mistake:30s} {took:5.1f}s  {what}")
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    rows = ["| entry point | mistake | verdict | exit | how it ended |", "|---|---|---|---|---|"]
    rows += [
        f"| `{r['entry']}` | {r['mistake']} | {'ok' if r['ok'] else '**fail**'} | {r['exit']} | "
        f"{r['what'].replace('|', '/')} |"
        for r in results
    ]
    (args.out / "sweep.md").write_text("\n".join(rows) + "\n")
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} cases end in one error line with exit 2")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
