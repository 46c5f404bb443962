"""A two-node Ray cluster on this machine for the replica tests (no tests here): `ray start
--head` plus a second `ray start --address`, both on 127.0.0.1, in a private temp dir. Stopping
kills exactly the processes of this cluster (those naming its temp dir, and their children),
never other Ray clusters on the machine as `ray stop` would.

Token authentication is off (RAY_AUTH_MODE=disabled, in this process too while the cluster
lives): Ray 2.60 turns it on by itself when ~/.ray/auth_token exists (a local `ray.init()`
writes one), and then a second `ray start --address` is refused."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from test_server_support import free_port


class LocalRayCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 3):
        self._auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.temp_dir = tempfile.mkdtemp(prefix="mray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        ray = str(Path(sys.executable).with_name("ray"))
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--disable-usage-stats"]
        try:
            self._run([ray, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                       f"--temp-dir={self.temp_dir}", *common])
            for _ in range(nodes - 1):
                self._run([ray, "start", f"--address={self.address}", *common])
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _run(cmd: list[str]) -> None:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")

    def pids(self) -> set[int]:
        parent, mine = {}, set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            if self.temp_dir.encode() in cmdline:
                mine.add(int(entry))
        grew = True
        while grew:  # workers and agents name no temp dir: take the children too
            children = {pid for pid, ppid in parent.items() if ppid in mine} - mine
            grew = bool(children)
            mine |= children
        return mine

    def stop(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = self._auth_mode
