"""Flow-matching samplers for Wan 2.1 that reproduce diffusers' schedulers step for step.

Solvers:
  "unipc"  UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=S,
           solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
           final_sigmas_type="zero"), the scheduler Wan 2.1 ships with (S = 3.0 at 480p, 5.0 at 720p).
  "dpm++"  DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=S,
           algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero").
  "euler"  FlowMatchEulerDiscreteScheduler(shift=S).
  "distill", "distill_euler"
           lightx2v's step-distilled Wan samplers (WanStepDistillScheduler and Wan22StepDistillScheduler in
           lightx2v/models/schedulers/wan/step_distill/scheduler.py): a given list of training timesteps
           (`denoising_steps`, e.g. 1000 750 500 250), each step jumping to x0 and then re-noising ("distill") or
           moving along the velocity ("distill_euler") to the next sigma. Formulas below.

The host builds a `Schedule` once per (solver, steps, flow_shift[, denoising_steps]): the transformer timesteps
plus one row of float32 coefficients per step. On device, `step(schedule.coeffs[i], state, model_output, sample)`
is a single program for every solver and every step: the step order, the first step without corrector and the
lower-order final step are all encoded as coefficient values, so `jax.jit(step)` compiles once.

All three solvers are written as one linear multistep update in x0 form (x0 = sample - sigma * v for a
flow-prediction v):

  UniC corrector (UniPC only, from step 1 on):
      sample <- a_c * last_sample - b_c * x0_prev - g_c * (r_c0 * (x0_prev2 - x0_prev) * q_c + r_c1 * (x0 - x0_prev))
  predictor:
      prev   =  a_p * sample + e_p * v - b_p * x0 - g_p * (x0_prev - x0) * q_p  [+ n_p * noise]

The distill solvers (t_k, k = 0..K-1, the training timesteps in `denoising_steps`; N = 1000 training steps):
  sigma_k = S s_k / (1 + (S - 1) s_k) with s_k = linspace(1, 0, N + 1)[N - t_k], sigma_K = 0; the transformer
  gets sigma_k x N as its timestep. Each step predicts x0 = x - sigma_k v, then
      "distill"        x' = (1 - sigma_{k+1}) x0 + sigma_{k+1} n   (a_p = e_p = 0, b_p = -(1 - sigma'), n_p = sigma')
      "distill_euler"  x' = x0 + sigma_{k+1} v                     (a_p = 0, e_p = sigma', b_p = -1)
  n ~ N(0, 1) fresh per step, drawn by the caller (tpu_wan.run.sweep.NoiseStream); the last step returns x0. The
  sigmas and timesteps are computed in float64 and rounded to float32 once (lightx2v evaluates them in float32
  torch ops, which can differ by an ulp). Only the "distill" step takes the noise input: `step(..., noise=None)`
  traces the other solvers' programs exactly as before.

Accuracy. Scalar coefficients are evaluated in float32 in diffusers' operation order (diffusers computes them
with float32 torch scalars) and the tensor expressions keep diffusers' association. What remains:
  * log: torch's float32 log is not correctly rounded (MKL/SLEEF) and cannot be reproduced portably; we use
    the correctly rounded value, which differs from torch's by 1 ulp for a few percent of inputs. UniPC's
    corrector weights (rhos_c) come from a cancelling float32 formula that turns such a 1-ulp difference into
    a ~1e-4 relative change of rhos_c, i.e. a ~1e-7 relative change of the sample when the model's x0
    predictions vary a lot between steps.
  * divisions by scalars are stored as reciprocals (XLA rewrites x / c as x * (1 / c) anyway), where torch
    divides: at most 1 ulp per element of a history difference.
  * XLA fuses a * b + c into FMAs; torch rounds twice.
Measured against diffusers: Euler bit-exact; DPM-Solver++ and UniPC within ~1e-6 relative after 50 steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tpu_wan.core.config import DISTILL_SOLVERS, SOLVERS

# Column layout of Schedule.coeffs.
SIGMA = 0  # sigma_t of the current step: x0 = sample - SIGMA * v
USE_C = 1  # 1.0 where the UniC corrector runs, else 0.0
C_A, C_B, C_G, C_R0, C_R1, C_Q = 2, 3, 4, 5, 6, 7  # corrector weights (see module docstring)
P_A, P_V, P_B, P_G, P_Q = 8, 9, 10, 11, 12  # predictor weights (see module docstring)
P_N = 13  # weight of the fresh noise ("distill" only; 0 in every other solver's rows)
NUM_COEFFS = 14
# The solvers that reproduce a diffusers scheduler, and the step-distilled ones that take a list of timesteps.
DIFFUSERS_SOLVERS = tuple(s for s in SOLVERS if s not in DISTILL_SOLVERS)
NOISE_SOLVERS = ("distill",)  # the solvers whose step takes fresh noise

_F = np.float32


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Host-side sampling schedule.

    timesteps: [K] float32, the values diffusers passes to the transformer (whole numbers for unipc/dpm++, where
        diffusers stores them as int64; fractional float32 for euler; sigma x 1000 for the distill solvers).
    sigmas: [K + 1] float32 flow sigmas, the last one 0.
    coeffs: [K, NUM_COEFFS] float32, row i is the `coeffs_i` argument of `step` at step i.
    denoising_steps: the distill solvers' training timesteps (None for the others).
    """

    solver: str
    num_inference_steps: int
    flow_shift: float
    timesteps: np.ndarray
    sigmas: np.ndarray
    coeffs: np.ndarray
    denoising_steps: tuple[int, ...] | None = None

    @property
    def takes_noise(self) -> bool:
        """Whether `step` takes a `noise` input at every step ("distill"; zeros where the row does not re-noise)."""
        return self.solver in NOISE_SOLVERS

    def renoises(self, i: int) -> bool:
        """Whether step i mixes in fresh noise (every "distill" step but the last)."""
        return bool(self.coeffs[i, P_N] != 0)


