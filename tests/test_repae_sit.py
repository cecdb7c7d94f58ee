"""SiT of the REPA-E stage (sizes, init, BN normaliser, alignment pass, reference loading) and transport."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from safetensors.torch import save_file

from repae.models.sit import SIT_ARCHS, SiT, build_sit, load_reference_sit, sincos_2d, timestep_frequencies
from repae.transport import denoising_loss, interpolate, path_coefficients, sample_time

TINY = dict(
    input_size=8,
    in_channels=4,
    patch_size=2,
    hidden_size=32,
    depth=3,
    num_heads=2,
    num_classes=10,
    z_dims=(16, 8),
    encoder_depth=2,
    projector_dim=24,
)


def tiny(**overrides) -> SiT:
    torch.manual_seed(0)
    return SiT(**{**TINY, **overrides})


def randomize(model: SiT, seed: int = 0) -> SiT:
    """Give every parameter (zero-initialised ones included) non-trivial values; keep pos_embed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inputs(model: SiT, batch: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, model.in_channels, model.input_size, model.input_size)
    x = torch.randn(shape, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return x, t, y


# ----- sizes (REPAE-10.5 in docs/reference-facts.md) -----
def test_xl_parameter_counts_match_the_spec():
    with torch.device("meta"):
        with_proj = build_sit("SiT-XL/2", input_size=32, in_channels=4, z_dims=(768,))
        xl1 = build_sit("SiT-XL/1", input_size=16, in_channels=32, z_dims=())
    assert n_params(with_proj) == 683_242_512
    assert n_params(with_proj) - n_params(with_proj.projectors) == 675_111_184
    assert n_params(with_proj.projectors) == 8_131_328
    assert n_params(xl1) == 675_148_064
    assert with_proj.num_tokens == xl1.num_tokens == 256


@pytest.mark.parametrize(
    ("arch", "trunk_millions", "projector"), [("SiT-L/2", 458.1, 7_869_184), ("SiT-B/2", 130.5, 7_344_896)]
)
def test_l_and_b_sizes(arch: str, trunk_millions: float, projector: int):
    with torch.device("meta"):
        model = build_sit(arch, input_size=32, in_channels=4, z_dims=(768,))
    assert n_params(model.projectors) == projector
    assert round((n_params(model) - projector) / 1e6, 1) == trunk_millions


def test_registry_and_errors():
    assert len(SIT_ARCHS) == 16 and SIT_ARCHS["SiT-XL/2"]["hidden_size"] == 1152
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_sit("SiT-XXL/2", input_size=32, in_channels=4)
    for depth in (0, TINY["depth"] + 1):
        with pytest.raises(ValueError, match="encoder_depth"):
            tiny(encoder_depth=depth)
    model = tiny()
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 4, 8, 6), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_sit_s_builds_and_runs():
    """The reference built a 768-wide final layer against SiT-S's 384-wide trunk (reference defect REPAE-D6)."""
    with torch.device("meta"):
        model = build_sit("SiT-S/2", input_size=32, in_channels=4, z_dims=(384,))
        out = model(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert model.final_layer.linear.weight.shape == (2 * 2 * 4, 384)
    assert out.output.shape == (2, 4, 32, 32) and out.zs_tilde[0].shape == (2, 256, 384)


# ----- state-dict layout (REPAE-2.8) -----
def expected_keys(depth: int, n_proj: int, qk_norm: bool) -> set[str]:
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    keys |= {f"final_layer.{m}.{p}" for m in ("linear", "adaLN_modulation.1") for p in ("weight", "bias")}
    keys |= {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    block_mods = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    block_mods += ["attn.q_norm", "attn.k_norm"] if qk_norm else []
    keys |= {f"blocks.{i}.{m}.{p}" for i in range(depth) for m in block_mods for p in ("weight", "bias")}
    keys |= {f"projectors.{k}.{j}.{p}" for k in range(n_proj) for j in (0, 2, 4) for p in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_keys_equal_the_reference_layout(qk_norm: bool):
    model = tiny(qk_norm=qk_norm)
    state = model.state_dict()
    assert set(state) == expected_keys(TINY["depth"], 2, qk_norm)
    assert state["y_embedder.embedding_table.weight"].shape == (11, 32)  # null row = num_classes
    assert state["blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 4, 32)
    assert state["bn.num_batches_tracked"].dtype == torch.int64
    if qk_norm:
        assert state["blocks.1.attn.q_norm.weight"].shape == (16,)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tiny(qk_norm=qk_norm))
    assert set(synced.state_dict()) == set(state)
    assert tiny(class_dropout_prob=0.0).y_embedder.embedding_table.weight.shape == (10, 32)


# ----- embeddings -----
def test_pos_embed_is_fixed_and_column_first():
    model = tiny(hidden_size=32, input_size=8, patch_size=2)  # 4x4 grid
    pe = model.pos_embed
    assert not pe.requires_grad and pe.shape == (1, 16, 32)
    d4 = 8
    omega = 1 / 10000 ** (torch.arange(d4, dtype=torch.float64) / d4)
    for row, col in [(0, 3), (2, 1), (3, 2)]:
        token = pe[0, row * 4 + col].double()
        expected = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
        torch.testing.assert_close(token, expected, atol=1e-6, rtol=0)
    assert pe[0, 1, 0].item() == pytest.approx(math.sin(1.0))  # token 1 = (row 0, col 1): column first
    assert pe[0, 1, 16].item() == 0.0  # sin(row 0)
    torch.testing.assert_close(sincos_2d(32, 4).unsqueeze(0), pe.detach())


def test_timestep_features_are_cos_first_on_unscaled_t():
    feats = timestep_frequencies(torch.tensor([0.5, 1.0]))
    assert feats.shape == (2, 256)
    assert feats[0, 0].item() == pytest.approx(math.cos(0.5)) and feats[0, 128].item() == pytest.approx(math.sin(0.5))
    f1 = math.exp(-math.log(10000) / 128)
    assert feats[1, 1].item() == pytest.approx(math.cos(f1)) and feats[1, 129].item() == pytest.approx(math.sin(f1))


def test_label_dropout_only_in_train_mode_and_forced_drops_override():
    model = tiny(class_dropout_prob=0.5)
    labels = torch.randint(0, 10, (4000,))
    torch.manual_seed(0)
    model.train()
    dropped = model.y_embedder.drop(labels, None) == model.null_class
    assert 0.45 < dropped.float().mean().item() < 0.55
    model.eval()
    assert torch.equal(model.y_embedder.drop(labels, None), labels)
    force = torch.tensor([1, 0, 1, 0])
    assert model.y_embedder.drop(labels[:4], force).tolist() == [10, labels[1].item(), 10, labels[3].item()]
    model.train()
    assert model.y_embedder.drop(labels[:4], torch.zeros(4)).tolist() == labels[:4].tolist()


# ----- forward -----
def test_output_is_exactly_zero_at_init():
    model = tiny().eval()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.output.shape == x.shape and torch.count_nonzero(out.output) == 0
    assert [z.shape for z in out.zs_tilde] == [(3, 16, 16), (3, 16, 8)]
    assert all(z.abs().sum() > 0 for z in out.zs_tilde)
    noise = torch.randn_like(x)
    _, target = interpolate(x, noise, t)
    torch.testing.assert_close(denoising_loss(out.output, target), (noise - x).square().mean(dim=(1, 2, 3)))


def test_align_only_stops_after_encoder_depth():
    model = randomize(tiny()).eval()
    x, t, y = inputs(model)
    calls = []
    model.blocks[2].register_forward_hook(lambda *_: calls.append("block3"))
    model.final_layer.register_forward_hook(lambda *_: calls.append("final"))
    aligned = model(x, t, y, align_only=True)
    assert aligned.output is None and calls == []
    assert [z.shape for z in aligned.zs_tilde] == [(3, 16, 16), (3, 16, 8)]
    full = model(x, t, y)
    assert calls == ["block3", "final"] and full.output.abs().sum() > 0
    for a, b in zip(aligned.zs_tilde, full.zs_tilde):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_time_shapes_and_attention_kernels_agree():
    model = randomize(tiny()).eval()
    x, t, y = inputs(model)
    ref = model(x, t, y).output
    torch.testing.assert_close(model(x, t.view(-1, 1, 1, 1), y).output, ref, atol=0, rtol=0)
    torch.testing.assert_close(model(x, 0.3, y).output, model(x, torch.full((3,), 0.3), y).output)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(model(x, t, y).output, ref, atol=1e-5, rtol=1e-5)


def test_unpatchify_inverts_row_major_patch_tokens():
    model = tiny()
    x = torch.randn(2, 4, 8, 8)
    g, p = 4, 2
    tokens = x.reshape(2, 4, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 4)
    torch.testing.assert_close(model.unpatchify(tokens), x, atol=0, rtol=0)


# ----- BatchNorm latent normaliser (REPAE-10.8, REPAE-10.9, REPAE-10.18) -----
def test_init_bn_round_trip_and_eval_formula():
    model = tiny().eval()
    scale = torch.tensor([0.18, 1.5, 0.9, 4.0])
    bias = torch.tensor([0.1, -0.3, 0.0, 2.0])
    model.init_bn(scale.view(1, 4, 1, 1), bias.view(1, 4, 1, 1))
    got_scale, got_bias = model.latents_stats()
    torch.testing.assert_close(got_scale, scale, atol=0, rtol=1e-6)
    torch.testing.assert_close(got_bias, bias, atol=0, rtol=0)
    z = torch.randn(5, 4, 8, 8) * 3
    expected = (z - bias.view(1, 4, 1, 1)) * scale.view(1, 4, 1, 1)
    torch.testing.assert_close(model.normalize(z), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.denormalize(model.normalize(z)), z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="4 entries"):
        model.init_bn(torch.ones(3), torch.zeros(3))


def test_init_bn_clamps_tiny_variances():
    model = tiny().eval()
    model.init_bn(torch.full((4,), 1000.0), torch.zeros(4))  # 1/scale^2 = 1e-6 < eps = 1e-4
    assert torch.equal(model.bn.running_var, torch.zeros(4))
    torch.testing.assert_close(model.latents_stats()[0], torch.full((4,), 100.0))


def test_bn_stats_frozen_in_eval_and_updated_in_train():
    model = tiny(bn_momentum=0.1)
    model.init_bn(torch.full((4,), 0.5), torch.full((4,), 1.0))
    before = (model.bn.running_mean.clone(), model.bn.running_var.clone())
    z = torch.randn(6, 4, 8, 8) * 2 + 3
    model.eval()
    model.normalize(z)
    assert torch.equal(model.bn.running_mean, before[0]) and torch.equal(model.bn.running_var, before[1])
    model.train()
    out = model.normalize(z)
    mean = z.mean(dim=(0, 2, 3))
    var_biased = z.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(out, (z - mean.view(1, 4, 1, 1)) / (var_biased.view(1, 4, 1, 1) + 1e-4).sqrt())
    torch.testing.assert_close(model.bn.running_mean, 0.9 * before[0] + 0.1 * mean)
    torch.testing.assert_close(model.bn.running_var, 0.9 * before[1] + 0.1 * z.var(dim=(0, 2, 3)))
    assert model.bn.num_batches_tracked.item() == 1


def test_repa_gradient_reaches_latents_through_frozen_eval_sit():
    """The VAE's alignment pass: eval BN, SiT params frozen, gradient only into the latents."""
    model = tiny().eval().requires_grad_(False)
    model.init_bn(torch.full((4,), 0.7), torch.full((4,), 0.2))
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_n = model.normalize(z)
    x_t, _ = interpolate(x_n, torch.randn_like(x_n), torch.tensor([0.3, 0.8]))
    out = model(x_t, torch.tensor([0.3, 0.8]), torch.tensor([1, 2]), align_only=True)
    loss = sum(zt.square().mean() for zt in out.zs_tilde)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert model.bn.num_batches_tracked.item() == 0


# ----- reference checkpoint loading -----
def reference_checkpoint(path, model: SiT, ema: SiT, prefix: str = "") -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(*inputs(model)).output.sum().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", encoder_depth=8, proj_coeff=0.5, enc_type="dinov2-vit-b", qk_norm=False)
    torch.save(
        {
            "model": {prefix + k: v for k, v in model.state_dict().items()},
            "ema": {prefix + k: v for k, v in ema.state_dict().items()},
            "vae": {"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)},
            "discriminator": {"main.0.weight": torch.zeros(2, 3, 4, 4)},
            "opt": opt.state_dict(),
            "opt_vae": opt.state_dict(),
            "opt_disc": opt.state_dict(),
            "args": args,
            "steps": 400000,
        },
        path,
    )


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_load_reference_checkpoint_strictly(tmp_path, prefix: str):
    model, ema = randomize(tiny(), 1), randomize(tiny(), 2)
    ema.init_bn(torch.full((4,), 0.5), torch.full((4,), 0.1))
    path = tmp_path / "0400000.pt"
    reference_checkpoint(path, model, ema, prefix)
    fresh = tiny()
    fresh.load_state_dict(load_reference_sit(path), strict=True)
    for name, value in ema.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    fresh.load_state_dict(load_reference_sit(path, key="model"), strict=True)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    with pytest.raises(KeyError, match="top-level keys"):
        load_reference_sit(path, key="missing")


def test_load_safetensors(tmp_path):
    model = randomize(tiny(), 3)
    path = tmp_path / "sit.safetensors"
    save_file({"_orig_mod." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fresh = tiny()
    fresh.load_state_dict(load_reference_sit(path), strict=True)
    assert torch.equal(fresh.final_layer.linear.weight, model.final_layer.linear.weight)


# ----- transport (REPAE-2.7) -----
def test_linear_interpolant_hand_values():
    x0 = torch.full((2, 1, 2, 2), 2.0)
    eps = torch.full((2, 1, 2, 2), 5.0)
    x_t, v = interpolate(x0, eps, torch.tensor([0.25, 1.0]))
    assert x_t[0].unique().tolist() == [2.75] and x_t[1].unique().tolist() == [5.0]
    assert v.unique().tolist() == [3.0]


def test_cosine_interpolant_hand_values_and_derivative():
    x0 = torch.full((1, 3), 2.0, dtype=torch.float64)
    eps = torch.full((1, 3), 5.0, dtype=torch.float64)
    x_t, v = interpolate(x0, eps, torch.tensor([0.5]), path_type="cosine")
    r = math.sqrt(0.5)
    torch.testing.assert_close(x_t, torch.full((1, 3), 7 * r), atol=1e-6, rtol=0, check_dtype=False)
    torch.testing.assert_close(v, torch.full((1, 3), math.pi / 2 * r * 3), atol=1e-6, rtol=0, check_dtype=False)
    h = 1e-3  # the target is the time derivative of the path
    t = torch.tensor([0.3], dtype=torch.float64)
    a, b = interpolate(x0, eps, t + h, "cosine")[0], interpolate(x0, eps, t - h, "cosine")[0]
    torch.testing.assert_close((a - b) / (2 * h), interpolate(x0, eps, t, "cosine")[1], atol=1e-4, rtol=0)
    alpha, sigma, _, _ = path_coefficients(torch.tensor([0.0, 1.0]), "cosine")
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(sigma, torch.tensor([0.0, 1.0]), atol=1e-7, rtol=0)


def test_denoising_loss_is_per_sample_mean():
    out = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert denoising_loss(out, target).tolist() == [1.0, 4.0]


def test_uniform_time_is_reproducible():
    a = sample_time(1000, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1000,) and a.dtype == torch.float32
    assert torch.equal(a, sample_time(1000, generator=torch.Generator().manual_seed(0)))
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean().item() - 0.5) < 0.05


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_time(path_type: str):
    t = sample_time(20000, "lognormal", torch.Generator().manual_seed(1), path_type=path_type)
    assert 0 < t.min() and t.max() < 1
    n = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    expected = torch.sigmoid(n) if path_type == "linear" else torch.atan(n.exp()) * 2 / math.pi
    torch.testing.assert_close(t, expected)
    assert abs(t.median().item() - 0.5) < 0.02


def test_sample_time_validates_and_moves():
    assert sample_time(4, device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="weighting"):
        sample_time(4, "logit")
    with pytest.raises(ValueError, match="path_type"):
        interpolate(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), "vp")
