"""Benchmark sampling, FID, prompt building and toy scoring, on one tiny checkpoint, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import fid
from evaluation import sampling, toy_eval
from tests.conftest import LOAD_EXPORT, ROOT, cli_env, run_train, tiny_train_overrides

STEPS = "2"  # denoising steps: enough to exercise CFG and the Euler loop, cheap on CPU
FID_EXTRACTOR = "common.fid:random_conv_extractor"


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_prompts", ROOT / "prompts" / "build_prompts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_prompts = _load_builder()


@pytest.fixture(scope="module")
def checkpoint(quick_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    run_train(tiny_train_overrides(quick_world, run, **{"trainer.max_steps": 2, "trainer.checkpointing_steps": 2}))
    return run


@pytest.fixture(scope="module")
def heldout(quick_world: Path) -> list[dict]:
    return json.loads((quick_world / "prompts" / "heldout.json").read_text())


@pytest.fixture()
def prompts3(tmp_path: Path, heldout: list[dict]) -> Path:
    """Three toy prompts in the held-out format (objects with a 'prompt'), as the samplers accept it."""
    path = tmp_path / "p3.json"
    path.write_text(json.dumps(heldout[:3]))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """In-process sampler runs create accelerate's process-wide state; do not leak it into other tests."""
    yield
    from accelerate import PartialState

    PartialState._reset_state()


def sample(bench: str, checkpoint: Path, prompts: Path, save_dir: Path, *extra: str) -> dict:
    """Run a sampler in this process (what the CLI does, minus interpreter start-up)."""
    flag = sampling.BENCHMARKS[bench].prompts_flag
    argv = ["--checkpoint", str(checkpoint), flag, str(prompts), "--save-dir", str(save_dir)]
    argv += ["--num-inference-steps", STEPS, *extra]
    parser = sampling.build_parser(sampling.BENCHMARKS[bench])
    args = parser.parse_args(argv)
    sampling.validate_args(parser, args)
    return sampling.run(sampling.BENCHMARKS[bench], args)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


# --------------------------------------------------------------------------------------------
# Seeding: images depend only on (seed, prompt index, sample index)
# --------------------------------------------------------------------------------------------
def test_images_do_not_depend_on_batch_size(checkpoint: Path, heldout: list[dict]) -> None:
    from fusedit.pipeline import DiTPipeline

    pipe = DiTPipeline.from_checkpoint(checkpoint, "latest")
    prompts = [p["prompt"] for p in heldout[:3]]
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=7, num_images_per_prompt=2)
    one = pipe(prompts, batch_size=1, prompt_indices=[10, 11, 12], **kw)
    three = pipe(prompts, batch_size=3, prompt_indices=[10, 11, 12], **kw)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=0)
    alone = pipe(prompts[1:2], batch_size=1, prompt_indices=[11], **kw)  # prompt 11 sampled on its own
    torch.testing.assert_close(alone, one[2:4], atol=1e-5, rtol=0)
    assert (one[0] - one[1]).abs().max() > 1e-3, "two samples of one prompt must differ"


