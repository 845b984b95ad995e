"""Security defaults: a local Ray that only this machine can reach and that asks for a token,
and no file or folder tl-ray creates that other users could overwrite."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

LOCAL_RAY = """
import json, urllib.error, urllib.request
import ray
from tl_ray import cluster
assert cluster.ensure_ray(), "tl-ray did not start its own local Ray"
url = ray._private.worker.get_dashboard_url()
try:
    urllib.request.urlopen(f"http://{url}/api/jobs/", timeout=30)
    status = 200
except urllib.error.HTTPError as error:
    status = error.code
print(json.dumps({"dashboard": url, "status": status}))
ray.shutdown()
"""


@pytest.mark.ray
def test_local_ray_listens_on_loopback_only_and_refuses_requests_without_the_token():
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    done = subprocess.run([sys.executable, "-c", LOCAL_RAY], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["dashboard"].startswith("127.0.0.1:")
    assert report["status"] in (401, 403), "the job API answered a request that carried no token"


def test_nothing_written_is_writable_by_other_users_even_under_umask_000(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" -m tl_ray.cli sample-data "$1" --per-class 6', sys.executable, str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = [out, *out.rglob("*")]
    assert len(written) > 40
    writable = [str(path) for path in written if path.stat().st_mode & stat.S_IWOTH]
    assert not writable, f"world-writable: {writable[:5]}"