@struct.dataclass
class SolverState:
    """What the multistep solvers carry between steps; all [B, C, F, H, W] float32."""

    last_sample: jax.Array  # sample the previous predictor started from (after its correction)
    x0_prev: jax.Array  # x0 prediction of the previous step
    x0_prev2: jax.Array  # x0 prediction two steps back


def init_state(latents: jax.Array) -> SolverState:
    """Empty solver state for latents of shape [B, C, F, H, W]."""
    zeros = jnp.zeros(latents.shape, jnp.float32)
    return SolverState(last_sample=zeros, x0_prev=zeros, x0_prev2=zeros)


def step(
    coeffs_i: jax.Array, state: SolverState, model_output: jax.Array, sample: jax.Array, noise: jax.Array | None = None
) -> tuple[jax.Array, SolverState]:
    """One denoising step: (flow prediction v at `sample`, schedule row i) -> (sample at step i + 1, new state).

    `model_output` is the transformer's prediction after classifier-free guidance. `noise` [B, C, F, H, W]: fresh
    N(0, 1) for the schedules that take it (Schedule.takes_noise), else None (no input, no term). Computes in
    float32 and returns a float32 sample.
    """
    c = jnp.asarray(coeffs_i, jnp.float32)
    v = model_output.astype(jnp.float32)
    sample = sample.astype(jnp.float32)
    x0 = sample - c[SIGMA] * v

    # UniC corrector. On rows without it every weight is 0, so `corrected` stays finite; the select keeps
    # `sample` bit-exact.
    d_hist = (state.x0_prev2 - state.x0_prev) * c[C_Q]
    corrected = (
        c[C_A] * state.last_sample
        - c[C_B] * state.x0_prev
        - c[C_G] * (c[C_R0] * d_hist + c[C_R1] * (x0 - state.x0_prev))
    )
    sample = jnp.where(c[USE_C] > 0.5, corrected, sample)

    # Predictor. First-order rows have g_p = q_p = 0: the history term adds an exact zero.
    d_prev = (state.x0_prev - x0) * c[P_Q]
    prev_sample = c[P_A] * sample + c[P_V] * v - c[P_B] * x0 - c[P_G] * d_prev
    if noise is not None:  # "distill": re-noise x0 to the next sigma (the other weights make the rest (1 - sigma') x0)
        prev_sample = prev_sample + c[P_N] * noise.astype(jnp.float32)
    return prev_sample, SolverState(last_sample=sample, x0_prev=x0, x0_prev2=state.x0_prev)


