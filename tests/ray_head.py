"""A throwaway loopback-only Ray head node for tests that need a real cluster address (`ray job submit`, a
cluster declaring fake GPUs), and its clean-up, which kills only this head's processes (`ray stop` would stop
every Ray cluster on the machine, other test sessions' included)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    from kardia_rl.learner.distributed import free_port as _free

    return _free("127.0.0.1")


def start_head(*, num_gpus: int = 0, dashboard: bool = False) -> dict:
    """{"gcs": address, "dashboard": URL or None, "env": environment for clients, "temp": session dir}."""
    # Token auth off on the head and on every client alike; the project's `python` comes first on PATH (as on a
    # real cluster with the environment installed).
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # Every port explicit: Ray's defaults (e.g. the dashboard agent's 52365) collide with any other Ray here. Free
    # ports are only free when asked, so a start that loses a race for one is tried once more with new ports; the
    # first failure's stderr is printed either way (a CI log must say why `ray start` failed).
    for attempt in (1, 2):
        port, dash = free_port(), free_port()
        lo = 20000 + ((os.getpid() + attempt * 97) % 200) * 100
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
                 f"--object-manager-port={free_port()}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}"]
        temp = tempfile.mkdtemp(prefix="kray-", dir="/tmp")  # Ray's unix socket paths must stay under 107 characters
        cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dash}", f"--include-dashboard={'true' if dashboard else 'false'}", "--num-cpus=2",
               f"--num-gpus={num_gpus}", f"--temp-dir={temp}", "--disable-usage-stats", *ports]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            break
        print(f"ray start (attempt {attempt}) exited {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
        stop_head(temp)  # whatever of that head did start
        if attempt == 2:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}" if dashboard else None, "env": env,
            "temp": temp}


def stop_head(temp: str) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(proc.info["cmdline"] or []):
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp, ignore_errors=True)
