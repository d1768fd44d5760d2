"""tpu_wan.sampling.schedulers against the diffusers schedulers it reproduces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import SCHEDULER_ATOL, SCHEDULER_RTOL, diffusers_scheduler

from tpu_wan.sampling import schedulers

SHAPE = (1, 16, 2, 4, 4)  # B, C, F, H, W


_jitted_step = jax.jit(schedulers.step)


def _fake_model(sample, noise):
    # Deterministic stand-in for the transformer: depends on the sample plus fresh per-step data.
    return 0.5 * sample + noise


@pytest.mark.parametrize("flow_shift", [1.0, 2.5, 7.3])
@pytest.mark.parametrize("steps", [1, 4, 7, 25, 30, 100])
@pytest.mark.parametrize("solver", schedulers.DIFFUSERS_SOLVERS)
def test_schedule_matches_diffusers(solver, steps, flow_shift):
    ref = diffusers_scheduler(solver, flow_shift)
    ref.set_timesteps(steps)
    sched = schedulers.make_schedule(solver, steps, flow_shift)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())
    assert sched.sigmas[-1] == 0


@pytest.mark.parametrize("flow_shift", [3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("solver", schedulers.DIFFUSERS_SOLVERS)
def test_matches_diffusers(solver, steps, flow_shift):
    ref = diffusers_scheduler(solver, flow_shift)
    ref.set_timesteps(steps)
    sched = schedulers.make_schedule(solver, steps, flow_shift)

    assert sched.timesteps.shape == (steps,) and sched.timesteps.dtype == np.float32
    assert sched.coeffs.shape == (steps, schedulers.NUM_COEFFS) and sched.coeffs.dtype == np.float32
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sched.sigmas, ref.sigmas.numpy())

    rng = np.random.default_rng(1234 + steps)
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    noises = rng.standard_normal((steps, *SHAPE), dtype=np.float32)

    ref_sample = torch.from_numpy(latents)
    sample = jnp.asarray(latents)
    state = schedulers.init_state(sample)
    for i, t in enumerate(ref.timesteps):
        ref_out = _fake_model(ref_sample, torch.from_numpy(noises[i]))
        ref_sample = ref.step(ref_out, t, ref_sample).prev_sample

        out = _fake_model(sample, jnp.asarray(noises[i]))
        sample, state = _jitted_step(jnp.asarray(sched.coeffs[i]), state, out, sample)

        ours, want = np.asarray(sample), ref_sample.numpy()
        assert ours.dtype == np.float32 and want.dtype == np.float32
        diff = ours.astype(np.float64) - want.astype(np.float64)
        rel = np.linalg.norm(diff) / np.linalg.norm(want.astype(np.float64))
        assert rel <= SCHEDULER_RTOL, f"{solver} T={steps} shift={flow_shift} step {i}: rel err {rel:.3e}"
        np.testing.assert_allclose(ours, want, rtol=SCHEDULER_RTOL, atol=SCHEDULER_ATOL)


@pytest.mark.parametrize("solver", schedulers.DIFFUSERS_SOLVERS)
def test_step_compiles_once(solver):
    sched = schedulers.make_schedule(solver, 10, 5.0)
    jitted = jax.jit(schedulers.step)
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32))
    state = schedulers.init_state(sample)
    for i in range(sched.num_inference_steps):
        out = _fake_model(sample, jnp.asarray(rng.standard_normal(SHAPE, dtype=np.float32)))
        sample, state = jitted(jnp.asarray(sched.coeffs[i]), state, out, sample)
    assert np.isfinite(np.asarray(sample)).all()
    assert jitted._cache_size() == 1


def test_lower_order_bookkeeping():
    # Second-order history terms only between the first and the last step; corrector from step 1 on.
    for solver in ("unipc", "dpm++"):
        c = schedulers.make_schedule(solver, 5, 3.0).coeffs
        np.testing.assert_array_equal(c[:, schedulers.P_G] != 0, [False, True, True, True, False])
        expected_corrector = [0, 1, 1, 1, 1] if solver == "unipc" else [0] * 5
        np.testing.assert_array_equal(c[:, schedulers.USE_C], expected_corrector)
    # The last step lands on x0: no sample term.
    assert schedulers.make_schedule("unipc", 3, 3.0).coeffs[-1, schedulers.P_A] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="foo"),
         "solver must be one of ('unipc', 'dpm++', 'euler', 'distill', 'distill_euler'), found 'foo'"),
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1, found 0"),
        (dict(num_inference_steps=-3), "num_inference_steps must be >= 1, found -3"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an int >= 1, found 2.5"),
        (dict(flow_shift=0.0), "flow_shift must be a finite number > 0, found 0.0"),
        (dict(flow_shift=-1.0), "flow_shift must be a finite number > 0, found -1.0"),
        (dict(flow_shift=float("nan")), "flow_shift must be a finite number > 0, found nan"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(solver="unipc", num_inference_steps=10, flow_shift=3.0) | kwargs
    with pytest.raises(ValueError) as info:
        schedulers.make_schedule(**args)
    assert str(info.value) == message