@pytest.mark.multiprocess
def test_one_and_two_processes_write_the_same_images(checkpoint: Path, prompts3: Path, tmp_path: Path) -> None:
    script = str(ROOT / "evaluation" / "sample_coco_ckpt.py")
    common = ["--checkpoint", str(checkpoint), "--prompts", str(prompts3), "--num-inference-steps", STEPS]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launchers = {
        "one": [sys.executable, script],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script],
        # accelerate's --multi_gpu path starts torch.distributed processes; on a CPU-only machine
        # they use gloo, so this is the documented `accelerate launch` command with 2 CPU processes
        "accelerate": [*accelerate, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script],
    }
    for name, launcher in launchers.items():
        cmd = [*launcher, *common, "--save-dir", str(tmp_path / name), "--batch-size", "2"]
        proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "(rank 0 of 2)" in proc.stderr if name != "one" else "(rank 0 of 1)" in proc.stderr
    for i in range(3):
        a = read_png(tmp_path / "one" / f"{i:05d}.png")
        for name in ("two", "accelerate"):
            b = read_png(tmp_path / name / f"{i:05d}.png")
            assert np.abs(a - b).max() <= 1, f"image {i} differs between 1 process and {name}"
    index = json.loads((tmp_path / "two" / sampling.INDEX_NAME).read_text())
    assert list(index) == ["00000", "00001", "00002"]  # every prompt, not one rank's slice


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bench", ["coco", "mjhq", "genaibench"])
def test_flat_layout(bench: str, checkpoint: Path, prompts3: Path, tmp_path: Path, heldout: list[dict]) -> None:
    out = tmp_path / bench
    summary = sample(bench, checkpoint, prompts3, out, "--batch-size", "2")
    assert summary == {"save_dir": str(out), "prompts": 3, "generated": 3, "skipped": 0}
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert read_png(out / "00000.png").shape == (32, 32, 3)
    index = json.loads((out / sampling.INDEX_NAME).read_text())
    assert index == {f"{i:05d}": heldout[i]["prompt"] for i in range(3)}
    settings = json.loads((out / sampling.SETTINGS_NAME).read_text())
    assert settings["step"] == 2 and settings["ema_weights"] and settings["resolution"] == 32
    assert settings["vae"]["pretrained_model_name_or_path"].endswith("vae")


def test_geneval_layout(checkpoint: Path, tmp_path: Path, heldout: list[dict]) -> None:
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(dict(p, tag="toy")) + "\n" for p in heldout[:3]))
    out = tmp_path / "geneval"
    sample("geneval", checkpoint, meta, out, "--images-per-prompt", "2", "--batch-size", "4")
    for i in range(3):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == dict(heldout[i], tag="toy")
        assert "\n" not in (folder / "metadata.jsonl").read_text()
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]


def test_dpgbench_grid(checkpoint: Path, tmp_path: Path, heldout: list[dict]) -> None:
    from fusedit.pipeline import DiTPipeline

    named = {"alpha": heldout[0]["prompt"], "beta": heldout[1]["prompt"], "gamma": heldout[2]["prompt"]}
    (tmp_path / "dpg.json").write_text(json.dumps(named))
    out = tmp_path / "dpg"
    sample("dpgbench", checkpoint, tmp_path / "dpg.json", out, "--batch-size", "8")
    assert sorted(p.name for p in out.glob("*.png")) == ["alpha.png", "beta.png", "gamma.png"]
    grid = read_png(out / "beta.png")
    assert grid.shape == (64, 64, 3)
    pipe = DiTPipeline.from_checkpoint(checkpoint, "latest")
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=6.0, seed=42, num_images_per_prompt=4)
    images = pipe([named["beta"]], prompt_indices=[1], **kw)
    tiles = sampling.to_uint8(images).numpy().astype(np.int16)
    for i in range(4):
        row, col = i // 2, i % 2
        assert np.abs(grid[32 * row : 32 * (row + 1), 32 * col : 32 * (col + 1)] - tiles[i]).max() <= 1
    # an array is accepted too, named prompt_{i:05d}
    (tmp_path / "dpg_list.json").write_text(json.dumps([named["alpha"]]))
    sample("dpgbench", checkpoint, tmp_path / "dpg_list.json", tmp_path / "dpg_list")
    assert (tmp_path / "dpg_list" / "prompt_00000.png").is_file()


