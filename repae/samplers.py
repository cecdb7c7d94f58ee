"""ODE (Euler / Heun) and SDE (Euler-Maruyama) samplers for the class-conditional SiT (REPAE-7.1 to REPAE-7.3).

Conventions: t in [0,1] with t=1 pure noise; ``velocity(x, t, y)`` returns the predicted velocity
of normalised latents, ``t`` has one entry per row. Both samplers keep their state in float64 (as
the reference does) but call the model in the dtype of ``noise``, so a float32 model never sees
float64 inputs; the result is returned in ``noise``'s dtype.

Classifier-free guidance uses the reference's guidance interval (docs/reference-facts.md,
REPAE-7.3): at grid time t_i it is active iff ``cfg_scale > 1`` and
``guidance_low <= t_i <= guidance_high``; the batch is then doubled ([conditional; null label])
and ``uncond + scale * (cond - uncond)`` is taken over every channel.
The ODE guides the velocity, the SDE guides the drift (after the score term), and a Heun
corrector reuses the decision taken at t_i even when t_{i+1} falls on the other side of a bound.

One addition over the reference: ``euler_maruyama_sampler`` accepts a *list* of generators, one
per row, so the generation CLI can make every image depend only on its own seed (not on which
other images shared its batch, nor on the batch size or the number of processes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from repae.transport import PATH_TYPES, path_coefficients

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
MODES = ("ode", "sde")
SDE_LAST_TIME = 0.04  # the SDE grid runs 1 -> 0.04 with noise, then one deterministic step to 0


# ----------------------------------------------------------------------------------- time grids
def ode_time_grid(num_steps: int) -> torch.Tensor:
    """(N+1,) float64 grid from 1 to 0: ``torch.linspace(1, 0, N + 1)``, the reference's grid bit for bit.

    ``1 - i/N`` is the same grid on paper but differs by one ulp at many points, and a CFG interval
    bound that falls on a grid point (N = 50, guidance_low = 0.2) then flips that step in or out
    of guidance: sampled latents moved by up to 4.6e-2 against the reference.
    """
    _check_steps(num_steps)
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


def sde_time_grid(num_steps: int) -> torch.Tensor:
    """(N+1,) float64 grid: N points linearly from 1 to 0.04, then a final 0.

    N-1 noisy Euler-Maruyama intervals and one deterministic last interval 0.04 -> 0.
    """
    _check_steps(num_steps)
    grid = torch.linspace(1.0, SDE_LAST_TIME, num_steps, dtype=torch.float64)
    return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def expected_nfe(mode: str, num_steps: int, heun: bool = False) -> int:
    """Model evaluations of one sampling run: N (Euler, SDE) or 2N-1 (Heun). CFG doubles the batch, not this."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return 2 * num_steps - 1 if (mode == "ode" and heun) else num_steps


def _check_steps(num_steps: int) -> None:
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


