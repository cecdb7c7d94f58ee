"""Every command-line entry point answers ``--help``, in the one flag style, naming only files that exist.

Each entry point runs as a user runs it (``python <script> --help`` or ``python -m <module> --help``)
in a subprocess from the repository root, two at a time. Its help must start with ``usage:``,
spell every flag of ours with dashes (``--batch-size``; the old ``--batch_size`` still parses, see
common.argtypes.DashedArgumentParser), and every repository path it names (``configs/...yaml``,
``fusedit/...py``, ``python -m fusedit.export``) must exist. A new ``if __name__ == "__main__":``
file that is not listed in ENTRY_POINTS fails test_every_entry_point_is_listed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# file with `if __name__ == "__main__":` -> how a user runs it (the docs' spelling)
ENTRY_POINTS: dict[str, list[str]] = {
    "train.py": ["train.py"],
    "dataset_download.py": ["dataset_download.py"],
    "common/fid.py": ["-m", "common.fid"],
    "common/verify.py": ["-m", "common.verify"],
    "evaluation/check_latents.py": ["-m", "evaluation.check_latents"],
    "evaluation/fid.py": ["evaluation/fid.py"],
    "evaluation/repae_sweep.py": ["-m", "evaluation.repae_sweep"],
    "evaluation/report.py": ["-m", "evaluation.report"],
    "evaluation/sample_coco_ckpt.py": ["evaluation/sample_coco_ckpt.py"],
    "evaluation/sample_dpgbench_ckpt.py": ["evaluation/sample_dpgbench_ckpt.py"],
    "evaluation/sample_genaibench_ckpt.py": ["evaluation/sample_genaibench_ckpt.py"],
    "evaluation/sample_geneval_ckpt.py": ["evaluation/sample_geneval_ckpt.py"],
    "evaluation/sample_mjhq_ckpt.py": ["evaluation/sample_mjhq_ckpt.py"],
    "evaluation/study.py": ["-m", "evaluation.study"],
    "evaluation/toy_eval.py": ["evaluation/toy_eval.py"],
    "fusedit/data/latent_cache.py": ["-m", "fusedit.data.latent_cache"],
    "fusedit/data/text_cache.py": ["-m", "fusedit.data.text_cache"],
    "fusedit/export.py": ["-m", "fusedit.export"],
    "fusedit/tools/acceptance.py": ["-m", "fusedit.tools.acceptance"],
    "fusedit/tools/bench.py": ["-m", "fusedit.tools.bench"],
    "fusedit/tools/demo.py": ["-m", "fusedit.tools.demo"],
    "fusedit/tools/export.py": ["-m", "fusedit.tools.export"],
    "fusedit/tools/sweep.py": ["-m", "fusedit.tools.sweep"],
    "prompts/build_prompts.py": ["prompts/build_prompts.py"],
    "repae/bench/__main__.py": ["-m", "repae.bench"],
    "repae/cache_latents.py": ["-m", "repae.cache_latents"],
    "repae/demo.py": ["-m", "repae.demo"],
    "repae/diagnostics.py": ["-m", "repae.diagnostics"],
    "repae/export.py": ["-m", "repae.export"],
    "repae/generate.py": ["-m", "repae.generate"],
    "repae/preprocess.py": ["-m", "repae.preprocess"],
    "repae/reference/import_reference.py": ["-m", "repae.reference.import_reference"],
    "repae/train.py": ["-m", "repae.train"],
    "repae/train_ldm.py": ["-m", "repae.train_ldm"],
    "scripts/check_layers.py": ["scripts/check_layers.py"],
    "scripts/check_lock.py": ["scripts/check_lock.py"],
    "scripts/demo_variants.py": ["scripts/demo_variants.py"],
    "scripts/slurm/local_cluster.py": ["scripts/slurm/local_cluster.py"],
    "scripts/user_error_sweep.py": ["scripts/user_error_sweep.py"],
    "scripts/world_digests.py": ["scripts/world_digests.py"],
}
# subcommands with their own --help
SUBCOMMANDS = {
    "prompts/build_prompts.py": ["coco", "mjhq", "geneval", "dpgbench", "genaibench", "toy-geneval"],
}
# where entry points live (tests/ holds workers the tests start, not tools)
SCANNED = ("common", "evaluation", "fusedit", "prompts", "repae", "scripts", "toyworld")
MAIN = re.compile(r"^if __name__ == [\"']__main__[\"']:", re.MULTILINE)

UNDERSCORE_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*_[a-z0-9_-]*")
# Other programs' flags in launch examples keep their own spelling (accelerate launch has no dashed one).
LAUNCHER_FLAGS = {
    "--nproc_per_node",
    "--rdzv_backend",
    "--rdzv_endpoint",
    "--rdzv_id",
    "--rdzv_conf",
    "--num_processes",
    "--num_machines",
    "--multi_gpu",
    "--mixed_precision",
    "--dynamo_backend",
}
LAUNCHER_LINE = re.compile(r"\b(torchrun|accelerate launch|torch\.distributed\.run)\b")
# repae.train / repae.train_ldm list the REPA-E reference's train_repae.py flags in its spelling
REFERENCE_CLIS = {"repae/train.py", "repae/train_ldm.py"}

TOP_DIRS = "|".join(sorted({*SCANNED, "configs", "docs", "tests"}))
REPO_PATH = re.compile(rf"(?<![\w./<>{{}}$~-])((?:{TOP_DIRS})/[\w.*/-]*[\w*])")
PY_SCRIPT = re.compile(r"\bpython3? (?!-)([\w./-]+\.py)\b")
PY_MODULE = re.compile(rf"\bpython3? -m ((?:{TOP_DIRS})(?:\.\w+)*)")
# benchmark prompt files: written by prompts/build_prompts.py from downloaded sources, not committed
GENERATED = re.compile(r"^prompts/[\w-]+\.jsonl?$")


def invocations() -> dict[str, list[str]]:
    """Test id -> argv after ``python``: each entry point's --help, and its subcommands'."""
    calls = {path: [*argv, "--help"] for path, argv in ENTRY_POINTS.items()}
    for path, commands in SUBCOMMANDS.items():
        calls.update({f"{path} {c}": [*ENTRY_POINTS[path], c, "--help"] for c in commands})
    return calls


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """All --help runs, two at a time (each one is an interpreter start plus the tool's imports)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *argv]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)

    calls = invocations()
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(calls, pool.map(run, calls.values())))