# ----------------------------------------------------------------------------------------------------------
# Host side: schedules and per-step coefficients.


def _log(x: np.float32) -> np.float32:
    # Correctly rounded float32 log. torch's float32 log (MKL VML on x86) is within 1 ulp of it and agrees
    # more often than numpy's float32 log does (~92% vs ~78% of inputs).
    with np.errstate(divide="ignore"):
        return _F(np.log(np.float64(x)))


def _expm1(x: np.float32) -> np.float32:
    return _F(np.expm1(np.float64(x)))


def _exp(x: np.float32) -> np.float32:
    return _F(np.exp(np.float64(x)))


def _lambda(sigma: np.float32) -> np.float32:
    """Half log-SNR of a flow sigma (alpha = 1 - sigma), in float32; +inf at sigma = 0."""
    return _log(_F(1) - sigma) - _log(sigma)


def _flow_sigmas(solver: str, steps: int, shift: float, num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [K] float32, sigmas [K + 1] float32) exactly as diffusers' set_timesteps builds them."""

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    if solver == "unipc":
        s = shifted(np.linspace(1, 1 / num_train, steps + 1)[:-1])  # float64
        if abs(s[0] - 1) < 1e-6:
            s[0] -= 1e-6  # diffusers keeps log(alpha) finite at sigma = 1
        timesteps = (s * num_train).astype(np.int64)  # truncation, not rounding
    elif solver == "dpm++":
        s = np.flip(shifted(1.0 - np.linspace(1, 1 / num_train, steps + 1)))[:-1].copy()
        timesteps = (s * num_train).astype(np.int64)
    else:
        # FlowMatchEulerDiscreteScheduler.__init__ shifts its float32 training sigmas; set_timesteps spaces the
        # inference steps between the shifted extremes and then shifts them a second time (diffusers' behaviour).
        train = np.linspace(1, num_train, num_train, dtype=np.float32)[::-1] / _F(num_train)
        train = _F(shift) * train / (_F(1) + _F(shift - 1) * train)
        s = shifted(np.linspace(float(train[0]) * num_train, float(train[-1]) * num_train, steps) / num_train)
        timesteps = s.astype(np.float32) * _F(num_train)
    sigmas = np.concatenate([s, [0.0]]).astype(np.float32)
    return timesteps.astype(np.float32), sigmas


def _orders(steps: int) -> list[int]:
    # solver_order=2 with warm-up and lower_order_final: first order on the first step (no history yet) and
    # on the last one (the step to sigma = 0); second order in between. Same rule in UniPC and DPM-Solver++.
    return [1 if i == 0 or i == steps - 1 else 2 for i in range(steps)]


def _solve_rhos(rk: np.float32, b1: np.float32, b2: np.float32) -> tuple[np.float32, np.float32]:
    """Solves [[1, 1], [rk, 1]] @ rho = [b1, b2] in float32 the way LAPACK's getrf/getrs do (partial
    pivoting, multiplying by reciprocal pivots), matching torch.linalg.solve (MKL) bit for bit."""
    one = _F(1)
    if abs(rk) > one:  # the pivot swaps the two rows
        lower = one / rk
        x1 = (b1 - lower * b2) * (one / (one - lower))
        return (b2 - x1) * (one / rk), x1
    x1 = (b2 - rk * b1) * (one / (one - rk))
    return b1 - x1, x1


