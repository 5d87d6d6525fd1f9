"""A throwaway PostgreSQL server for the tests: its own data directory and socket in /tmp, a free
port on 127.0.0.1, password authentication over TCP, stopped (``pg_ctl stop -m fast``) and
removed at the end, and told to shut down if the test process dies without stopping it.

PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` system user (Debian's
package creates it; created here if missing). The server binaries are found under
``/usr/lib/postgresql/<version>/bin`` (Debian), or on PATH; ``scripts/setup.sh`` installs them.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

ROLE, PASSWORD = "vmpower", "s3cret-pw"  # the role the stores connect as, over TCP with a password
SHARED = "vmpower"  # the session's database, a schema per test in it
SYSTEM_USER = "postgres"


def find_bindir() -> str | None:
    """The directory of ``initdb``, ``pg_ctl`` and ``postgres``, newest version first."""
    def version(bindir):
        return [int(part) if part.isdigit() else 0 for part in bindir.split("/")[-2].split(".")]

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, tool), os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _stop_with_parent() -> None:
    """In the postmaster before exec: a fast shutdown if the test process dies unannounced."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _system_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                       check=True, capture_output=True)
        return pwd.getpwnam(SYSTEM_USER)


class PostgresServer:
    """``start()`` it, ``schema()`` or ``database()`` for a clean store, ``stop()`` at the end."""

    max_connections = 50  # bench/fleet_scale.py's 50 hosts need more

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="vmpower-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = _free_port()
        self._made = 0
        self._as = {}
        if os.geteuid() == 0:
            user = _system_user()
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            self.superuser = user.pw_name
        else:
            self.superuser = pwd.getpwuid(os.geteuid()).pw_name

    def _env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": self.root}

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([os.path.join(self.bindir, tool), *args], env=self._env(), cwd=self.root,
                                capture_output=True, text=True, timeout=120, check=False, **self._as)
        if result.returncode:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            with open(self.log) as log:
                return log.read()[-3000:]
        except OSError:
            return ""

    def start(self, timeout: float = 60) -> PostgresServer:
        self._run("initdb", "-D", self.data, "--no-sync", "-E", "UTF8", "--locale=C",
                  "--auth-local=trust", "--auth-host=scram-sha-256")
        # The postmaster is this process's child (pg_ctl start would leave it to init), so it
        # is reaped here; durability does not matter for a server that lives for one session.
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
                 "-k", self.root, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", f"max_connections={self.max_connections}"],
                env=self._env(), cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_stop_with_parent, **self._as)  # noqa: PLW1509 (no threads yet)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.admin(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
                break
            except Exception as exc:  # not accepting connections yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start: {exc}\n{self._log_tail()}") from exc
                time.sleep(0.05)
        self.admin(f"CREATE DATABASE {SHARED} OWNER {ROLE} TEMPLATE template0")
        return self

    def stop(self) -> None:
        try:
            if getattr(self, "process", None) is not None and self.process.poll() is None:
                try:
                    self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")
                finally:
                    try:
                        self.process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                        self.process.wait()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def admin(self, sql: str, dbname: str = "postgres") -> None:
        """Run SQL as the superuser over the unix socket (trusted)."""
        import psycopg

        with psycopg.connect(host=self.root, port=self.port, user=self.superuser,
                             dbname=dbname, autocommit=True) as conn:
            conn.execute(sql)

    def dsn(self, dbname: str, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{ROLE}:{password}@127.0.0.1:{port or self.port}/{dbname}"

    def database(self) -> str:
        """A new, empty database owned by the vmpower role; its DSN. (About 0.2 s.)"""
        self._made += 1
        name = f"vmpower_{self._made}"
        self.admin(f"CREATE DATABASE {name} OWNER {ROLE} TEMPLATE template0")
        return self.dsn(name)

    def schema(self) -> str:
        """The DSN of a new, empty schema of the session's database, as the first on the
        connection's search_path: as clean as a new database, in a few milliseconds."""
        self._made += 1
        name = f"test_{self._made}"
        self.admin(f"CREATE SCHEMA {name} AUTHORIZATION {ROLE}", dbname=SHARED)
        return f"{self.dsn(SHARED)}?options=-csearch_path%3D{name}"
