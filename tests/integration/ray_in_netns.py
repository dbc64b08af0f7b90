"""Run inside a private network namespace (test_data_engine.py starts it with `unshare -rn`):
bring up loopback, start a real local Ray cluster bound to 127.0.0.1, run the four data stages
on it with data.executor=ray, record every TCP socket of the namespace, stop the cluster.

Usage: python ray_in_netns.py WORKDIR RESULT_JSON -- KEY=VALUE...   (cwd: WORKDIR's parent)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("prepare", "dedup", "tokenize", "pack")
PORT = 6379  # the namespace is private: no other cluster can hold it


def sockets() -> list[str]:
    """local and remote address of every TCP socket in this namespace (IPv4 and IPv6 hex)."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(name).read_text().splitlines()[1:]:
            f = line.split()
            out += [f[1].rsplit(":", 1)[0], f[2].rsplit(":", 1)[0]]
    return out


def main() -> int:
    work, result, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[4:]
    ray = str(Path(sys.executable).with_name("ray"))
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    tmp = tempfile.mkdtemp(prefix="k2ray-")  # short: Ray's unix socket paths must fit 107 bytes
    started = subprocess.run([ray, "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1",
                              "--port", str(PORT), "--include-dashboard", "false", "--disable-usage-stats",
                              "--temp-dir", tmp], capture_output=True, text=True)
    out: dict = {"links": links, "ray_start": started.returncode, "stages": [], "sockets": []}
    try:
        if started.returncode != 0:
            out["error"] = started.stdout[-2000:] + started.stderr[-2000:]
            return 1
        for stage in STAGES:
            r = subprocess.run([sys.executable, "-m", "k2repro", "data", stage, "--config-name", "pipeline",
                                f"data.work_dir={work}", f"data.packed_dir={work}/packed", "data.executor=ray",
                                f"data.ray_address=127.0.0.1:{PORT}", *overrides],
                               capture_output=True, text=True)
            out["stages"].append({"stage": stage, "rc": r.returncode, "stderr": r.stderr[-3000:]})
            out["sockets"] = sorted(set(out["sockets"]) | set(sockets()))
            if r.returncode != 0:
                return 1
        return 0
    finally:
        out["sockets"] = sorted(set(out["sockets"]) | set(sockets()))
        subprocess.run([ray, "stop", "--force"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        result.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
