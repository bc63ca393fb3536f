"""Real Redis Cluster and Sentinel set-ups on loopback, started and stopped by the tests.

Each server is a ``redis-server`` child process on a free port, with its own temporary
directory, no persistence, and is stopped by its PID (never by name). ``tests/conftest.py`` builds
them once per session, on first use, so a run that selects none of their tests starts nothing.

The factories at the end are what ``IDEMPOTENCY_REDIS_CLIENT`` points at in these tests
(``tests.redis_servers.cluster_client`` ...): zero-argument callables that read the addresses
from the environment, which the server processes of the storm tests inherit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
#: Milliseconds without an answer before a cluster node or a Sentinel's primary counts as down:
#: short, so that a failover takes a few seconds of test time.
NODE_TIMEOUT_MS = 1000
SENTINEL_MASTER = "idem-primary"
START_TIMEOUT = 30.0


def missing() -> str | None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        return "redis-server and redis-cli are not installed (apt-get install redis-server)"
    return None


def free_port(*, bus: bool = False) -> int:
    """A port free now; with ``bus``, one whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if not bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class Server:
    port: int
    directory: Path
    process: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **options: Any) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **options)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the machine is gone, nothing is flushed or handed over."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=START_TIMEOUT)

    def stop(self) -> None:
        if self.alive():
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=START_TIMEOUT)

    def restart(self) -> None:
        self.stop()
        fresh = start_server(self.directory, self.args, port=self.port)
        self.process = fresh.process