# --------------------------------------------------------------------------------------------
# Resume and refusals
# --------------------------------------------------------------------------------------------
def test_resume_regenerates_only_missing_outputs(checkpoint: Path, prompts3: Path, tmp_path: Path) -> None:
    out = tmp_path / "coco"
    sample("coco", checkpoint, prompts3, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    original = read_png(out / "00001.png")
    (out / "00001.png").unlink()
    time.sleep(0.05)
    summary = sample("coco", checkpoint, prompts3, out)
    assert (summary["generated"], summary["skipped"]) == (1, 2)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert after["00000.png"] == before["00000.png"] and after["00002.png"] == before["00002.png"]
    assert after["00001.png"] > before["00001.png"]
    assert np.abs(read_png(out / "00001.png") - original).max() <= 1
    assert not list(out.glob(".*")), "no temp files left behind"
    # same folder, different image-affecting setting: refused rather than mixed
    with pytest.raises(sampling.SamplingError, match="guidance_scale"):
        sample("coco", checkpoint, prompts3, out, "--guidance-scale", "2.0")
    # same settings, but prompt 1 of the file changed: refused too
    changed = json.loads(prompts3.read_text())
    changed[1] = "another prompt"
    prompts3.write_text(json.dumps(changed))
    with pytest.raises(sampling.SamplingError, match="another prompt"):
        sample("coco", checkpoint, prompts3, out)


def test_cli_refusals(checkpoint: Path, prompts3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--checkpoint", str(checkpoint), "--prompts", str(prompts3), "--save-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as e:
        sampling.main("coco", [*base, "--type", "fuse-dit"])  # a baseline checkpoint: the family must match
    assert e.value.code == 2 and "holds a baseline-dit model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sampling.main("coco", [*base, "--type", "fuse-dit-clip"])
    assert e.value.code == 2 and "holds a baseline-dit model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --clip-l feeds the fuse-dit-clip type only
        sampling.main("coco", [*base, "--clip-l", str(tmp_path)])
    assert e.value.code == 2 and "--clip-l: only --type fuse-dit-clip" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sampling.main("coco", [*base, "--tag", "999"])
    assert "999" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sampling.main("coco", [*base, "--resolution", "30"])
    assert "multiple of" in capsys.readouterr().err


def test_a_truncated_weight_file_is_one_error_line(checkpoint: Path, prompts3: Path, tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    weights = run / "2" / "ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SystemExit) as e:
        sampling.main("coco", ["--checkpoint", str(run), "--prompts", str(prompts3), "--save-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "ema/diffusion_pytorch_model.safetensors" in err[0], err


def test_vae_override_is_used(checkpoint: Path, prompts3: Path, tmp_path: Path, quick_world: Path) -> None:
    out = tmp_path / "v"
    sample("coco", checkpoint, prompts3, out, "--vae", str(quick_world / "vae"), "--max-prompts", "1")
    vae = json.loads((out / sampling.SETTINGS_NAME).read_text())["vae"]
    assert vae == {"pretrained_model_name_or_path": str(quick_world / "vae"), "subfolder": None, "kind": "auto"}
    assert [p.name for p in out.glob("*.png")] == ["00000.png"]


@pytest.mark.parametrize(
    ("content", "loader", "message"),
    [
        ("{not json", sampling.load_prompt_list, "not valid JSON"),
        ('{"a": "b"}', sampling.load_prompt_list, "expected a JSON array"),
        ('["ok", {"caption": "x"}]', sampling.load_prompt_list, "item 1"),
        ('["ok", ""]', sampling.load_prompt_list, "item 1"),
        ('{"../evil": "x"}', sampling.load_named_prompts, "cannot be a file name"),
        ('{"prompt": "a"}\n[1]\n', sampling.load_geneval_metadata, "line 2 is not a JSON object"),
        ('{"tag": "x"}\n', sampling.load_geneval_metadata, "line 1"),
    ],
)
def test_prompt_files_are_validated(tmp_path: Path, content: str, loader, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(sampling.PromptFileError, match=message) as e:
        loader(path)
    assert str(path) in str(e.value)
    with pytest.raises(sampling.PromptFileError, match="not found"):
        loader(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------
def _write_images(folder: Path, arrays: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def _shapes(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Smooth random blobs: structured enough that a conv net's features vary across images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None]
        colour, background = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out.append(np.where(mask, colour, background).astype(np.uint8))
    return out


def test_fid_with_local_extractor(tmp_path: Path) -> None:
    real_arrays = _shapes(24, 64, seed=0)
    real = _write_images(tmp_path / "real", real_arrays)  # 64 px reals, resized to 32 for evaluation
    small = [np.asarray(Image.fromarray(a).resize((32, 32), Image.BICUBIC)) for a in real_arrays]
    same = _write_images(tmp_path / "same", small)
    rng = np.random.default_rng(1)
    noisy = [np.clip(a.astype(int) + rng.normal(0, 60, a.shape), 0, 255).astype(np.uint8) for a in real_arrays]
    noisy = _write_images(tmp_path / "noisy", noisy)
    other = _write_images(tmp_path / "other", _shapes(24, 32, seed=5))
    kw = dict(resolution=32, dataset_name="toy", feature_extractor=FID_EXTRACTOR, cache_dir=tmp_path / "cache")
    identical = fid.compute_fid(real, real, **kw)
    assert not identical["reference_stats_cached"] and abs(identical["fid"]) < 1e-6
    resized = fid.compute_fid(real, same, **kw)
    assert resized["reference_stats_cached"] and abs(resized["fid"]) < 1e-6  # reals really were resized to 32
    noised, unrelated = fid.compute_fid(real, noisy, **kw)["fid"], fid.compute_fid(real, other, **kw)["fid"]
    assert noised > 1e-3 and unrelated > 1e-3, (noised, unrelated)
    assert {"mode": "clean", "resolution": 32, "num_real": 24, "num_fake": 24}.items() <= resized.items()


def test_fid_cache_key_tracks_the_real_files(tmp_path: Path) -> None:
    real = _write_images(tmp_path / "real", _shapes(4, 32, seed=0))
    key = lambda res=32: fid.stats_key("toy", res, FID_EXTRACTOR, fid.file_list_digest(fid.list_images(real), real))
    first = key()
    assert key() == first and key(64) != first
    Image.fromarray(_shapes(1, 32, seed=9)[0]).save(real / "001.png")  # same name, new content
    os.utime(real / "001.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = key()
    assert changed != first
    (real / "003.png").unlink()
    assert key() not in (first, changed)
    (real / ".partial.png.1.tmp").write_bytes(b"")  # a sampler's temp file is not an image of the set
    assert fid.list_images(real) == sorted(real.glob("0*.png"))


def test_fid_cli_writes_json(tmp_path: Path) -> None:
    real = _write_images(tmp_path / "real", _shapes(6, 32, seed=0))
    out = tmp_path / "fid.json"
    argv = ["--real-images", str(real), "--fake-images", str(real), "--resolution", "32", "--num-workers", "0"]
    argv += ["--feature-extractor", FID_EXTRACTOR, "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    assert fid.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["feature_extractor"] == FID_EXTRACTOR and abs(result["fid"]) < 1e-6
    with pytest.raises(SystemExit, match="module:function"):
        fid.main([*argv[:-2], "--feature-extractor", "nocolon"])


# --------------------------------------------------------------------------------------------
# Prompt builder
# --------------------------------------------------------------------------------------------
def test_build_prompts_from_fake_sources(tmp_path: Path) -> None:
    annotations = [{"id": 10 * i + j, "image_id": i, "caption": f" cap {i}.{j}\n"} for i in range(5) for j in range(2)]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(5)]
    coco = {"images": images, "annotations": annotations}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    args = ["coco", "--captions", str(tmp_path / "captions.json"), "--num", "3", "--out", str(tmp_path / "coco.json")]
    assert build_prompts.main([*args, "--image-list", str(tmp_path / "coco_images.txt")]) == 0
    captions = json.loads((tmp_path / "coco.json").read_text())
    names = (tmp_path / "coco_images.txt").read_text().split()
    assert len(captions) == 3 and len(names) == 3
    for caption, name in zip(captions, names):  # one caption of each chosen image, whitespace cleaned
        assert caption.startswith(f"cap {int(name[-8:-4])}.")
    assert build_prompts.main(args) == 0 and json.loads((tmp_path / "coco.json").read_text()) == captions
    assert build_prompts.main([*args[:-4], "--num", "6", "--out", str(tmp_path / "x.json")]) == 2

    mjhq = {"b": {"category": "people", "prompt": "second"}, "a": {"category": "food", "prompt": "first"}}
    (tmp_path / "meta.json").write_text(json.dumps(mjhq))
    build_prompts.main(["mjhq", "--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "mjhq.json")])
    assert json.loads((tmp_path / "mjhq.json").read_text()) == ["second", "first"]  # key order, not sorted

    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}]
    (tmp_path / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    build_prompts.main(["geneval", "--metadata", str(tmp_path / "geneval.jsonl"), "--out", str(tmp_path / "g.jsonl")])
    assert [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()] == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no tag"}\n')
    assert build_prompts.main(["geneval", "--metadata", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "b")]) == 2

    (tmp_path / "dpg").mkdir()
    for stem, text in {"b_2": "two\n", "a_1": "one "}.items():
        (tmp_path / "dpg" / f"{stem}.txt").write_text(text)
    build_prompts.main(["dpgbench", "--prompts-dir", str(tmp_path / "dpg"), "--out", str(tmp_path / "dpg.json")])
    assert json.loads((tmp_path / "dpg.json").read_text()) == {"a_1": "one", "b_2": "two"}
    assert sampling.load_named_prompts(tmp_path / "dpg.json")[1].name == "b_2"

    genai = {"10": {"id": 10, "prompt": "ten"}, "2": {"id": 2, "prompt": "two"}}
    for source in (genai, ["two", {"prompt": "ten"}]):
        (tmp_path / "genai_src.json").write_text(json.dumps(source))
        build_prompts.main(["genaibench", "--prompts", str(tmp_path / "genai_src.json"), "--out", str(tmp_path / "ga")])
        assert json.loads((tmp_path / "ga").read_text()) == ["two", "ten"]


def test_build_prompts_help_names_sources() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "prompts" / "build_prompts.py"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for source in ("captions_val2014.json", "MJHQ-30K", "djghosh13/geneval", "ELLA", "GenAI-Bench", "toy-geneval"):
        assert source in proc.stdout


# --------------------------------------------------------------------------------------------
# Toy evaluation: build toy metadata -> sample GenEval layout -> score
# --------------------------------------------------------------------------------------------
def test_toy_eval_on_geneval_folder(checkpoint: Path, quick_world: Path, tmp_path: Path) -> None:
    meta = tmp_path / "toy_geneval.jsonl"
    assert build_prompts.main(["toy-geneval", "--toy", str(quick_world), "--out", str(meta)]) == 0
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert {"prompt", "color", "shape", "position", "background"} <= rows[0].keys()
    out = tmp_path / "geneval"
    sample("geneval", checkpoint, meta, out, "--max-prompts", "3", "--images-per-prompt", "2")
    scores_file = tmp_path / "scores.json"
    assert toy_eval.main(["--images", str(out), "--toy", str(quick_world), "--out", str(scores_file)]) == 0
    scores = json.loads(scores_file.read_text())
    assert (scores["images"], scores["prompts"], scores["n"]) == (6, 3, 6)
    assert set(scores["accuracy"]) == {"color", "shape", "position", "background"}
    assert all(0.0 <= v <= 1.0 for v in scores["accuracy"].values())
    assert scores["sampling"]["images_per_prompt"] == 2
    plain = tmp_path / "plain"  # metadata without toy attributes cannot be scored: say so
    (plain / "00000" / "samples").mkdir(parents=True)
    (plain / "00000" / "metadata.jsonl").write_text('{"prompt": "x"}')
    Image.new("RGB", (32, 32)).save(plain / "00000" / "samples" / "00000.png")
    with pytest.raises(ValueError, match="toy-geneval"):
        toy_eval.score_folder(plain, quick_world)


# --------------------------------------------------------------------------------------------
# diffusers export: the pipeline folder, read by diffusers itself in a fresh process
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fusedit.tools.export import main

    out = tmp_path_factory.mktemp("export") / "pipeline"
    assert main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def test_export_folder_loads_with_diffusers_and_matches_our_sampler(
    exported: Path, checkpoint: Path, heldout: list[dict], tmp_path: Path
) -> None:
    from fusedit.pipeline import DiTPipeline

    index = json.loads((exported / "model_index.json").read_text())
    assert {"transformer", "text_encoder", "tokenizer", "vae", "scheduler"} <= set(index)
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["max_prompt_length"] > 0
    assert index["resolution"] == 32
    prompts = [p["prompt"] for p in heldout[:2]]
    result = tmp_path / "images.npz"
    cmd = [sys.executable, "-c", LOAD_EXPORT, str(exported), str(result), *prompts]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = np.load(result, allow_pickle=False)
    assert str(loaded["cls"]) == "FuseDiTPipeline" and tuple(loaded["pil_size"]) == (32, 32)
    ours = DiTPipeline.from_checkpoint(checkpoint, "latest")
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=5, num_images_per_prompt=2)
    expected = ours(prompts, **kw).permute(0, 2, 3, 1).numpy()
    assert loaded["images"].shape == (4, 32, 32, 3)
    np.testing.assert_allclose(loaded["images"], expected, atol=1e-5, rtol=0)


def test_plain_autoencoderkl_reads_the_exported_vae_like_our_codec(exported: Path) -> None:
    """A user with diffusers only: the VAE config alone says how latents are normalised."""
    from diffusers import AutoencoderKL

    from common.vae_config import VaeSpec
    from fusedit.latents import LatentCodec

    info = json.loads((exported / "fusedit_export.json").read_text())
    norm = info["latent_normalisation"]
    vae = AutoencoderKL.from_pretrained(str(exported), subfolder="vae").eval()
    config = json.loads((exported / "vae" / "config.json").read_text())
    assert norm["source"] == "latents_mean/std"  # the toy VAE carries both; the per-channel pair wins
    np.testing.assert_allclose(norm["shift"], config["latents_mean"], rtol=1e-6)
    np.testing.assert_allclose(np.reciprocal(norm["scale"]), config["latents_std"], rtol=1e-6)
    codec = LatentCodec.from_spec(VaeSpec(info["vae"]["pretrained_model_name_or_path"]))  # training's VAE
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor(config["latents_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        plain = (vae.encode(pixels).latent_dist.mean - mean) / std
        ours = codec.encode(pixels, sample=False)
        torch.testing.assert_close(plain, ours, atol=1e-5, rtol=1e-5)
        decoded = vae.decode(ours * std + mean).sample.clamp(-1, 1)
        torch.testing.assert_close(decoded, codec.decode(ours), atol=1e-5, rtol=1e-5)


def test_samplers_accept_an_exported_folder(exported: Path, checkpoint: Path, prompts3: Path, tmp_path: Path) -> None:
    from_export = sample("coco", exported, prompts3, tmp_path / "export")
    from_run = sample("coco", checkpoint, prompts3, tmp_path / "run")
    assert from_export["generated"] == from_run["generated"] == 3
    for name in ("00000.png", "00002.png"):
        assert np.abs(read_png(tmp_path / "export" / name) - read_png(tmp_path / "run" / name)).max() <= 1
    settings = json.loads((tmp_path / "export" / sampling.SETTINGS_NAME).read_text())
    assert settings["step"] == 2 and settings["ema_weights"] and settings["resolution"] == 32


def test_export_cli_refusals(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fusedit.tools.export import main

    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: --checkpoint")
    assert main(["--checkpoint", str(exported.parent), "--out", str(exported)]) == 2
    assert "exists" in capsys.readouterr().err