# ------------------------------------------------------------------------------------------ CFG
def guidance_active(t: float, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    """The reference's switch: guidance iff scale > 1 and low <= t <= high (t=1 is noise)."""
    return cfg_scale > 1.0 and guidance_low <= float(t) <= guidance_high


def _guided(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: float,
    labels: torch.Tensor,
    null_label: int,
    cfg_scale: float,
    use_cfg: bool,
) -> torch.Tensor:
    """Evaluate ``fn(x, t_batch, y)`` once, on a [cond; null] doubled batch when ``use_cfg``.

    ``fn`` may be the velocity itself (ODE) or a drift built from it (SDE): guidance is applied to
    whatever ``fn`` returns, which is how the SDE ends up guiding the drift.
    """
    if not use_cfg:
        return fn(x, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device), labels)
    x2 = torch.cat([x, x])
    y2 = torch.cat([labels, torch.full_like(labels, null_label)])
    out = fn(x2, torch.full((x2.shape[0],), t, dtype=torch.float64, device=x.device), y2)
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _model_call(velocity: VelocityFn, model_dtype: torch.dtype) -> Callable:
    """Wrap ``velocity`` so it sees ``model_dtype`` inputs and hands float64 back to the float64 state."""

    def call(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return velocity(x.to(model_dtype), t.to(model_dtype), y).to(torch.float64)

    return call


# ------------------------------------------------------------------------------------------ ODE
@torch.no_grad()
def euler_sampler(
    velocity: VelocityFn,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int = 50,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int,
) -> torch.Tensor:
    """Integrate dx/dt = v from t=1 (``noise``) to t=0 on the grid t_i = 1 - i/N (REPAE-7.1; :func:`ode_time_grid`).

    Euler: x <- x + (t_{i+1} - t_i) v(x, t_i). Heun adds, on every step but the last (whose end
    point t=0 the model never saw in training), a corrector v' at (x_Euler, t_{i+1}) and steps with
    (v + v')/2. NFE = N (Euler) or 2N-1 (Heun). The path type does not matter: the learned
    velocity field is integrated directly.
    """
    grid = ode_time_grid(num_steps).tolist()
    call = _model_call(velocity, noise.dtype)
    x = noise.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = grid[i], grid[i + 1]
        use_cfg = guidance_active(t_cur, cfg_scale, guidance_low, guidance_high)
        v = _guided(call, x, t_cur, labels, null_label, cfg_scale, use_cfg)
        x_euler = x + (t_next - t_cur) * v
        if heun and i < num_steps - 1:
            v_next = _guided(call, x_euler, t_next, labels, null_label, cfg_scale, use_cfg)
            x = x + (t_next - t_cur) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x.to(noise.dtype)


# ------------------------------------------------------------------------------------------ SDE
def sde_drift(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path_type: str = "linear") -> torch.Tensor:
    """Reverse-SDE drift d = v - w(t)/2 * score with w(t) = 2t, the score recovered from the velocity.

    With alpha, sigma and derivatives of the path: r = alpha/alpha', var = sigma^2 - r sigma' sigma,
    score = (r v - x)/var. Linear path: var = t, so d = v + (1-t) v + x = (2-t) v + x.
    Cosine path: var = 1 and r = -(2/pi) cot(pi t/2). ``t`` is (B,) and must be > 0.
    """
    t = t.to(dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path_type)
    ratio = alpha / d_alpha
    var = sigma.square() - ratio * d_sigma * sigma
    score = (ratio * v - x) / var
    return v - t * score  # w(t)/2 = t


def _draw_noise(shape: torch.Size, generator: Generators, device: torch.device) -> torch.Tensor:
    """float32 N(0, I) of ``shape``, drawn on the generator's device(s), returned on ``device``.

    A sequence of generators draws one row each (``len == shape[0]``), so a row's noise depends only
    on its own generator.
    """
    if generator is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"need one generator per row ({shape[0]}), got {len(generator)}")
    rows = [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32).to(device) for g in generator]
    return torch.stack(rows)


@torch.no_grad()
def euler_maruyama_sampler(
    velocity: VelocityFn,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int,
    generator: Generators = None,
    path_type: str = "linear",
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE from t=1 (``noise``) to 0 over ``sde_time_grid`` (REPAE-7.2).

    Intervals 0..N-2: x <- x + d dt + sqrt(w(t_i)) sqrt(|dt|) xi, xi ~ N(0, I) from ``generator``
    (one generator, or one per row). The last interval 0.04 -> 0 is deterministic: x + dt d. NFE = N.
    Guidance, when active at t_i, combines the conditional and unconditional *drifts*.
    """
    if path_type not in PATH_TYPES:
        raise ValueError(f"path_type must be one of {PATH_TYPES}, got {path_type!r}")
    grid = sde_time_grid(num_steps).tolist()
    call = _model_call(velocity, noise.dtype)

    def drift(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sde_drift(call(x, t, y), x, t, path_type)

    x = noise.to(torch.float64)
    for i in range(num_steps):
        t_cur, t_next = grid[i], grid[i + 1]
        use_cfg = guidance_active(t_cur, cfg_scale, guidance_low, guidance_high)
        d = _guided(drift, x, t_cur, labels, null_label, cfg_scale, use_cfg)
        dt = t_next - t_cur
        x = x + d * dt
        if i < num_steps - 1:
            xi = _draw_noise(x.shape, generator, x.device).to(torch.float64)
            x = x + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * xi
    return x.to(noise.dtype)


# ------------------------------------------------------------------------------------- dispatch
def run_sampler(
    velocity: VelocityFn,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: str,
    null_label: int,
    num_steps: int,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    generator: Generators = None,
) -> torch.Tensor:
    """One entry point for both samplers, keyed by ``mode`` ("ode" | "sde"); rejects Heun with the SDE."""
    common = dict(cfg_scale=cfg_scale, guidance_low=guidance_low, guidance_high=guidance_high, null_label=null_label)
    if mode == "ode":
        return euler_sampler(velocity, noise, labels, num_steps=num_steps, heun=heun, **common)
    if mode == "sde":
        if heun:
            raise ValueError("Heun's corrector is only defined for the ODE sampler (mode='ode')")
        return euler_maruyama_sampler(
            velocity, noise, labels, num_steps=num_steps, generator=generator, path_type=path_type, **common
        )
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