def _unipc_row(sig: np.ndarray, i: int, order: int, prev_order: int) -> np.ndarray:
    row = np.zeros(NUM_COEFFS, np.float32)
    row[SIGMA] = sig[i]

    # UniP predictor from sigma_i to sigma_{i+1} (multistep_uni_p_bh_update).
    sigma_t, sigma_s0 = sig[i + 1], sig[i]
    alpha_t = _F(1) - sigma_t
    h = _lambda(sigma_t) - _lambda(sigma_s0)  # +inf on the last step (sigma_t = 0)
    hh = -h
    h_phi_1 = b_h = _expm1(hh)  # bh2: B(h) = expm1(-h); -1 on the last step
    row[P_A] = sigma_t / sigma_s0  # 0 on the last step, which lands on x0
    row[P_B] = alpha_t * h_phi_1
    if order == 2:
        row[P_G] = alpha_t * b_h * _F(0.5)  # rhos_p = 0.5 for order 2
        rk = (_lambda(sig[i - 1]) - _lambda(sigma_s0)) / h
        row[P_Q] = _F(1) / rk  # diffusers divides by rk; see "Accuracy" above

    # UniC corrector of the sample the previous predictor produced (multistep_uni_c_bh_update), using the
    # previous step's order. Absent on step 0, where there is nothing to correct.
    if i > 0:
        sigma_t, sigma_s0 = sig[i], sig[i - 1]
        alpha_t = _F(1) - sigma_t
        h = _lambda(sigma_t) - _lambda(sigma_s0)
        hh = -h
        h_phi_1 = b_h = _expm1(hh)
        row[USE_C] = 1.0
        row[C_A] = sigma_t / sigma_s0
        row[C_B] = alpha_t * h_phi_1
        row[C_G] = alpha_t * b_h
        if prev_order == 1:
            row[C_R1] = 0.5
        else:
            # b1, b2 cancel catastrophically for small h (h_phi_k ~ -h/2, then ~ h/6): their float32 values
            # are only good to ~1e-4, so this mirrors diffusers' float32 steps rather than being accurate.
            rk = (_lambda(sig[i - 2]) - _lambda(sigma_s0)) / h
            h_phi_k = h_phi_1 / hh - _F(1)
            b1 = h_phi_k * _F(1) / b_h
            h_phi_k = h_phi_k / hh - _F(0.5)
            b2 = h_phi_k * _F(2) / b_h
            row[C_R0], row[C_R1] = _solve_rhos(rk, b1, b2)
            row[C_Q] = _F(1) / rk
    return row


def _dpm_row(sig: np.ndarray, i: int, order: int) -> np.ndarray:
    row = np.zeros(NUM_COEFFS, np.float32)
    row[SIGMA] = sig[i]
    sigma_t, sigma_s0 = sig[i + 1], sig[i]
    alpha_t = _F(1) - sigma_t
    lambda_s0 = _lambda(sigma_s0)
    h = _lambda(sigma_t) - lambda_s0
    # exp(-h) - 1 -> -1 on the last step, where sigma_t = 0 and the update returns x0.
    row[P_A] = sigma_t / sigma_s0
    row[P_B] = alpha_t * (_exp(-h) - _F(1))
    if order == 2:
        # midpoint: - 0.5 * b * D1 with D1 = (1 / r0) * (x0 - x0_prev) = (x0_prev - x0) * (-1 / r0)
        r0 = (lambda_s0 - _lambda(sig[i - 1])) / h
        row[P_G] = _F(0.5) * row[P_B]
        row[P_Q] = -(_F(1) / r0)
    return row


def _euler_row(sig: np.ndarray, i: int) -> np.ndarray:
    row = np.zeros(NUM_COEFFS, np.float32)
    row[SIGMA] = sig[i]
    row[P_A] = 1.0
    row[P_V] = sig[i + 1] - sig[i]  # prev = sample + dt * v
    return row


def _distill_sigmas(denoising_steps: tuple[int, ...], shift: float, num_train: int) -> np.ndarray:
    """[K + 1] float64 sigmas of lightx2v's step-distill schedulers (set_denoising_timesteps), the last one 0."""
    s = np.linspace(1.0, 0.0, num_train + 1)[[num_train - t for t in denoising_steps]]
    return np.concatenate([shift * s / (1 + (shift - 1) * s), [0.0]])


