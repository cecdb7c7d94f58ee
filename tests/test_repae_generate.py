"""REPA-E samplers and the 50k-sample generator.

Facts and reference defects checked (docs/reference-facts.md): REPAE-7.1 to REPAE-7.4, REPAE-10.11 to
REPAE-10.14, REPAE-D10 and REPAE-D15.

The samplers are checked against a Gaussian toy flow whose velocity field and ODE solution are
known in closed form; the generator runs end to end on a tiny SiT with a stand-in decoder.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.randomness import index_seed
from repae import generate as gen
from repae.samplers import (
    euler_maruyama_sampler,
    euler_sampler,
    expected_nfe,
    run_sampler,
    sde_drift,
    sde_time_grid,
)
from repae.transport import path_coefficients

NULL = 3
MEANS = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)  # per class; the null class (3) has mean 0
STD = 0.5


# --------------------------------------------------------------------------------- toy flows
def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, path_type: str = "linear") -> torch.Tensor:
    """Exact E[v | x_t = x] when x0 ~ N(MEANS[y], STD^2) per element and eps ~ N(0, 1)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    t64 = t.double().view(shape)
    mu = MEANS.to(x.device)[y].view(shape)
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t64, path_type)
    var = alpha.square() * STD**2 + sigma.square()
    centred = x.double() - alpha * mu
    gain = (d_alpha * alpha * STD**2 + d_sigma * sigma) / var
    return (d_alpha * mu + gain * centred).to(x.dtype)


class Recorder:
    """Wraps a velocity fn and records (t, batch size) per call: NFE and guidance decisions."""

    def __init__(self, fn=gaussian_velocity) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, x, t, y):
        assert x.dtype == torch.float32 and t.dtype == torch.float32  # model sees the noise dtype
        assert torch.all(t == t[0])
        self.calls.append((round(float(t[0]), 6), x.shape[0]))
        return self.fn(x, t, y)


def _noise(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, 3, generator=g), torch.arange(n) % 3


# --------------------------------------------------------------------------------------- ODE
def test_ode_euler_and_heun_reach_the_analytic_solution():
    noise, labels = _noise()
    exact = (MEANS[labels].view(-1, 1, 1, 1) + STD * noise.double()).float()  # flow map t=1 -> 0

    def error(steps: int, heun: bool) -> float:
        out = euler_sampler(gaussian_velocity, noise, labels, num_steps=steps, heun=heun, null_label=NULL)
        assert out.dtype == torch.float32 and out.shape == noise.shape
        return (out - exact).abs().max().item()

    euler = euler_sampler(gaussian_velocity, noise, labels, num_steps=1000, null_label=NULL)
    heun = euler_sampler(gaussian_velocity, noise, labels, num_steps=20, heun=True, null_label=NULL)
    assert (euler - exact).abs().max() < 5e-3
    assert (heun - exact).abs().max() < 1.5e-2
    assert (heun - euler).abs().max() < 1.5e-2
    # Convergence orders: halving the step divides Heun's error by ~4 and Euler's by ~2.
    assert error(20, True) / error(40, True) > 3.5
    assert 1.7 < error(20, False) / error(40, False) < 2.3


@pytest.mark.parametrize("heun, steps, nfe", [(False, 7, 7), (True, 7, 13), (True, 1, 1)])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_ode_nfe_and_cfg_doubles_batch_not_nfe(heun, steps, nfe, cfg_scale):
    noise, labels = _noise(5)
    rec = Recorder()
    euler_sampler(rec, noise, labels, num_steps=steps, heun=heun, cfg_scale=cfg_scale, null_label=NULL)
    assert len(rec.calls) == nfe == expected_nfe("ode", steps, heun)
    assert {b for _, b in rec.calls} == {10 if cfg_scale > 1 else 5}


