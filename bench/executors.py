"""Executors: where jobs run. ``local`` runs them one at a time in this process; ``ray`` farms
them to one actor per device (models stay loaded across jobs) on a local or existing cluster.

Workers only compute: each returns the job's row to the driver, which is the single writer of
results, and writes the job's samples as a file into the job store's ``incoming/`` directory (a
file system the driver and every worker share), whose path the driver moves into the store: large
samples never travel as in-memory returns over Ray. Latency is measured inside the worker, on its own device, by ``run_job``;
the driver never times across the Ray boundary. Each row records the device, node, worker and
how many workers ran at once.
"""

from __future__ import annotations

import os
import platform
import socket
import time
import traceback
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from bench.allocator import keep_freed_memory
from bench.suite import Suite
from bench.worker import ModelCache, Outcome, Task, execute, worker_outcome

EXECUTORS = ("local", "ray")


class ExecutorError(RuntimeError):
    """An executor that cannot start (bad settings, unreachable cluster); the message names the fix."""


class Executor:
    """Base class: submit tasks while there are free slots, wait for outcomes, close."""

    kind: str = ""
    workers: int = 1
    device: str = "cpu"

    def start(self) -> None:
        """Bring the workers up (called only when there is work)."""

    def free_slots(self) -> int:
        raise NotImplementedError

    def running(self) -> int:
        raise NotImplementedError

    def submit(self, task: Task, suite: Suite) -> None:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        """Block until a submitted task has an outcome (or ``timeout`` seconds pass); return all that do."""
        raise NotImplementedError

    def node_workers(self, node_id: str) -> int:
        """How many workers run on node ``node_id`` (the concurrency its latencies were measured under)."""
        return self.workers

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "workers": self.workers, "device": self.device}

    def close(self) -> None:
        """Release the workers (and stop what this executor started)."""


class LocalExecutor(Executor):
    """One job at a time in this process, on ``device`` with this process's torch threads."""

    kind = "local"

    def __init__(self, device: str = "cpu", workers: int | None = None, threads: int | None = None) -> None:
        if workers not in (None, 1):
            raise ExecutorError(
                f"the local executor runs one job at a time in this process (asked for {workers} workers); "
                "use --executor ray --workers N to run jobs in parallel"
            )
        self._saved_threads = torch.get_num_threads()
        self._blas = None
        if threads is not None:
            self._blas = threadpool_limits(limits=threads)  # numpy's BLAS too (metrics use it)
            torch.set_num_threads(threads)
        self.device = device
        self.workers = 1
        self.progress = False  # a build's own progress bar (the driver sets it when it shows progress)
        self.models = ModelCache()
        self._queue: deque[tuple[Task, Suite]] = deque()
        self.info = {
            "node_id": f"local:{platform.node()}",
            "worker_id": f"pid:{os.getpid()}",
            "host": socket.gethostname(),
            "device": device,
            "threads": torch.get_num_threads(),
        }

    def free_slots(self) -> int:
        return 0 if self._queue else 1

    def running(self) -> int:
        return len(self._queue)

    def submit(self, task: Task, suite: Suite) -> None:
        self._queue.append((task, suite))

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        task, suite = self._queue.popleft()  # runs here and now: the timeout does not apply
        return [worker_outcome(task, lambda: execute(self.models, task, suite, self.device, self.progress), self.info)]

    def close(self) -> None:
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None
        torch.set_num_threads(self._saved_threads)


class RayWorker:
    """A Ray actor: one device, its models kept loaded across jobs (made remote by RayExecutor)."""

    def __init__(self, device: str, threads: int, env: dict[str, str]) -> None:
        import ray

        os.environ.update(env)
        keep_freed_memory()  # as the driver does (bench.allocator)
        threadpool_limits(limits=threads)  # numpy's BLAS too: its thread count changes metric sums
        torch.set_num_threads(threads)
        self.device = device
        self.models = ModelCache()
        ctx = ray.get_runtime_context()
        self.info = {
            "node_id": ctx.get_node_id(),
            "worker_id": ctx.get_actor_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": device if device == "cpu" else f"{device}:{torch.cuda.get_device_name(0)}",
            "threads": torch.get_num_threads(),
        }

    def ready(self) -> dict[str, Any]:
        return self.info

    def run(self, task: Task, suite: Suite) -> Outcome:
        return worker_outcome(task, lambda: execute(self.models, task, suite, self.device), self.info)