def start_server(directory: Path, args: list[str], *, port: int | None = None) -> Server:
    assert REDIS_SERVER is not None  # noqa: S101 - callers check missing() first
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    command = [
        REDIS_SERVER,
        *args,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / "redis.log"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    server = Server(port, directory, process, args)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if server.client(socket_connect_timeout=1).ping():
                return server
        except Exception:  # noqa: BLE001 - not up yet
            if not server.alive() or time.monotonic() > deadline:
                server.stop()
                log = directory / "redis.log"
                raise RuntimeError(
                    f"redis-server {' '.join(args)} did not start:\n"
                    + (log.read_text()[-2000:] if log.exists() else "")
                ) from None
            time.sleep(0.05)


def wait_until(check: Any, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001, S110 - retried until the deadline
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Cluster:
    """Three primaries and three replicas, as ``redis-cli --cluster create`` lays them out."""

    servers: list[Server]

    @property
    def nodes(self) -> str:
        return ",".join(s.address for s in self.servers)

    def primaries(self) -> list[Server]:
        return [s for s in self.servers if s.alive() and _role(s) == "master"]

    def replica_of(self, primary: Server) -> Server:
        for server in self.servers:
            if server.alive() and server is not primary:
                info = server.client().info("replication")
                if info.get("role") == "slave" and int(info.get("master_port", 0)) == primary.port:
                    return server
        raise RuntimeError(f"{primary.address} has no replica")

    def healthy(self) -> bool:
        live = [s for s in self.servers if s.alive()]
        return (
            all(s.client().cluster("info").get("cluster_state") == "ok" for s in live)
            and len([s for s in live if _role(s) == "master"]) == 3
        )

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _role(server: Server) -> str:
    return str(server.client().info("replication").get("role"))


def start_cluster(root: Path) -> Cluster:
    assert REDIS_CLI is not None  # noqa: S101
    args = [
        "--cluster-enabled",
        "yes",
        "--cluster-node-timeout",
        str(NODE_TIMEOUT_MS),
        "--cluster-config-file",
        "nodes.conf",
    ]
    servers: list[Server] = []
    try:
        for i in range(6):
            port = free_port(bus=True)
            servers.append(start_server(root / f"node-{i}", args, port=port))
        subprocess.run(  # noqa: S603
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(s.address for s in servers),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )
        cluster = Cluster(servers)
        wait_until(cluster.healthy, "the cluster to report cluster_state:ok")
        # Replicas must have synced before a test kills a primary.
        wait_until(
            lambda: all(
                s.client().info("replication").get("master_link_status") == "up"
                for s in servers
                if _role(s) == "slave"
            ),
            "the replicas to sync",
        )
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return cluster


@dataclass
class SentinelSet:
    """One primary, one replica, three Sentinels watching them."""

    primary: Server
    replica: Server
    sentinels: list[Server]

    @property
    def addresses(self) -> str:
        return ",".join(s.address for s in self.sentinels)

    def current_primary_port(self) -> int:
        host, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(SENTINEL_MASTER)
        return int(port)

    def servers(self) -> list[Server]:
        return [self.primary, self.replica]

    def by_port(self, port: int) -> Server:
        return next(s for s in self.servers() if s.port == port)

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.stop()


def start_sentinel_set(root: Path) -> SentinelSet:
    started: list[Server] = []
    try:
        primary = start_server(root / "primary", [])
        started.append(primary)
        replica = start_server(root / "replica", ["--replicaof", "127.0.0.1", str(primary.port)])
        started.append(replica)
        wait_until(
            lambda: replica.client().info("replication").get("master_link_status") == "up",
            "the replica to sync",
        )
        sentinels = []
        for i in range(3):
            directory = root / f"sentinel-{i}"
            directory.mkdir(parents=True)
            config = directory / "sentinel.conf"
            config.write_text(
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} {NODE_TIMEOUT_MS}\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1\n"
            )
            sentinel = start_server(directory, [str(config), "--sentinel"])
            started.append(sentinel)
            sentinels.append(sentinel)
        group = SentinelSet(primary, replica, sentinels)
        wait_until(
            lambda: all(
                int(s.client().sentinel_master(SENTINEL_MASTER).get("num-other-sentinels", 0)) == 2
                and int(s.client().sentinel_master(SENTINEL_MASTER).get("num-slaves", 0)) == 1
                for s in sentinels
            ),
            "the Sentinels to find each other and the replica",
        )
    except BaseException:
        for server in started:
            server.stop()
        raise
    return group


# --- client factories for IDEMPOTENCY_REDIS_CLIENT --------------------------------------------


def _addresses(variable: str) -> list[tuple[str, int]]:
    value = os.environ[variable]
    return [(host, int(port)) for host, port in (item.rsplit(":", 1) for item in value.split(","))]


def cluster_client() -> Any:
    """``IDEMPOTENCY_TEST_CLUSTER_NODES`` as a ``RedisCluster``; few retries, so that a shard
    that is down answers 503 within a second instead of the default minute of backoff."""
    from redis.backoff import ExponentialBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    nodes = [ClusterNode(host, port) for host, port in _addresses("IDEMPOTENCY_TEST_CLUSTER_NODES")]
    return RedisCluster(
        startup_nodes=nodes,
        socket_timeout=2,
        socket_connect_timeout=1,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    )


def sentinel_client() -> Any:
    """The primary that ``IDEMPOTENCY_TEST_SENTINELS`` name, found again after a failover."""
    from redis.sentinel import Sentinel

    sentinel = Sentinel(
        _addresses("IDEMPOTENCY_TEST_SENTINELS"), socket_timeout=1, socket_connect_timeout=1
    )
    return sentinel.master_for(SENTINEL_MASTER, socket_timeout=2, socket_connect_timeout=1)


# --- their redis.asyncio twins, for IDEMPOTENCY_REDIS_ASYNC_CLIENT -------------------------------


def async_cluster_client() -> Any:
    """``cluster_client`` for async views."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    nodes = [ClusterNode(host, port) for host, port in _addresses("IDEMPOTENCY_TEST_CLUSTER_NODES")]
    return RedisCluster(
        startup_nodes=nodes,
        socket_timeout=2,
        socket_connect_timeout=1,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    )


def async_sentinel_client() -> Any:
    """``sentinel_client`` for async views."""
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(
        _addresses("IDEMPOTENCY_TEST_SENTINELS"), socket_timeout=1, socket_connect_timeout=1
    )
    return sentinel.master_for(SENTINEL_MASTER, socket_timeout=2, socket_connect_timeout=1)
