"""The XLA:CPU flags launch.py adds: appended unless the user set them, and doing what they claim."""

import os
import subprocess
import sys

from mile import xla_cpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_to_the_users_flags():
    got = xla_cpu_flags.with_default_flags("--xla_force_host_platform_device_count=8")
    assert got == f"--xla_force_host_platform_device_count=8 {YNN}="
    assert xla_cpu_flags.with_default_flags("") == f"{YNN}="


def test_a_flag_the_user_set_is_left_alone():
    mine = f"{YNN}=LIBRARY_FUSION_TYPE_DOT --xla_cpu_max_isa=AVX"
    assert xla_cpu_flags.with_default_flags(mine) == mine
    env = {"XLA_FLAGS": mine}
    xla_cpu_flags.set_default_flags(env)
    assert env["XLA_FLAGS"] == mine


def _batched_matmul_program(xla_flags: str) -> str:
    """The compiled HLO of attention's batched matmul in a fresh process with these XLA_FLAGS."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "a = jnp.ones((8, 32, 16))\n"
        "f = jax.jit(lambda a, b: jnp.einsum('nsd,ntd->nst', a, b))\n"
        "print(f.lower(a, a).compile().as_text())\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_the_installed_xla_accepts_the_flag_and_it_moves_the_batched_matmul_off_ynnpack():
    # jax's default puts the batched matmul in a YNNPACK fusion (one thread); mile's flag must
    # be known to this jaxlib (an unknown flag aborts XLA) and hand the dot to XLA's own emitter.
    assert "__ynn_fusion" in _batched_matmul_program("")
    program = _batched_matmul_program(xla_cpu_flags.with_default_flags(""))
    assert "__ynn_fusion" not in program
    assert " dot(" in program
