"""Pieces of a deployment that tests build for themselves, on this machine only.

- :class:`HostNetwork`: "hosts" that are Linux network namespaces, each with
  its own address on a private /24 that exists only on a bridge this module
  creates (and removes), so several hosts' workers reach one PostgreSQL over
  a real network path rather than loopback.
- :class:`ListeningPostgres`: a :class:`~tests.helpers.SystemPostgres` that
  also listens on such a bridge and trusts its subnet.
- :class:`PgBouncer`: a PgBouncer in front of a server, in a pooling mode of
  the test's choice, run as the ``postgres`` user (it refuses to run as root).

Each class undoes everything it made in ``stop()``/``close()``, which is safe
to call more than once and after a half-done start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import SystemPostgres, free_port, short_temp_dir

__all__ = [
    "Host",
    "HostNetwork",
    "ListeningPostgres",
    "PgBouncer",
    "find_pgbouncer",
    "namespaces_unavailable",
]

# 10.213.<n>.0/24: a private range no route here uses; each HostNetwork
# takes a /24 that no interface on this machine has an address in yet.
_SUBNET_PREFIX = "10.213"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args],
        capture_output=True,
        text=True,
        check=check,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None if they can.

    Probes by doing it: creates a namespace and a veth pair, then removes
    both. Needs root (or CAP_NET_ADMIN) and the ``ip`` command (iproute2).
    """
    if shutil.which("ip") is None:
        return "no 'ip' command (apt-get install iproute2)"
    token = uuid.uuid4().hex[:6]
    namespace, link = f"igprobe-{token}", f"igp{token}"
    try:
        made = _ip("netns", "add", namespace, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
        veth = _ip(
            "link", "add", link, "type", "veth", "peer", "name", link + "x", check=False
        )
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
        return None
    finally:
        _ip("link", "del", link, check=False)
        _ip("netns", "del", namespace, check=False)


@dataclasses.dataclass(frozen=True)
class Host:
    """One namespace "host": its name, namespace and address on the bridge."""

    name: str
    namespace: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host: its network namespace and hostname.

        A UTS namespace of its own gives the process the host's name, so
        ``socket.gethostname()`` (and so the gate's ledger rows and
        ``application_name``) tells the hosts apart.
        """
        return [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.name,
            *argv,
        ]


class HostNetwork:
    """A bridge in the root namespace and ``count`` namespaces hanging off it.

    The bridge gets ``10.213.<n>.1/24``, host ``i`` gets ``10.213.<n>.<10+i>``;
    each namespace also has its loopback up. Use as a context manager, or
    call :meth:`close` (idempotent) in a finalizer.
    """

    def __init__(self, count: int) -> None:
        token = uuid.uuid4().hex[:5]
        self.token = token
        self.bridge = f"igbr{token}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.hosts = [
            Host(
                f"host{i + 1}",
                f"ighost-{token}-{i + 1}",
                str(self.subnet.network_address + 11 + i),
            )
            for i in range(count)
        ]
        self._made: list[tuple[str, ...]] = []

    def __enter__(self) -> HostNetwork:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create the bridge, the namespaces and their links."""
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", "del", self.bridge))
        _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, host in enumerate(self.hosts):
            outside = f"igv{self.token}{index}"
            _ip("netns", "add", host.namespace)
            self._made.append(("netns", "del", host.namespace))
            # The namespace end is created inside the namespace at once, so
            # it never shows up in the root namespace under a stray name.
            _ip(
                "link",
                "add",
                outside,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.namespace,
            )
            self._made.append(("link", "del", outside))
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            inside = ("netns", "exec", host.namespace, "ip")
            _ip(*inside, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "link", "set", "lo", "up")

    def close(self) -> None:
        """Remove everything made, newest first; errors are ignored."""
        while self._made:
            _ip(*self._made.pop(), check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    shown = _ip("-o", "-4", "addr", "show").stdout
    used = {
        ipaddress.ip_interface(word).network
        for line in shown.splitlines()
        for word in line.split()
        if word.count(".") == 3 and "/" in word
    }
    # Start somewhere that depends on the pid, so two test runs side by side
    # are unlikely to race for the same /24.
    start = os.getpid() % 200
    for offset in range(250):
        candidate = ipaddress.ip_network(
            f"{_SUBNET_PREFIX}.{(start + offset) % 250 + 1}.0/24"
        )
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise RuntimeError(f"no free /24 left in {_SUBNET_PREFIX}.0.0/16")


class ListeningPostgres(SystemPostgres):
    """A :class:`SystemPostgres` that also listens on ``addresses``.

    Args:
        bindir: The server binaries.
        addresses: Extra addresses to listen on (127.0.0.1 always is).
        trusted: Networks (``10.213.7.0/24``) whose clients log in without a
            password, besides 127.0.0.1.
        settings: Extra ``postgresql.conf`` settings.
    """

    def __init__(
        self,
        bindir: Path,
        *,
        addresses: Sequence[str] = (),
        trusted: Sequence[str] = (),
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(bindir)
        self.addresses = ["127.0.0.1", *addresses]
        self.trusted = ["127.0.0.1/32", *trusted]
        self.settings = dict(settings or {})

    def url(self, database: str, address: str = "127.0.0.1") -> str:
        """The superuser's URL for ``database`` through ``address``."""
        if self.port is None:
            raise RuntimeError("ListeningPostgres.url() before start()")
        return f"postgresql://postgres@{address}:{self.port}/{database}"

    def _configure(self, port: int) -> None:
        super()._configure(port)
        lines = [f"listen_addresses = '{','.join(self.addresses)}'"]
        lines += [f"{name} = {value}" for name, value in self.settings.items()]
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n".join(lines) + "\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "".join(f"host all all {network} trust\n" for network in self.trusted)
        )


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` executable (Debian puts it in /usr/sbin), or None."""
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    return found


class PgBouncer:
    """A PgBouncer on 127.0.0.1 in front of one PostgreSQL server.

    Every database name is passed through to the server (``* =``), logged
    in as ``postgres``; clients log in without a password (``auth_type =
    any``), as the server trusts 127.0.0.1 anyway.

    Args:
        executable: From :func:`find_pgbouncer`.
        server_port: The PostgreSQL server's port on 127.0.0.1.
        pool_mode: ``session``, ``transaction`` or ``statement``.
        settings: Extra ``[pgbouncer]`` settings.
    """

    def __init__(
        self,
        executable: str,
        server_port: int,
        pool_mode: str,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.executable = executable
        self.server_port = server_port
        self.pool_mode = pool_mode
        self.settings = dict(settings or {})
        self.base_dir = short_temp_dir("igpgb")
        self.log_path = self.base_dir / "pgbouncer.log"
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def url_for(self, database: str, user: str = "postgres") -> str:
        """A ``postgresql://`` URL reaching ``database`` through PgBouncer."""
        if self.port is None:
            raise RuntimeError("PgBouncer.url_for() before start()")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def start(self, attempts: int = 3) -> None:
        """Start PgBouncer; return once it accepts connections.

        Raises:
            RuntimeError: It did not start; the message has its log.
        """
        owner = _unprivileged_owner()
        if owner is not None:
            os.chown(self.base_dir, owner.pw_uid, owner.pw_gid)
        for _ in range(attempts):
            port = free_port()
            config = self.base_dir / "pgbouncer.ini"
            config.write_text(self._config(port))
            self._process = subprocess.Popen(
                [self.executable, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                user=owner.pw_uid if owner else None,
                group=owner.pw_gid if owner else None,
                extra_groups=[] if owner else None,
                start_new_session=True,
            )
            if self._wait_until_listening(port, timeout=10):
                self.port = port
                return
            self.stop(remove=False)
        raise RuntimeError(
            f"PgBouncer did not start after {attempts} tries; its log:\n"
            f"{self.log()[-3000:]}"
        )

    def stop(self, remove: bool = True) -> None:
        """Stop PgBouncer (and, by default, delete its directory)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.port = None
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log(self) -> str:
        """What PgBouncer logged so far."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return "(no log)"

    def _config(self, port: int) -> str:
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(port),
            "unix_socket_dir": "",
            "auth_type": "any",
            "pool_mode": self.pool_mode,
            "logfile": str(self.log_path),
            "pidfile": str(self.base_dir / "pgbouncer.pid"),
            "max_client_conn": "500",
            "default_pool_size": "20",
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host=127.0.0.1 port={self.server_port} user=postgres",
        ]
        lines += ["", "[pgbouncer]"]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        return "\n".join(lines) + "\n"

    def _wait_until_listening(self, port: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return True
            time.sleep(0.05)
        return False


def _unprivileged_owner() -> pwd.struct_passwd | None:
    """As root, the ``postgres`` user to run PgBouncer as; else None (yourself)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but there is no user 'postgres' to run PgBouncer "
            "as (it refuses to run as root)"
        ) from None