def test_guidance_interval_and_heun_reuses_the_decision_at_t_i():
    noise, labels = _noise(4)
    rec = Recorder()
    kw = dict(num_steps=10, cfg_scale=3.0, guidance_low=0.25, guidance_high=0.75, null_label=NULL)
    euler_sampler(rec, noise, labels, **kw)
    doubled = [t for t, b in rec.calls if b == 8]
    assert doubled == [0.7, 0.6, 0.5, 0.4, 0.3]
    assert all(b == 4 for t, b in rec.calls if t not in doubled)

    rec = Recorder()
    euler_sampler(rec, noise, labels, heun=True, **kw)
    # (t, batch) pairs: predictor at t_i, corrector at t_{i+1} with t_i's decision.
    pairs = list(zip(rec.calls[0::2], rec.calls[1::2]))
    by_start = {p[0]: (p[1], c) for p, c in pairs}
    assert by_start[0.8] == (4, (0.7, 4))  # 0.7 is inside the interval, but the step started outside
    assert by_start[0.3] == (8, (0.2, 8))  # 0.2 is outside, but the step started inside
    assert rec.calls[-1] == (0.1, 4)  # the last step has no corrector


def test_cfg_combines_cond_and_uncond_on_every_channel():
    """Constant fields: v = +1 for real classes, -2 for the null class, so the result is exact."""

    def const(x, t, y):
        value = torch.where(y == NULL, -2.0, 1.0).view(-1, 1, 1, 1)
        return value.expand_as(x).to(x.dtype)

    noise, labels = _noise(3)
    scale, steps = 1.5, 10
    out = euler_sampler(const, noise, labels, num_steps=steps, cfg_scale=scale, guidance_low=0.25,
                        guidance_high=0.75, null_label=NULL)  # fmt: skip
    guided = -2.0 + scale * (1.0 - -2.0)  # uncond + s (cond - uncond) = 2.5
    expected = noise - (5 * guided + 5 * 1.0) / steps  # 5 of 10 steps inside [0.25, 0.75]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    plain = euler_sampler(const, noise, labels, num_steps=steps, cfg_scale=1.0, null_label=NULL)
    torch.testing.assert_close(plain, noise - 1.0, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------- SDE
def test_sde_grid_for_250_steps():
    grid = sde_time_grid(250)
    assert grid.dtype == torch.float64 and grid.shape == (251,)
    assert grid[0] == 1.0 and abs(float(grid[249]) - 0.04) < 1e-12 and grid[250] == 0.0
    torch.testing.assert_close(grid[1] - grid[0], torch.tensor(-0.96 / 249, dtype=torch.float64))

    noise, labels = _noise(2)
    rec = Recorder()
    g = torch.Generator().manual_seed(7)
    euler_maruyama_sampler(rec, noise, labels, num_steps=250, null_label=NULL, generator=g)
    assert len(rec.calls) == 250 == expected_nfe("sde", 250)
    np.testing.assert_allclose([t for t, _ in rec.calls], grid[:250].float().numpy(), atol=1e-6)
    # 249 noisy steps and one deterministic one: the generator advanced by exactly 249 draws.
    ref = torch.Generator().manual_seed(7)
    for _ in range(249):
        torch.randn(noise.shape, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_sde_drift_linear_closed_form_and_cosine():
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(2, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.7, 0.3, 0.04], dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(sde_drift(v, x, t, "linear"), (2 - tt) * v + x)
    # cosine: var = 1 and alpha/alpha' = -(2/pi) cot(pi t/2)
    ratio = -(2 / torch.pi) / torch.tan(torch.pi * tt / 2)
    torch.testing.assert_close(sde_drift(v, x, t, "cosine"), v - tt * (ratio * v - x))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_samples_the_data_distribution(path_type):
    """With the exact velocity of the path, Euler-Maruyama lands on N(mu_y, STD^2)."""
    n = 4096
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(n, dtype=torch.int64)
    fn = lambda x, t, y: gaussian_velocity(x, t, y, path_type)
    out = euler_maruyama_sampler(fn, noise, labels, num_steps=100, null_label=NULL, path_type=path_type,
                                 generator=torch.Generator().manual_seed(2)).double()  # fmt: skip
    assert abs(out.mean().item() - MEANS[0].item()) < 0.03
    assert abs(out.std().item() - STD) < 0.03
    ode = euler_sampler(fn, noise, labels, num_steps=100, null_label=NULL).double()
    assert (out - ode).abs().mean() > 0.05  # the SDE really injected noise


def test_sde_cfg_counts_and_per_row_generators_make_rows_independent():
    noise, labels = _noise(4)
    rec = Recorder()
    kw = dict(num_steps=6, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.5, null_label=NULL)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    both = euler_maruyama_sampler(rec, noise, labels, generator=gens, **kw)
    assert len(rec.calls) == 6
    assert [b for t, b in rec.calls] == [8 if t <= 0.5 else 4 for t, _ in rec.calls]
    for i in range(4):
        alone = euler_maruyama_sampler(gaussian_velocity, noise[i : i + 1], labels[i : i + 1],
                                       generator=[torch.Generator().manual_seed(10 + i)], **kw)  # fmt: skip
        torch.testing.assert_close(alone, both[i : i + 1], atol=1e-6, rtol=0)


def test_run_sampler_dispatch_rejects_heun_sde():
    noise, labels = _noise(2)
    with pytest.raises(ValueError, match="Heun"):
        run_sampler(gaussian_velocity, noise, labels, mode="sde", num_steps=3, heun=True, null_label=NULL)
    out = run_sampler(gaussian_velocity, noise, labels, mode="ode", num_steps=3, null_label=NULL)
    torch.testing.assert_close(out, euler_sampler(gaussian_velocity, noise, labels, num_steps=3, null_label=NULL))


# ------------------------------------------------------------------------- labels, seeds, pixels
def test_plan_labels_balanced_and_random():
    labels = gen.plan_labels(50_000, 1000, "balanced", seed=0)
    assert labels.dtype == torch.int64 and labels.shape == (50_000,)
    assert set(Counter(labels.tolist()).values()) == {50}
    assert torch.equal(labels, gen.plan_labels(50_000, 1000, "balanced", seed=0))
    assert not torch.equal(labels, gen.plan_labels(50_000, 1000, "balanced", seed=1))
    assert not torch.equal(labels[:1000], labels[:1000].sort().values)  # shuffled
    uneven = Counter(gen.plan_labels(1500, 1000, "balanced", seed=3).tolist())
    assert len(uneven) == 1000 and set(uneven.values()) == {1, 2}
    rand = gen.plan_labels(1000, 10, "random", seed=5)
    assert torch.equal(rand, gen.plan_labels(1000, 10, "random", seed=5)) and rand.max() < 10
    with pytest.raises(ValueError):
        gen.plan_labels(10, 10, "uniform")


def test_sample_seeds_are_distinct_within_and_across_global_seeds():
    seeds0 = {index_seed(0, i) for i in range(50_000)}
    seeds1 = {index_seed(1, i) for i in range(50_000)}
    assert len(seeds0) == len(seeds1) == 50_000
    assert not seeds0 & seeds1  # the reference's seed formula mapped seeds 0 and 1 to one stream
    assert all(0 <= s < 2**32 for s in seeds0)


def test_to_uint8_truncates_like_the_reference_and_can_round():
    levels = torch.tensor([-1.0, -2.0, 1.0, 3.0, 2 * 0.6 / 255 - 1, 2 * 254.5001 / 255 - 1])
    x = levels.view(1, 1, 1, -1).expand(1, 3, 1, -1)
    out = gen.to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 6, 3)
    reference = (255 * ((x + 1) / 2)).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # REPAE-7.4
    assert (out == reference).all() and out[0, 0, :, 0].tolist() == [0, 0, 255, 255, 0, 254]
    assert gen.to_uint8(x, "round")[0, 0, :, 0].tolist() == [0, 0, 255, 255, 1, 255]


def test_ode_grid_is_the_references_linspace_not_one_minus_i_over_n():
    from repae.samplers import ode_time_grid

    grid = ode_time_grid(50)
    assert torch.equal(grid, torch.linspace(1, 0, 51, dtype=torch.float64))
    ours_before = 1.0 - torch.arange(51, dtype=torch.float64) / 50
    assert (grid != ours_before).any(), "the two grids differ by an ulp somewhere (why the choice matters)"


# --------------------------------------------------------------------------- tiny generator
def tiny_sit(num_classes: int = 5) -> nn.Module:
    from repae.models.sit import SiT

    torch.manual_seed(0)
    sit = SiT(input_size=4, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
              num_classes=num_classes, z_dims=(16,), encoder_depth=1, projector_dim=32)  # fmt: skip
    with torch.no_grad():  # the final layer is zero-initialised: give the field some shape
        for p in sit.parameters():
            if p.requires_grad and p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(std=0.05)
        sit.init_bn(torch.full((4,), 2.0), torch.linspace(-0.5, 0.5, 4))
    return sit.eval()


class CountingSiT(nn.Module):
    """Counts forward calls; optionally fails after ``fail_after`` calls (an interrupted job)."""

    def __init__(self, sit: nn.Module, fail_after: int | None = None) -> None:
        super().__init__()
        self.sit, self.null_class, self.calls, self.fail_after = sit, sit.null_class, 0, fail_after

    def forward(self, x, t, y):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        return self.sit(x, t, y)

    def denormalize(self, x):
        return self.sit.denormalize(x)


class TinyBundle:
    """What ``generate_to_npz`` needs from a ``SamplingBundle``; the decoder is a fixed toy map."""

    def __init__(self, sit: nn.Module, num_classes: int = 5) -> None:
        self.sit, self.vae, self.num_classes = sit, None, num_classes
        self.latent_shape, self.resolution, self.step = (4, 4, 4), 8, 1234
        self.config = {"sample": {"mode": "ode", "num_steps": 3}, "loss": {"path_type": "linear"}}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.sit.denormalize(x.float())
        return torch.tanh(F.interpolate(z[:, :3] - z[:, 3:], scale_factor=2, mode="nearest"))


SDE = dict(mode="sde", num_steps=4, heun=False, cfg_scale=2.0, guidance_low=0.0, guidance_high=0.6, path_type="linear")
ODE = dict(mode="ode", num_steps=3, heun=False, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, path_type="linear")


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["labels"]


def test_generate_to_npz_format_and_independence_from_batch_size(tmp_path):
    bundle = TinyBundle(tiny_sit())
    labels = gen.plan_labels(7, 5, "balanced", seed=0)
    a = gen.generate_to_npz(bundle, tmp_path / "a", labels, SDE, batch_size=1, seed=0, progress=False, chunk_size=3)
    b = gen.generate_to_npz(bundle, tmp_path / "b", labels, SDE, batch_size=3, seed=0, progress=False, chunk_size=3)
    arr_a, lab_a = _npz(a)
    arr_b, _ = _npz(b)
    assert arr_a.dtype == np.uint8 and arr_a.shape == (7, 8, 8, 3)
    assert np.array_equal(lab_a, labels.numpy())
    assert arr_a.std() > 5  # not a constant image
    assert np.abs(arr_a.astype(int) - arr_b.astype(int)).max() <= 1  # only float-rounding noise may differ
    assert (arr_a != arr_b).mean() < 1e-3
    assert not (tmp_path / "a" / gen.PARTS_DIR).exists()  # parts removed after assembly
    other_seed = gen.generate_to_npz(bundle, tmp_path / "c", labels, SDE, batch_size=3, seed=1, progress=False)
    assert not np.array_equal(_npz(other_seed)[0], arr_a)


def test_two_ranks_in_process_match_a_single_process(tmp_path):
    bundle = TinyBundle(tiny_sit())
    labels = gen.plan_labels(10, 5, "random", seed=0)
    kw = dict(batch_size=2, seed=0, progress=False, chunk_size=3)
    single = _npz(gen.generate_to_npz(bundle, tmp_path / "one", labels, ODE, **kw))[0]
    out = tmp_path / "two"
    gen.generate_to_npz(bundle, out, labels, ODE, rank=0, world_size=2, **kw)
    assert sorted(p.name for p in (out / gen.PARTS_DIR).iterdir()) == [
        "part-000000-000003.npy",
        "part-000006-000009.npy",
    ]
    assert not (out / gen.NPZ_NAME).exists()  # rank 1's chunks are missing
    gen.generate_to_npz(bundle, out, labels, ODE, rank=1, world_size=2, **kw)
    assert not (out / gen.NPZ_NAME).exists()  # only rank 0 assembles
    arr, lab = _npz(gen.assemble_npz(out, labels, chunk_size=3))
    assert np.abs(arr.astype(int) - single.astype(int)).max() <= 1 and (arr != single).mean() < 1e-3
    assert np.array_equal(lab, labels.numpy())


def test_interrupted_run_resumes_by_skipping_finished_chunks(tmp_path):
    labels = gen.plan_labels(6, 5, "balanced", seed=0)
    kw = dict(batch_size=1, seed=0, progress=False, chunk_size=2)
    reference = _npz(gen.generate_to_npz(TinyBundle(tiny_sit()), tmp_path / "ref", labels, ODE, **kw))[0]

    crashing = CountingSiT(tiny_sit(), fail_after=8)  # 3 NFE per image: chunk 0 (6 calls) done, then crash
    with pytest.raises(RuntimeError, match="simulated crash"):
        gen.generate_to_npz(TinyBundle(crashing), tmp_path / "run", labels, ODE, **kw)
    assert [p.name for p in (tmp_path / "run" / gen.PARTS_DIR).glob("*.npy")] == ["part-000000-000002.npy"]

    counting = CountingSiT(tiny_sit())
    npz = gen.generate_to_npz(TinyBundle(counting), tmp_path / "run", labels, ODE, **kw)
    assert counting.calls == 4 * 3  # only the 4 images of the two unfinished chunks
    assert np.array_equal(_npz(npz)[0], reference)


# ------------------------------------------------------------------------------------ the CLI
def test_cli_names_folder_from_settings_skips_done_and_refuses_foreign_out(tmp_path, monkeypatch, capsys):
    import repae.checkpoint

    counting = CountingSiT(tiny_sit())
    loads = []

    def fake_load(run_dir, tag="latest", use_ema=True, device="cpu"):
        loads.append((str(run_dir), tag, use_ema))
        return TinyBundle(counting)

    monkeypatch.setattr(repae.checkpoint, "load_sampling_bundle", fake_load)
    run = tmp_path / "myrun"
    base = ["--run", str(run), "--num-samples", "10", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    assert gen.main(base) == 0
    folders = list((run / "samples").iterdir())
    assert [f.name for f in folders] == ["myrun-1234-ema-ode3-cfg1-0-1-seed0-balanced-n10-fp32-truncate"]  # run config
    record = json.loads((folders[0] / gen.SETTINGS_NAME).read_text())
    assert record["complete"] and record["settings"]["mode"] == "ode" and record["settings"]["num_steps"] == 3
    arr, lab = _npz(folders[0] / gen.NPZ_NAME)
    assert arr.shape == (10, 8, 8, 3) and arr.dtype == np.uint8 and sorted(Counter(lab.tolist()).values()) == [2] * 5
    assert counting.calls == 3 * 3  # 3 batches x 3 steps

    counting.calls = 0
    assert gen.main(base) == 0  # identical settings: reported and skipped
    assert counting.calls == 0 and "nothing to do" in capsys.readouterr().out

    assert gen.main([*base, "--mode", "sde", "--cfg-scale", "1.5", "--guidance-high", "0.7", "--seed", "3"]) == 0
    names = sorted(f.name for f in (run / "samples").iterdir())
    assert "myrun-1234-ema-sde250-cfg1.5-0-0.7-seed3-balanced-n10-fp32-truncate" in names
    assert counting.calls == 3 * 250

    capsys.readouterr()
    assert gen.main([*base, "--out", str(folders[0]), "--seed", "9"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert gen.main([*base, "--mode", "sde", "--heun"]) == 2
    assert "--heun only exists for --mode ode" in capsys.readouterr().err
    assert loads[0] == (str(run), "latest", True)


LAUNCHER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import repae.checkpoint
from test_repae_generate import TinyBundle, tiny_sit
repae.checkpoint.load_sampling_bundle = lambda *args, **kwargs: TinyBundle(tiny_sit())
from repae.generate import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.multiprocess
def test_torchrun_two_processes_match_one(tmp_path):
    """Real gloo process group: round-robin chunks, barriers, rank-0 assembly, same images."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent
    script = tmp_path / "launch.py"
    script.write_text(LAUNCHER.format(root=str(tests.parent), tests=str(tests)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    common = ["--run-dir", str(tmp_path / "run"), "--num-samples", "10", "--chunk-size", "3", "--batch-size", "2",
              "--mode", "sde", "--num-steps", "5", "--cfg-scale", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    runs = {
        "one": [sys.executable, str(script), *common, "--out", str(tmp_path / "one")],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            *common,
            "--out",
            str(tmp_path / "two"),
        ],  # fmt: skip
    }
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    one, two = _npz(tmp_path / "one" / gen.NPZ_NAME), _npz(tmp_path / "two" / gen.NPZ_NAME)
    assert two[0].shape == (10, 8, 8, 3) and np.array_equal(one[1], two[1])
    assert np.abs(one[0].astype(int) - two[0].astype(int)).max() <= 1 and (one[0] != two[0]).mean() < 1e-3
    record = json.loads((tmp_path / "two" / gen.SETTINGS_NAME).read_text())
    assert record["complete"] and record["runtime"]["world_size"] == 2


def test_sampling_defaults_come_from_the_run_config(tmp_path):
    from types import SimpleNamespace

    (tmp_path / "config.yaml").write_text("loss:\n  path_type: cosine\nsample:\n  mode: ode\n  num_steps: 3\n")
    config = gen.run_config(SimpleNamespace(config={}), tmp_path)  # checkpoint without a config: read the YAML
    assert config["loss"]["path_type"] == "cosine"

    def resolve(*flags: str) -> dict:
        return gen.resolve_sampling(gen.build_parser().parse_args(["--run", "x", *flags]), config)

    assert resolve() == {**ODE, "num_steps": 3}  # the run's preview settings; ODE ignores the path
    assert resolve("--mode", "sde")["num_steps"] == 250  # the config's steps were for the other mode
    assert resolve("--mode", "sde")["path_type"] == "cosine"  # the path the run was trained on
    assert resolve("--mode", "sde", "--path-type", "linear", "--num-steps", "9")["num_steps"] == 9
    assert resolve("--mode", "sde", "--path-type", "linear")["path_type"] == "linear"
    with pytest.raises(ValueError, match="cfg-scale"):
        resolve("--cfg-scale", "0.5")
    with pytest.raises(ValueError, match="guidance"):
        resolve("--guidance-low", "0.8", "--guidance-high", "0.2")


def _read_like_adm_evaluator(path: Path, batch: int = 3) -> np.ndarray:
    """How guided-diffusion's ``evaluations/evaluator.py`` streams ``arr_0`` (numpy and zipfile only).

    It opens the ``arr_0.npy`` member of the zip itself, parses the ``.npy`` header with
    ``numpy.lib.format`` and reads C-ordered rows in batches, so a member that ``np.load`` happens
    to accept but that is Fortran-ordered, pickled or not a plain header would fail there.
    """
    import zipfile

    from numpy.lib import format as npy

    with zipfile.ZipFile(path, "r") as zf, zf.open("arr_0.npy", "r") as f:
        version = npy.read_magic(f)
        header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[version]
        shape, fortran, dtype = header(f)
        assert not fortran and dtype == np.uint8 and len(shape) == 4 and shape[-1] == 3
        rows = []
        per_row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            data = f.read(n * per_row)
            assert len(data) == n * per_row
            rows.append(np.frombuffer(data, dtype=np.uint8).reshape(n, *shape[1:]))
    return np.concatenate(rows)


def test_npz_reads_with_the_adm_evaluators_streaming_reader(tmp_path):
    labels = gen.plan_labels(7, 5, "balanced", seed=0)
    path = gen.generate_to_npz(TinyBundle(tiny_sit()), tmp_path, labels, ODE, batch_size=4, seed=0, progress=False)
    streamed = _read_like_adm_evaluator(path)
    arr, lab = _npz(path)
    assert streamed.shape == (7, 8, 8, 3) and np.array_equal(streamed, arr)
    assert lab.dtype == np.int64 and np.array_equal(lab, labels.numpy())