def _problems(entry: str, text: str) -> list[str]:
    allowed: set[str] = set()
    if entry in REFERENCE_CLIS:
        from repae.flags import FLAGS

        allowed = set(FLAGS) | {f"--no-{name[2:]}" for name in FLAGS}
    problems = []
    for line in text.splitlines():
        for flag in UNDERSCORE_FLAG.findall(line):
            if flag in allowed or (flag in LAUNCHER_FLAGS and LAUNCHER_LINE.search(line)):
                continue
            problems.append(f"underscore flag {flag} (spell it with dashes): {line.strip()!r}")
    for path in sorted(set(REPO_PATH.findall(text))):
        if not GENERATED.match(path) and not list(ROOT.glob(path)):
            problems.append(f"names {path}, which does not exist")
    for script in sorted(set(PY_SCRIPT.findall(text))):
        if not (ROOT / script).is_file():
            problems.append(f"runs python {script}, which does not exist")
    for module in sorted(set(PY_MODULE.findall(text))):
        base = ROOT / module.replace(".", "/")
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            problems.append(f"runs python -m {module}, which does not exist")
    return problems


@pytest.mark.parametrize("call", list(invocations()))
def test_help(call: str, helps: dict[str, subprocess.CompletedProcess]) -> None:
    proc = helps[call]
    assert proc.returncode == 0, f"{call} --help: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.startswith("usage:"), proc.stdout[:500]
    problems = _problems(call.split()[0], proc.stdout)
    assert not problems, f"{call} --help:\n" + "\n".join(problems)