@contextmanager
def loopback_ray() -> Iterator[None]:
    """While starting a Ray that bench owns, make it advertise 127.0.0.1 and report no usage stats.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback
    address by the host's network address unless its single-machine mode is on
    (``ENABLE_RAY_CLUSTER`` off, the ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` setting, read by Ray
    when first imported, so the constant is set too). The processes started inherit it."""
    import ray._private.ray_constants as rc

    saved_env = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED")}
    saved_flag = rc.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rc.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        rc.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RayExecutor(Executor):
    """One actor per device on a Ray cluster: ``address`` (or ``$RAY_ADDRESS``) joins an existing
    cluster; without either, a local Ray is started on loopback and stopped on close.

    GPU actors ask for ``num_gpus=1``; CPU actors for ``num_cpus=threads`` and set torch to that
    many threads. An actor that dies is replaced; its task comes back as ``lost_worker``."""

    kind = "ray"

    def __init__(
        self, device: str = "auto", workers: int | None = None, threads: int | None = None, address: str | None = None
    ) -> None:
        if workers is not None and workers < 1:
            raise ExecutorError(f"--workers must be at least 1, got {workers}")
        if threads is not None and threads < 1:
            raise ExecutorError(f"--threads must be at least 1, got {threads}")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.requested_device = device
        self.requested_workers = workers
        self.threads = threads or 1
        self.device = "cpu" if device == "auto" else device
        self.workers = workers or 1
        self._started_ray = False
        self._connected = False
        self._idle: list[Any] = []
        self._in_flight: dict[Any, tuple[Any, Task]] = {}
        self._infos: dict[Any, dict[str, Any]] = {}
        self._remote: Any = None
        self.nodes: list[str] = []
        self.startup_s = 0.0

    def start(self) -> None:
        t0 = time.perf_counter()
        try:
            import ray
        except ImportError as e:  # pragma: no cover - ray is a dependency
            raise ExecutorError("--executor ray needs ray: pip install 'ray[default]'") from e
        if not ray.is_initialized():
            if self.address:
                try:
                    ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                except Exception as e:
                    raise ExecutorError(
                        f"cannot join the Ray cluster at {self.address} ({type(e).__name__}: {_first_line(e)}); check the "
                        "address (`ray status` on the head node), set RAY_AUTH_MODE=token if the cluster uses token "
                        "authentication, or drop --address/RAY_ADDRESS to start a local Ray"
                    ) from e
            else:
                cuda = self.requested_device in ("auto", "cuda") and torch.cuda.is_available()
                if self.requested_device == "cuda" and not cuda:
                    raise ExecutorError("--device cuda but torch sees no GPU here; use --device cpu")
                ncpu = (self.workers if self.requested_workers else (os.cpu_count() or 1)) * self.threads
                with loopback_ray():
                    ray.init(
                        # "local": always a new Ray of our own, never the last cluster recorded in
                        # /tmp/ray/ray_current_cluster (possibly another user's, or long dead)
                        address="local",
                        num_cpus=max(ncpu, 1),
                        num_gpus=torch.cuda.device_count() if cuda else 0,
                        include_dashboard=False,
                        _node_ip_address="127.0.0.1",
                        log_to_driver=False,
                        configure_logging=False,
                    )
                self._started_ray = True
            self._connected = True
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if self.requested_device == "auto":
            self.device = "cuda" if gpus > 0 else "cpu"
        if self.device == "cuda" and gpus == 0:
            raise ExecutorError("--device cuda but the Ray cluster has no GPUs; use --device cpu")
        capacity = gpus if self.device == "cuda" else max(cpus // self.threads, 1)
        self.workers = self.requested_workers or capacity
        opts: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        opts |= {"num_gpus": 1, "num_cpus": 1} if self.device == "cuda" else {"num_cpus": self.threads}
        self._remote = ray.remote(RayWorker).options(**opts)
        self._idle = [self._new_actor() for _ in range(self.workers)]
        # wait until every actor is up (models load lazily on their first job)
        infos = ray.get([a.ready.remote() for a in self._idle])
        for a, info in zip(self._idle, infos, strict=True):
            self._infos[a] = info
        self.nodes = sorted({i["node_id"] for i in infos})
        self.startup_s = time.perf_counter() - t0

    def _new_actor(self) -> Any:
        env = {k: v for k, v in os.environ.items() if k.startswith("BENCH_")}
        return self._remote.remote(self.device, self.threads, env)

    def node_workers(self, node_id: str) -> int:
        return sum(1 for i in self._infos.values() if i.get("node_id") == node_id)

    def free_slots(self) -> int:
        return len(self._idle)

    def running(self) -> int:
        return len(self._in_flight)

    def submit(self, task: Task, suite: Suite) -> None:
        actor = self._idle.pop()
        self._in_flight[actor.run.remote(task, suite)] = (actor, task)

    def wait(self, timeout: float | None = None) -> list[Outcome]:
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

        ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
        outs = []
        for ref in ready:
            actor, task = self._in_flight.pop(ref)
            info = self._infos.get(actor, {})
            try:
                out = ray.get(ref)
                self._idle.append(actor)
            except (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError) as e:
                out = Outcome(task, error=f"worker lost: {type(e).__name__}: {_first_line(e)}", lost_worker=True, worker=info)
                self._replace(actor)
            except Exception as e:  # the call itself failed (e.g. serialisation); the actor lives on
                out = Outcome(task, error=f"{type(e).__name__}: {_first_line(e)}", traceback=traceback.format_exc(), worker=info)
                self._idle.append(actor)
            outs.append(out)
        return outs

    def _replace(self, actor: Any, timeout_s: float = 300.0) -> None:
        """Start a new actor for a lost one; if the cluster cannot place it (a node is gone),
        go on with fewer workers, and fail only when none is left."""
        import ray

        self._infos.pop(actor, None)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
        new = self._new_actor()
        try:
            self._infos[new] = ray.get(new.ready.remote(), timeout=timeout_s)
            self._idle.append(new)
        except Exception as e:
            try:
                ray.kill(new, no_restart=True)
            except Exception:
                pass
            self.workers -= 1
            if not self._infos:
                raise ExecutorError(
                    f"every Ray worker is lost and none can be started ({type(e).__name__}: {_first_line(e)}); "
                    "check the cluster (`ray status`) and resume the run with --resume"
                ) from e

    def describe(self) -> dict[str, Any]:
        d = super().describe() | {"threads_per_worker": self.threads, "nodes": self.nodes, "startup_s": self.startup_s}
        d["address"] = self.address or ("local (started by bench)" if self._started_ray else "")
        return d

    def close(self) -> None:
        if self._remote is None and not self._connected:
            return
        import ray

        for a in {*self._infos, *self._idle, *(a for a, _ in self._in_flight.values())}:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self._idle, self._in_flight, self._infos, self._remote = [], {}, {}, None
        if self._connected:
            ray.shutdown()  # stops the local Ray we started; only disconnects from an existing cluster
            self._connected = False


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def make_executor(
    kind: str, device: str = "auto", workers: int | None = None, threads: int | None = None, address: str | None = None
) -> Executor:
    """An executor by name; bad combinations fail with the fix."""
    if kind == "local":
        if address:
            raise ExecutorError("--address joins a Ray cluster; use it with --executor ray")
        dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
        return LocalExecutor(dev, workers, threads)
    if kind == "ray":
        return RayExecutor(device, workers, threads, address)
    raise ExecutorError(f"unknown executor {kind!r}; use one of {', '.join(EXECUTORS)}")
