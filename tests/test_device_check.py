"""experiments/device_check.sh --tiny: the GPU check runs end to end on a CPU, every size shrunk."""

import os
import re
import subprocess
import sys

from train_helpers import REPO


def test_device_check_runs_end_to_end_shrunk():
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as the check runs on one GPU
    out = subprocess.run(
        ["bash", "experiments/device_check.sh", "--tiny"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # 1. both loss variants timed; 2. the xla step measured and cudnn refused with its reason on a
    # CPU; 3. the reference stack at the step's batch, with the ratio.
    assert re.search(r"^\| fused MiLe \| [\d.]+ \| [\d.]+x \|", text, re.M), text
    assert re.search(r"^\| materialised CE \(optax\) \| [\d.]+ \| 1\.00x \|", text, re.M), text
    step = re.search(r"^\| xla \| (\d+) x 32 \| ([\d,]+) \|", text, re.M)
    assert step and int(step.group(2).replace(",", "")) > 0, text
    assert re.search(r"^\| cudnn \| skipped: .*needs an NVIDIA GPU", text, re.M), text
    reference = re.search(r"^\| (\d+) x 32 \| 1 \| ([\d,]+) \| – \| [\d.]+x \| – \|", text, re.M)
    assert reference and reference.group(1) == step.group(1), text
    assert "device check done" in text
