"""Several processes, one mesh: JAX's multi-controller runtime (jax.distributed).

Every process runs the same script with the same flags; together their devices form the mesh. Each process
loads only the weight slices its own devices hold (tpu_wan.loading) and runs the same compiled programs;
results come back to every process through `to_host`. Only process 0 writes files and prints progress.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from tpu_wan.errors import UsageError, UserError

log = logging.getLogger("tpu_wan")


def tpu_pod_detected() -> bool:
    """True where the TPU environment lists several hosts (GKE, queued resources, multislice); there
    jax.distributed.initialize() finds its peers by itself. Elsewhere (e.g. a TPU VM slice whose hosts are only
    in the metadata server) pass --distributed."""
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def check_flags(distributed: bool, coordinator_address: str | None, num_processes: int | None,
                process_id: int | None) -> bool:
    """Whether to start the multi-process runtime for these flags; refuses incomplete or inconsistent ones."""

    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise UsageError("--coordinator_address, --num_processes and --process_id: expected all three or none, "
                         f"found {sum(given)} of them")
    if all(given):
        if num_processes < 1:
            raise UsageError(f"--num_processes must be >= 1, found {num_processes}")
        if not 0 <= process_id < num_processes:
            raise UsageError(f"--process_id must be in [0, {num_processes}), found {process_id}")
        if ":" not in coordinator_address:
            raise UsageError(f"--coordinator_address: expected host:port, found {coordinator_address!r}")
    return distributed or all(given) or tpu_pod_detected()


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize, then quiet the processes other than 0 (no progress bars, no writes)."""
    import jax

    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"jax.distributed.initialize: expected to reach the coordinator at "
                        f"{coordinator_address or '(auto-detected)'}, found: {' '.join(str(err).split())[:300]}"
                        ) from None
    if not is_primary():
        from tpu_wan import artifacts

        artifacts.disable_writes()
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("tpu_wan").setLevel(logging.ERROR)
    log.info("process %d of %d: %d of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Process 0 (or the only process): the one that writes files and shows progress."""
    import jax

    return jax.process_index() == 0


def progress(iterable, *, show: bool = True, **tqdm_args):
    """A tqdm bar over `iterable`, shown only by process 0 and only when `show`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not show or not is_primary(), **tqdm_args)


def to_host(x) -> np.ndarray:
    """The whole of a (possibly multi-process) jax array as a numpy array, in every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
