"""Several processes, one mesh: JAX's multi-controller runtime (jax.distributed).

Every process runs the same script with the same flags; together their devices form the mesh. Each process
loads only the weight slices its own devices hold (tpu_wan.runtime.loading) and runs the same compiled programs;
results come back to every process through `to_host`. Only process 0 writes files and prints progress.

A lost process (killed, out of memory, its host gone) leaves the others blocked in a collective, or failing in
one. The coordination service, which process 0 hosts, counts a process as lost when its heartbeats stop; a
watchdog thread in every process asks the service which processes are alive, and ends a survivor with one line
naming the lost process and status LOST_PROCESS_STATUS, within HEARTBEAT_TIMEOUT_S of the loss. The service
runs in jax's recoverable mode: in its default mode it makes every survivor abort with a C++ stack trace
instead. Process 0 itself cannot be watched for: when it goes, the service goes with it, and jax's runtime
aborts the survivors at once (status 134).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import NoReturn

import numpy as np

from tpu_wan.core.errors import UsageError, UserError

log = logging.getLogger("tpu_wan")

# The service counts a process as lost once it has had no heartbeat from it for this long. Heartbeats come from a
# thread of jax's runtime (no Python, no GIL: a long compile or step does not delay them), about two per timeout
# (survivors end 10-21 s after a SIGKILL, measured), so only a host or network stalled for over 10 s trips it.
# jax's default, 100 s, kept the survivors blocked for a minute and a half.
HEARTBEAT_TIMEOUT_S = 20
# How often the watchdog asks which processes are alive. The answer comes once every live process has asked (or
# once the service has counted a silent one as lost): one small RPC per process per second.
LIVENESS_POLL_S = 1.0
# At exit every process waits until all have finished: a process that leaves earlier counts as lost, and process
# 0 must keep the service up while the others use it. The wait covers process 0's writes after the last
# collective and is as long as the end-of-run barrier of jax's default mode (which recoverable mode leaves out).
END_BARRIER_TIMEOUT_S = 300
# Then process 0 waits this long for the others to disconnect before its service goes (their exit is jax's
# clean-up: about a second). A process whose service vanishes under it aborts with a C++ stack trace: without this
# wait, 3 of 8 two-process runs that had succeeded ended so.
DISCONNECT_TIMEOUT_S = 30
# Exit status of a process whose run lost another one (2 and 3 are the UserError statuses, tpu_wan.core.entry): the
# input was fine, and a rerun may succeed.
LOST_PROCESS_STATUS = 4

_FINISHED_KEY = "tpu_wan/finished/"  # + process index, in the service's key-value store: passed the end barrier


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
    """jax.distributed.initialize, then quiet the processes other than 0 (no progress bars, no writes) and
    watch for lost processes (the module docstring)."""
    import jax

    jax.config.update("jax_enable_recoverability", True)  # a lost process is reported, not fatal to the others
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"jax.distributed.initialize: expected to reach the coordinator at "
                        f"{coordinator_address or '(auto-detected)'}, found: {' '.join(str(err).split())[:300]}"
                        ) from None
    if not is_primary():
        from tpu_wan.core import artifacts

        artifacts.disable_writes()
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("tpu_wan").setLevel(logging.ERROR)
    log.info("process %d of %d: %d of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed  # the runtime's client: jax 0.10 has no public handle

        _Watchdog(jax_distributed.global_state.client, jax.process_index(), jax.process_count()).start()


class _Watchdog:
    """Ends this process with one line when another one is lost, and holds it at exit until all have finished."""

    def __init__(self, client, index: int, count: int):
        self.client, self.index, self.count = client, index, count
        self.everyone = list(range(count))
        self.exiting = threading.Event()  # every process has finished: departures are expected from now on
        self.others_gone = threading.Event()
        self.rounds = threading.Condition()  # notified after each poll that found every process alive
        self.all_alive_polls = 0

    def start(self) -> None:
        threading.Thread(target=self._watch, name="tpu_wan-watchdog", daemon=True).start()
        atexit.register(self._finish)  # atexit runs the last registered first: before jax shuts its client down
        previous = sys.excepthook
        sys.excepthook = lambda *exc_info: self._excepthook(previous, *exc_info)

    def _watch(self) -> None:
        while True:
            try:
                live = self.client.get_live_nodes(self.everyone)
            except Exception as err:  # noqa: BLE001  (jax's runtime errors)
                if self.exiting.is_set():
                    return  # this process's own client is shutting down
                # Process 0 hosts the service: no answer means it is gone.
                self._lost([0], f"its coordination service does not answer: {str(err).splitlines()[0][:200]}")
            gone = [i for i in self.everyone if i not in live]
            lost = [i for i in gone if not self._finished(i)]
            if lost and not self.exiting.is_set():
                self._lost(lost, f"left before the end of the run, or sent no heartbeat for {HEARTBEAT_TIMEOUT_S} s")
            if len(gone) == self.count - 1:
                self.others_gone.set()
            if not gone:
                with self.rounds:
                    self.all_alive_polls += 1
                    self.rounds.notify_all()
            time.sleep(LIVENESS_POLL_S)

    def _finished(self, index: int) -> bool:
        try:
            self.client.key_value_try_get(f"{_FINISHED_KEY}{index}")
            return True
        except Exception:  # noqa: BLE001  (NOT_FOUND comes as a runtime error)
            return False

    def _lost(self, lost: list[int], why: str) -> NoReturn:
        """One line, then end now: the main thread may be blocked in a collective that never completes, so no
        clean-up can run (and none is needed: artifacts are written whole or not at all)."""
        who = " and ".join(f"process {i}" for i in lost)
        try:
            _close_progress_bars()  # the line then starts on a line of its own
            print(f"{os.path.basename(sys.argv[0])}: error: {who} of {self.count} stopped responding ({why}); the "
                  f"run cannot go on without {'it' if len(lost) == 1 else 'them'}", file=sys.stderr, flush=True)
        finally:  # even where stderr is gone
            os._exit(LOST_PROCESS_STATUS)

    def _wait_for_verdict(self) -> None:
        """Returns once two more polls have found every process alive (the first may have been under way, counting
        a process that asked just before it died); if one is lost, the watchdog ends the process meanwhile, within
        HEARTBEAT_TIMEOUT_S of the loss."""
        with self.rounds:
            target = self.all_alive_polls + 2
            self.rounds.wait_for(lambda: self.all_alive_polls >= target,
                                 timeout=HEARTBEAT_TIMEOUT_S + 5 * LIVENESS_POLL_S)

    def _excepthook(self, previous, kind, value, traceback) -> None:
        """A collective whose peer is gone may fail at once (gloo: "Connection reset by peer"), before the service
        counts the peer as lost: the loss is the one line to show, and the traceback only if there is none."""
        if issubclass(kind, Exception):
            self._wait_for_verdict()
        previous(kind, value, traceback)

    def _finish(self) -> None:
        """At exit: wait until every process has finished, mark this one finished, and (process 0) let the
        others disconnect before the service goes."""
        try:
            self.client.wait_at_barrier("tpu_wan/end", END_BARRIER_TIMEOUT_S * 1000)
        except Exception:  # noqa: BLE001
            # One never came: it is lost (then the watchdog ends this process), or it is blocked in a collective
            # that waits for this one, which already said why it stopped.
            self._wait_for_verdict()
            self.exiting.set()
            return
        self.client.key_value_set(f"{_FINISHED_KEY}{self.index}", "1")
        self.exiting.set()
        if self.index == 0:
            self.others_gone.wait(DISCONNECT_TIMEOUT_S)


def _close_progress_bars() -> None:
    """Closes the bars on screen (tpu_wan.runtime.distributed.progress): a bar left open would share the next line."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


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