def test_every_entry_point_is_listed() -> None:
    files = [p for p in ROOT.glob("*.py")]
    for folder in SCANNED:
        files += (ROOT / folder).rglob("*.py")
    found = {p.relative_to(ROOT).as_posix() for p in files if MAIN.search(p.read_text(encoding="utf-8"))}
    assert not found - ENTRY_POINTS.keys(), (
        f"new entry points: add them to ENTRY_POINTS: {sorted(found - ENTRY_POINTS.keys())}"
    )
    assert not ENTRY_POINTS.keys() - found, f"no longer entry points: {sorted(ENTRY_POINTS.keys() - found)}"


def test_the_help_check_catches_what_it_should() -> None:
    text = "usage: x [--batch_size N]\n  torchrun --nproc_per_node 8 train.py\n"
    text += "  see fusedit/plan.py and configs/e2e-vae/toy.yaml"
    problems = _problems("train.py", text)
    assert len(problems) == 2 and "--batch_size" in problems[0] and "fusedit/plan.py" in problems[1], problems
    assert _problems("train.py", "python -m fusedit.no_such_tool") and _problems("x", "python scripts/no_such.py")
    assert not _problems("train.py", "writes prompts/coco30k.json, reads <toy>/repae/encoder and ~/.cache/fusedit/fid")


# ------------------------------------------------------------------ the old spellings still parse
def test_old_flag_spellings_still_parse() -> None:
    """Underscore spellings and the sampler's renamed flags parse to what the current spelling gives."""
    from evaluation import sampling

    geneval = sampling.build_parser(sampling.BENCHMARKS["geneval"])
    new = ["--checkpoint", "r", "--metadata-file", "m", "--save-dir", "o", "--batch-size", "2", "--no-ema-weights"]
    old = ["--checkpoint", "r", "--metadata_file", "m", "--save_dir", "o", "--batch_size", "2", "--no-ema_weights"]
    expected = geneval.parse_args([*new, "--max-prompts", "3", "--images-per-prompt", "5", "--guidance-scale=1.5"])
    assert (expected.max_prompts, expected.images_per_prompt, expected.ema_weights) == (3, 5, False)
    assert geneval.parse_args([*old, "--num_samples", "3", "--n_samples", "5", "--guidance_scale=1.5"]) == expected
    assert geneval.parse_args([*old, "--num-samples", "3", "--n-samples", "5", "--guidance-scale=1.5"]) == expected

    import dataset_download
    import train
    from common import fid
    from prompts import build_prompts

    parsed = dataset_download.build_parser().parse_args(["--output_dir", "d", "--dry_run", "--num_train=7"])
    assert (parsed.output_dir, parsed.dry_run, parsed.num_train) == ("d", True, 7)
    parsed = train.parse_args(["-c", "x.yaml", "--deepspeed_config_path", "z.json", "--local_rank=0", "a.b=1"])
    assert (parsed.deepspeed_config_path, parsed.local_rank, parsed.overrides) == ("z.json", 0, ["a.b=1"])
    parsed = fid.parse_args(["--real_images", "r", "--fake_images", "f", "--resolution", "8", "--cache_dir", "c"])
    assert (parsed.real_images, parsed.fake_images, parsed.cache_dir) == ("r", "f", "c")
    parsed = build_prompts.parse_args(["dpgbench", "--prompts_dir", "p"])
    assert parsed.prompts_dir == "p"


def test_dashed_parser_rewrites_only_known_flags(capsys: pytest.CaptureFixture) -> None:
    from common.argtypes import DashedArgumentParser

    p = DashedArgumentParser(prog="t", renamed={"--old_name": "--new-name"})
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--new-name", default=None)
    p.add_argument("rest", nargs="*")
    assert p.respell(["--batch_size=2", "--old-name", "x", "--", "--batch_size"]) == [
        "--batch-size=2",
        "--new-name",
        "x",
        "--",
        "--batch_size",
    ]
    assert p.parse_args(["--batch_size", "2", "--old_name", "y"]).new_name == "y"
    with pytest.raises(SystemExit) as stop:
        p.parse_args(["--batch_size", "2", "--no_such_flag"])
    assert stop.value.code == 2 and "--no_such_flag" in capsys.readouterr().err
    help_text = p.format_help()
    assert "--batch-size" in help_text and "--batch_size" not in help_text and "old" not in help_text
