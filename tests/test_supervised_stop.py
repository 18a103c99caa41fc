"""One Ctrl-C stops `saec deploy worker` and `saec deploy serve`, also when the Prefect server is gone.

Both run their Prefect process as a child of `supervise` (deployments/deploy.py), in a session
of its own. The fast tests drive `supervise` with small Python children: one that exits on
SIGINT, one that ignores it, one that ignores SIGTERM as well. The slow test starts a real
Prefect server, a supervised worker of the `edge` pool and the supervised `serve`, kills the
server, and then sends one SIGINT to each.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _supervisor(child_code: str, **kw) -> tuple[subprocess.Popen, int]:
    """`supervise` in a process of its own, running `python -c child_code`; returns it and the child's pid
    (the child prints it once its signal handlers are in place)."""
    code = ("import sys; from saec.deployments.deploy import supervise; "
            f"sys.exit(supervise([sys.executable, '-c', {child_code!r}], what='child', **{kw!r}))")  # fmt: skip
    sup = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    line = sup.stdout.readline()
    assert line.strip().isdigit(), f"child did not start: {line!r} {sup.stderr.read() if sup.poll() is not None else ''}"
    return sup, int(line)


def _finish(sup: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        _, err = sup.communicate(timeout=timeout)
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
    return sup.returncode, err, time.monotonic() - t0


STOPS_ON_SIGINT = ("import os, sys, time\n"
                   "try:\n    print(os.getpid(), flush=True)\n    time.sleep(60)\n"
                   "except KeyboardInterrupt:\n    sys.exit(3)\n")  # fmt: skip
IGNORES_SIGINT = ("import os, signal, time\n"
                  "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                  "print(os.getpid(), flush=True)\ntime.sleep(60)\n")  # fmt: skip
IGNORES_BOTH = IGNORES_SIGINT.replace("print(", "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_child_that_stops_on_sigint_is_not_waited_for_and_keeps_its_exit_code(sig):
    sup, child = _supervisor(STOPS_ON_SIGINT, grace=30)
    sup.send_signal(sig)
    code, err, took = _finish(sup, timeout=15)
    assert code == 3 and took < 10, (code, took, err)
    assert "still running" not in err
    assert _gone(child)


def test_a_child_that_ignores_sigint_is_terminated_after_the_grace():
    sup, child = _supervisor(IGNORES_SIGINT, grace=1)
    t0 = time.monotonic()
    sup.send_signal(signal.SIGINT)
    code, err, _ = _finish(sup, timeout=15)
    took = time.monotonic() - t0
    assert code == 130 and 1 <= took < 5, (code, took, err)
    assert "child: still running 1 s after SIGINT" in err and "Prefect server" in err
    assert _gone(child)


def test_a_child_that_ignores_sigterm_too_is_killed_and_a_second_ctrl_c_skips_the_grace():
    sup, child = _supervisor(IGNORES_BOTH, grace=60, kill_after=1)
    t0 = time.monotonic()
    sup.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sup.send_signal(signal.SIGINT)
    code, err, _ = _finish(sup, timeout=15)
    took = time.monotonic() - t0
    assert code == 130 and took < 5, (code, took, err)
    assert "child: interrupted twice" in err
    assert _gone(child)


# ------------------------------------------------------------------ a real server that goes away


def _wait_for(what: str, check, stack, timeout: float = 90) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{stack.log(name)}")
        try:
            if check():
                return
        except Exception:  # the server is still starting, or busy
            pass
        time.sleep(0.5)
    logs = "\n".join(f"--- {n}\n{stack.log(n)}" for n in stack.procs)
    raise TimeoutError(f"no {what} after {timeout} s:\n{logs}")


@pytest.mark.slow
def test_one_sigint_stops_worker_and_serve_after_the_server_is_gone(tmp_path):
    import psutil
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from test_prefect_server import Stack

    from saec.deployments.deploy import deployment_names, ensure_work_pools, load_spec

    grace = 3
    stack = Stack(tmp_path)
    try:
        stack.start("server", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(stack.port))
        stack.wait_healthy()
        with temporary_settings({PREFECT_API_URL: stack.api}):
            assert ensure_work_pools(["edge"]) == ["edge"]
        stack.start("worker", "saec.cli", "deploy", "worker", "--pool", "edge", "--grace", str(grace))
        stack.start("serve", "saec.cli", "deploy", "serve", "--grace", str(grace))
        served = set(deployment_names(load_spec()))
        with SyncPrefectClient(stack.api) as client:
            _wait_for("worker heartbeat", lambda: client.read_workers_for_work_pool("edge"), stack)

            def all_served():
                deps = client.read_deployments()
                flows = {f.id: f.name for f in client.read_flows()}
                return {f"{flows[d.flow_id]}/{d.name}" for d in deps} >= served

            _wait_for("served deployments", all_served, stack)
        # the Prefect processes under each supervisor (each leads a process group of its own)
        children = {n: psutil.Process(stack.procs[n].pid).children() for n in ("worker", "serve")}
        assert all(len(c) == 1 for c in children.values()), children

        server = psutil.Process(stack.procs["server"].pid)
        for p in [*server.children(recursive=True), server]:
            p.kill()
        stack.procs["server"].wait(timeout=10)

        t0 = time.monotonic()
        for name in ("worker", "serve"):
            stack.procs[name].send_signal(signal.SIGINT)
        took = {}
        for name in ("worker", "serve"):
            try:
                stack.procs[name].wait(timeout=grace + 10 - (time.monotonic() - t0))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} still running {grace + 10} s after one SIGINT:\n{stack.log(name)}")
            took[name] = time.monotonic() - t0
        for name, (child,) in children.items():
            assert _gone(child.pid), f"{name}: processes left in its child's group {child.pid}"
            if "most likely waiting on a Prefect server" in stack.log(name, tail=100_000):  # stopped by the supervisor
                assert stack.procs[name].returncode == 130, (name, stack.procs[name].returncode, stack.log(name))
            # else it ended by itself within the grace: its own exit code (serve may fail reaching the server)
        print(f"stopped after one SIGINT, server gone: {took}")
    finally:
        leaked = stack.stop()
    assert not leaked, f"processes left running: {leaked}"