def _distill_row(sig: np.ndarray, i: int, solver: str) -> np.ndarray:
    """Row i from the float64 sigmas, each weight rounded to float32 once."""
    row = np.zeros(NUM_COEFFS, np.float64)
    row[SIGMA] = sig[i]  # x0 = sample - sigma v
    nxt = sig[i + 1]
    if solver == "distill":  # x' = (1 - sigma') x0 + sigma' n; the last step (sigma' = 0) returns x0
        row[P_B], row[P_N] = -(1.0 - nxt), nxt
    else:  # distill_euler: x' = x0 + sigma' v
        row[P_B], row[P_V] = -1.0, nxt
    return row.astype(np.float32)


def _check_denoising_steps(solver: str, num_inference_steps, denoising_steps, num_train: int) -> None:
    if solver not in DISTILL_SOLVERS:
        if denoising_steps is not None:
            raise ValueError(f"denoising_steps: expected a distill solver {DISTILL_SOLVERS}, found {solver!r}")
        return
    steps = list(denoising_steps or [])
    whole = all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in steps)
    if not steps or not whole or not all(1 <= t <= num_train for t in steps) or any(
            a <= b for a, b in zip(steps, steps[1:])):
        raise ValueError(f"denoising_steps: expected strictly decreasing whole numbers in 1..{num_train}, found "
                         f"{denoising_steps!r}")
    if num_inference_steps != len(steps):
        raise ValueError(f"num_inference_steps: expected {len(steps)} (the length of denoising_steps), found "
                         f"{num_inference_steps}")


def make_schedule(
    solver: str, num_inference_steps: int, flow_shift: float, num_train_timesteps: int = 1000, *,
    denoising_steps: tuple[int, ...] | None = None,
) -> Schedule:
    """Timesteps, sigmas and per-step coefficients of `solver` for `num_inference_steps` steps. The distill
    solvers take their training timesteps as `denoising_steps` (num_inference_steps is its length)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, found {solver!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int >= 1, found {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, found {num_inference_steps}")
    if not np.isfinite(flow_shift) or flow_shift <= 0:
        raise ValueError(f"flow_shift must be a finite number > 0, found {flow_shift!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, found {num_train_timesteps}")

    _check_denoising_steps(solver, num_inference_steps, denoising_steps, num_train_timesteps)

    steps = int(num_inference_steps)
    if solver in DISTILL_SOLVERS:
        denoising_steps = tuple(int(t) for t in denoising_steps)
        sig = _distill_sigmas(denoising_steps, float(flow_shift), num_train_timesteps)  # float64
        timesteps, sigmas = (sig[:-1] * num_train_timesteps).astype(np.float32), sig.astype(np.float32)
        rows = [_distill_row(sig, i, solver) for i in range(steps)]
    else:
        timesteps, sigmas = _flow_sigmas(solver, steps, float(flow_shift), num_train_timesteps)
        orders = _orders(steps)
        if solver == "unipc":
            rows = [_unipc_row(sigmas, i, orders[i], orders[i - 1] if i else 0) for i in range(steps)]
        elif solver == "dpm++":
            rows = [_dpm_row(sigmas, i, orders[i]) for i in range(steps)]
        else:
            rows = [_euler_row(sigmas, i) for i in range(steps)]
    coeffs = np.stack(rows).astype(np.float32)
    for a in (timesteps, sigmas, coeffs):
        a.flags.writeable = False
    return Schedule(solver, steps, float(flow_shift), timesteps, sigmas, coeffs, denoising_steps)


def expert_steps(timesteps: np.ndarray, boundary_timestep: float | None, experts: tuple[str, ...]) -> tuple[str, ...]:
    """The expert of each step as diffusers' WanPipeline picks it: experts[0] (high noise) while t >= the boundary
    timestep, then experts[1]. torch compares the timestep tensor (int64 or float32) with the Python float in
    float32, so both sides are rounded to float32 here too."""
    if boundary_timestep is None or len(experts) == 1:
        return (experts[0],) * len(timesteps)
    boundary = np.float32(boundary_timestep)
    return tuple(experts[0] if np.float32(t) >= boundary else experts[1] for t in timesteps)
