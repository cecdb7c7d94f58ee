"""The FuseDiT family through the real training path (issue 27): config, train.py, checkpoints, sampling.

The model itself (options, masks, positions, the text KV cache) is tested in test_fuse_dit.py;
here it runs as a user runs it: ``train.py -c configs/e2e-vae/toy-fusedit.yaml`` on the quick toy
world, through DeepSpeed ZeRO-2, the EMA, checkpoints, resume, the preview grid and
``DiTPipeline.from_checkpoint``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import ConfigError
from fusedit.config import load_config
from tests.conftest import ROOT, in_parallel, launch, tiny_fuse_overrides

CONFIG = ROOT / "configs" / "e2e-vae" / "toy-fusedit.yaml"
TOY = ROOT / "configs" / "e2e-vae" / "toy.yaml"
TRAINED = {"trainer.train_llm": "true"}
FROZEN = {"trainer.train_llm": "false"}  # a real run's setting (toy-fusedit.yaml trains its random toy LLM)
WORLD_OVERRIDES = ["model.base=/x/text_encoder", "vae.pretrained_model_name_or_path=/x/vae"]


def _train(overrides: list[str], check: bool = True):
    return launch([str(ROOT / "train.py"), "-c", str(CONFIG), *overrides], check=check)


def test_fuse_dit_config_loads_and_refuses_what_does_not_apply() -> None:
    cfg = load_config(CONFIG, WORLD_OVERRIDES)
    assert cfg.model.is_fuse_dit and cfg.fuse_dit_kwargs(4)["shared_attention_layers"] == "all"
    cases = [
        (TOY, ["model.initial_layers=1"], "model.initial_layers"),
        (TOY, ["model.shared_attention_layers=[0]"], "model.shared_attention_layers"),
        (TOY, ["trainer.train_llm=true"], "trainer.train_llm"),
        (CONFIG, ["trainer.train_dit=false", "trainer.train_llm=false"], "both false"),
        (CONFIG, ["data.text_cache=/x/text-features"], "data.text_cache"),
        (CONFIG, ["model.shared_attention_layers=[1, 0]"], "model.shared_attention_layers"),
        (CONFIG, ["model.shared_attention_layers=first"], "model.shared_attention_layers"),
        (CONFIG, ["model.initial_layers=-1"], "model.initial_layers"),
        (CONFIG, ["model.name=fusion"], "model.name"),
    ]
    for path, overrides, culprit in cases:
        with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
            load_config(path, WORLD_OVERRIDES + overrides)


def test_heads_that_contradict_the_llm_are_refused_by_name(quick_world: Path, tmp_path: Path) -> None:
    proc = _train(tiny_fuse_overrides(quick_world, tmp_path / "run", **{"model.num_attention_heads": 8}), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: model.num_attention_heads: 8" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_fuse_dit_trains_resumes_and_samples(quick_world: Path, tmp_path: Path, capsys) -> None:
    """4 steps (checkpoint at 2, preview at 4), resume to 6; the folders load on their own and sample.

    Beside the first run, a 2-step run with ``trainer.train_llm: true`` checks that the LLM trains.
    """
    from fusedit.flops import TrainingFlops
    from fusedit.models import FuseDiT
    from fusedit.pipeline import DiTPipeline

    run, llm_run = tmp_path / "run", tmp_path / "train_llm"
    common = {"trainer.checkpointing_steps": 2, "trainer.sampling_steps": 4, "sample.num_steps": 2}
    in_parallel(  # one thread each: side by side
        lambda: _train(tiny_fuse_overrides(quick_world, run, **common, **{"trainer.max_steps": 4, **FROZEN})),
        lambda: _train(tiny_fuse_overrides(quick_world, llm_run, **{"trainer.max_steps": 2, **TRAINED})),
    )
    _check_llm_trained(quick_world, llm_run)
    _train(tiny_fuse_overrides(quick_world, run, **common, **{"trainer.max_steps": 6, **FROZEN}))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(r["train/loss"] > 0 for r in rows)
    assert (run / "samples" / "00000004.png").is_file()

    config = json.loads((run / "6" / "ema" / "config.json").read_text())
    assert config["_class_name"] == "FuseDiT" and config["num_layers"] == 3
    ema, raw = (load_file(str(run / "6" / k / "diffusion_pytorch_model.safetensors")) for k in ("ema", "model"))
    llm = [k for k in raw if k.startswith("llm.")]
    assert llm and all(torch.equal(ema[k], raw[k]) for k in llm)  # frozen: the same in both folders
    start = FuseDiT.from_llm(str(quick_world / "text_encoder"), **{k: config[k] for k in ("num_layers", "hidden_size")})
    assert torch.equal(raw["llm.embed_tokens.weight"], start.llm.embed_tokens.weight)  # the LLM did not move
    assert not torch.equal(ema["dit.proj_out.weight"], raw["dit.proj_out.weight"])  # the EMA lags the DiT

    # the log's model FLOPs are the family's formula at the row's padded text length
    from fusedit.tools.plan import describe_vae, vae_encoder_forward_flops

    cfg = load_config(str(run / "config.yaml"), [])
    vae = vae_encoder_forward_flops(describe_vae(cfg), cfg.data.resolution)  # no latent cache here
    image_tokens = (config["sample_size"] // config["patch_size"]) ** 2
    flops = TrainingFlops({**config, "train_llm": False}, image_tokens, None, vae)
    for row in rows:
        per_image = row["perf/model_tflop_per_s_per_gpu"] * 1e12 / row["perf/images_per_s"]
        assert any(per_image == pytest.approx(flops.per_sample(n), rel=1e-6) for n in (8, 16, 24, 32)), row

    pipe = DiTPipeline.from_checkpoint(run, "latest")
    assert isinstance(pipe.transformer, FuseDiT)
    images = pipe(["a red circle"], height=32, width=32, num_inference_steps=2, guidance_scale=1.5, seed=0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()

    # a benchmark sampler, as a user runs it, with the family named
    from evaluation import sampling

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a red circle", "a blue square"]))
    argv = [
        "--checkpoint",
        str(run),
        "--type",
        "fuse-dit",
        "--prompts",
        str(prompts),
        "--save-dir",
        str(tmp_path / "coco"),
    ]
    parser = sampling.build_parser(sampling.BENCHMARKS["coco"])
    args = parser.parse_args([*argv, "--num-inference-steps", "2", "--resolution", "32"])
    sampling.validate_args(parser, args)
    sampling.run(sampling.BENCHMARKS["coco"], args)
    assert len(list((tmp_path / "coco").rglob("*.png"))) == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:  # no pooled CLIP text in this model: one error line
        sampling.main("coco", [*argv[:2], "--type", "fuse-dit-clip", *argv[4:6], "--save-dir", str(tmp_path / "c")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and loading bars)
    assert err.value.code == 2 and len(lines) == 1, lines
    assert "error: --type fuse-dit-clip, but the checkpoint holds a fuse-dit model" in lines[0]
    check_export(run, tmp_path)


def check_export(run: Path, tmp_path: Path) -> None:
    """The diffusers export of a FuseDiT run: plain diffusers loads it and samples our images."""
    import subprocess
    import sys

    import numpy as np

    from fusedit.models import FuseDiT
    from fusedit.pipeline import DiTPipeline
    from fusedit.tools.export import main as export_main
    from tests.conftest import LOAD_EXPORT, cli_env

    out, result, prompts = tmp_path / "pipeline", tmp_path / "images.npz", ["a red circle", "a blue square"]
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "transformer" / "config.json").read_text())["_class_name"] == "FuseDiT"
    cmd = [sys.executable, "-c", LOAD_EXPORT, str(out), str(result), *prompts]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = np.load(result, allow_pickle=False)
    assert str(loaded["cls"]) == "FuseDiTPipeline"
    ours = DiTPipeline.from_checkpoint(run, "latest")
    assert isinstance(ours.transformer, FuseDiT)
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, seed=5, num_images_per_prompt=2)
    expected = ours(prompts, **kw).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(loaded["images"], expected, atol=1e-5, rtol=0)


def _check_llm_trained(quick_world: Path, run: Path) -> None:
    """trainer.train_llm: the LLM's weights moved, except those that never influence the output."""
    from fusedit.models import FuseDiT

    raw = load_file(str(run / "2" / "model" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((run / "2" / "model" / "config.json").read_text())
    start = FuseDiT.from_llm(str(quick_world / "text_encoder"), **{k: config[k] for k in ("num_layers", "hidden_size")})
    unused = {f"llm.{n}" for n in start.unused_llm_parameter_names()}
    before = {f"llm.{n}": p for n, p in start.llm.named_parameters()}
    moved = {k for k, p in before.items() if not torch.equal(raw[k], p)}
    assert "llm.layers.0.self_attn.q_proj.weight" in moved and "llm.embed_tokens.weight" in moved
    assert not moved & unused  # llm.norm and the last layer's query/output/MLP never influence the output
