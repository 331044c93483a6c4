"""``bench submit``: run any bench command on a Ray cluster as a Ray Job.

The working directory (this checkout, minus virtualenvs, run state and tracking stores) travels in the job's
runtime_env; the entrypoint is ``python -m bench <command> --address auto`` so the job's driver joins the
cluster it runs on. Pip requirements are added to the runtime_env when asked (``--pip``), for clusters whose
image does not have the project's dependencies.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time

from bench.errors import BenchError

EXCLUDES = [".venv", "venv", ".git", "bench_runs", "mlartifacts", "mlruns.db", "*.egg-info", "__pycache__",
            "results/*.csv", ".pytest_cache", ".whl", ".gl"]


def project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_requirements() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml (what a bare cluster image must install)."""
    import tomllib

    with open(os.path.join(project_root(), "pyproject.toml"), "rb") as fh:
        return list(tomllib.load(fh)["project"]["dependencies"])


def _jobs_address(address: str) -> str:
    if address == "auto":
        return os.environ.get("RAY_ADDRESS", "") or "http://127.0.0.1:8265"
    return address


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = _jobs_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise BenchError(f"--address {address}: no Ray Jobs API there ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:150]}); start one with `ray start --head --dashboard-host 0.0.0.0`") from None


def build_entrypoint(command: list[str]) -> str:
    if not command:
        raise BenchError("submit: nothing to run; usage: bench submit --address URL -- run --methods ...")
    args = list(command)
    if args[0] in ("run", "tune") and "--address" not in args:
        args += ["--address", "auto"]
    if args[0] in ("run", "tune") and "--no-progress" not in args and args[0] == "run":
        args += ["--no-progress"]  # logs, not a live bar, in job output
    return "python -m bench " + shlex.join(args)


def runtime_env(pip: bool, env_vars: dict | None = None) -> dict:
    env = {"working_dir": project_root(), "excludes": EXCLUDES,
           "env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **(env_vars or {})}}
    if pip:
        env["pip"] = project_requirements()
    return env


def submit(address: str, command: list[str], pip: bool = False, follow: bool = True, out=None) -> str:
    out = out or sys.stdout
    client = _client(address)
    entry = build_entrypoint(command)
    job_id = None
    for attempt in range(30):
        try:
            job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env(pip))
            break
        except Exception as exc:
            text = str(exc).splitlines()[0][:200]
            # a cluster that just started has no job agent for a few seconds: wait for it
            if "No available agent" in text and attempt < 29:
                time.sleep(2.0)
                continue
            raise BenchError(f"submit: the cluster refused the job ({text})") from None
    print(f"submitted job {job_id}: {entry}", file=out, flush=True)
    if follow:
        status = stream_logs(client, job_id, out)
        print(f"job {job_id} {status}", file=out, flush=True)
        if status != "SUCCEEDED":
            raise BenchError(f"job {job_id} ended {status}; see `bench submit --address {address} --logs {job_id}`")
    return job_id


def stream_logs(client, job_id: str, out) -> str:
    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception:
        # tailing needs a websocket; fall back to polling the full log
        seen = 0
        while str(client.get_job_status(job_id)).split(".")[-1] not in ("SUCCEEDED", "FAILED", "STOPPED"):
            logs = client.get_job_logs(job_id)
            out.write(logs[seen:])
            seen = len(logs)
            time.sleep(1.0)
        out.write(client.get_job_logs(job_id)[seen:])
    for _ in range(30):  # the log stream can close a moment before the status is final
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.5)
    return status


def job_status(address: str, job_id: str) -> str:
    client = _client(address)
    try:
        return str(client.get_job_status(job_id)).split(".")[-1]
    except Exception:
        raise BenchError(f"--status {job_id}: no such job at {address}") from None


def job_logs(address: str, job_id: str) -> str:
    client = _client(address)
    try:
        return client.get_job_logs(job_id)
    except Exception:
        raise BenchError(f"--logs {job_id}: no such job at {address}") from None


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_stop(address: str, job_id: str, timeout_s: float = 120.0) -> str:
    """Stop a job and wait until it and what it started are gone; returns one line saying so.

    Ray's job supervisor sends the entrypoint and its child processes SIGTERM (``bench run``/``bench tune`` then
    leave like Ctrl-C, see ``bench.raycluster``) and SIGKILL 3 s later; the job's actors (Ray Train workers and
    controller, Tune trials) and placement groups end with its driver. This waits for the status to be final and
    for the job's actors to be dead, so that the next command finds the cluster's resources free.
    """
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception:
        raise BenchError(f"--stop {job_id}: no such job at {address}") from None
    status = str(info.status).split(".")[-1]
    if status in TERMINAL:
        return f"job {job_id} already {status}"
    client.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id)).split(".")[-1]
    if status not in TERMINAL:
        raise BenchError(f"--stop {job_id}: still {status} after {timeout_s:.0f}s; see `bench submit --address "
                         f"{address} --logs {job_id}`")
    ray_job = getattr(client.get_job_info(job_id), "job_id", None) or getattr(info, "job_id", None)
    left = _live_actors(address, ray_job, deadline) if ray_job else None
    if left:
        raise BenchError(f"--stop {job_id}: the job is {status} but {len(left)} of its actors still run after "
                         f"{timeout_s:.0f}s ({', '.join(sorted(set(left))[:5])})")
    return f"job {job_id} {status}" + ("; its actors have ended" if left == [] else "")


def _live_actors(address: str, ray_job_id: str, deadline: float) -> list[str] | None:
    """Class names of the job's actors not yet DEAD, polled until none or ``deadline``; None if unknown."""
    try:
        from ray.util.state import list_actors
    except Exception:  # noqa: BLE001 - a Ray without the State API: nothing to wait for
        return None
    names: list[str] | None = None
    while True:
        try:
            actors = list_actors(address=_jobs_address(address), filters=[("job_id", "=", ray_job_id)],
                                 limit=1000, detail=True, raise_on_missing_output=False)
            # detached actors (Ray Train's cluster-wide TrainStateActor, _AutoscalingCoordinatorActor) are meant to
            # outlive the job that created them; they hold no CPUs
            names = [a.class_name for a in actors if a.state != "DEAD" and not getattr(a, "is_detached", False)]
        except Exception:  # noqa: BLE001 - the State API is optional for stopping
            return names
        if not names or time.monotonic() >= deadline:
            return names
        time.sleep(1.0)
