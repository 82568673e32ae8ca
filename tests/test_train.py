"""The trainer: sharded step == single device, golden step, exact resume, overfitting, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mile import sharding as msharding
from mile import state as mstate
from mile import train as T
from mile.checkpoint import Checkpointer
from mile.model import param_count
from train_helpers import REPO, jit_step, tiny_config


def _step_setup(cfg, mesh):
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    graphdef, state, _ = mstate.build_state(cfg, mesh, rules)
    return graphdef, state, jit_step(cfg, graphdef, state, mesh)


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    tokens = rng.integers(0, cfg.model.vocab_size, (shape[0], shape[1] + 1)).astype(np.int32)
    mask = (rng.random(shape) < 0.9).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}


def _params(graphdef, state):
    model, _ = nnx.merge(graphdef, state)
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


def _one_device_mesh():
    return msharding.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}), devices=jax.devices()[:1]
    )


def test_train_step_on_2x2x2_mesh_equals_one_device(tmp_path):
    cfg = tiny_config(tmp_path)
    batch = _batch(cfg)
    results = {}
    for name, mesh in (
        ("one", _one_device_mesh()),
        ("mesh", msharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))),
    ):
        graphdef, state, step = _step_setup(cfg, mesh)
        with jax.set_mesh(mesh):
            state, metrics = step(state, T.global_batch(batch, msharding.batch_sharding(mesh)))
        results[name] = (jax.device_get(metrics), _params(graphdef, state), state)
    (m1, p1, _), (m8, p8, state8) = results["one"], results["mesh"]
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p8, p1)
    # Parameters sit where the rule table puts them: embed -> fsdp, vocab/heads/mlp -> tensor.
    graphdef, _, _ = _step_setup(cfg, _one_device_mesh())
    model, _ = nnx.merge(graphdef, state8)
    P = jax.sharding.PartitionSpec
    assert model.embedding.sharding.spec == P("tensor", "fsdp")
    assert model.head.sharding.spec == P("fsdp", "tensor")
    assert model.layers[0].attn.q.sharding.spec == P("fsdp", "tensor", None)
    assert model.layers[0].mlp.down.sharding.spec == P("tensor", "fsdp")


def test_micro_batches_give_the_same_update(tmp_path):
    # 2 data shards x 4 micro-batches of the 8-row batch: 1 row per shard per micro-batch.
    mesh = msharding.make_mesh(
        ml_collections.ConfigDict({"data": 2, "fsdp": 1, "tensor": 1}), devices=jax.devices()[:2]
    )
    out = []
    for k in (1, 4):
        cfg = tiny_config(tmp_path, **{"optim.num_microbatches": k})
        graphdef, state, step = _step_setup(cfg, mesh)
        with jax.set_mesh(mesh):
            state, metrics = step(state, T.global_batch(_batch(cfg), msharding.batch_sharding(mesh)))
        out.append((jax.device_get(metrics), _params(graphdef, state)))
    np.testing.assert_allclose(out[1][0]["loss"], out[0][0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(out[1][0]["grad_norm"], out[0][0]["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out[1][1], out[0][1])


def test_golden_first_step(tmp_path):
    """A fixed tiny config and seed: the first step's loss and gradient norm.

    Independent check: with N(0, 0.01) init the logits are ~0, so the first loss is ~log(V)
    for every loss (MiLe's weights are then all ~(1 + log V)). The golden numbers pin the rest.
    """
    cfg = tiny_config(tmp_path)
    graphdef, state, step = _step_setup(cfg, _one_device_mesh())
    _, metrics = step(state, _batch(cfg))
    metrics = jax.device_get(metrics)
    assert abs(float(metrics["loss"]) - np.log(cfg.model.vocab_size)) < 1e-2
    np.testing.assert_allclose(metrics["weight_mean"], 1 + np.log(cfg.model.vocab_size), rtol=2e-3)
    np.testing.assert_allclose(metrics["loss"], GOLDEN["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], GOLDEN["grad_norm"], rtol=1e-4)


GOLDEN = {"loss": 5.7744312, "grad_norm": 0.5146992}


def _train(cfg, workdir):
    return T.train(cfg, str(workdir))


def test_resume_is_bit_exact(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 10, "train.checkpoint_every": 5, "train.eval_every": 100})
    straight = tmp_path / "straight"
    _train(cfg, straight)
    # The same run, stopped after step 5 (as a preempted job), then launched again.
    resumed = tmp_path / "resumed"
    T.train(cfg, str(resumed), stop_at=5)
    _train(cfg, resumed)

    def restored(workdir, step):
        mesh = msharding.make_mesh(cfg.mesh)
        rules = tuple(tuple(r) for r in cfg.sharding_rules)
        _, _, build = mstate.build_state(cfg, mesh, rules)
        _, abstract = msharding.abstract_sharded(build, mesh, rules)
        with Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=5) as ck:
            return ck.restore(step, abstract)

    (a, data_a), (b, data_b) = restored(straight, 10), restored(resumed, 10)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert data_a == data_b
    losses = lambda wd: [r["train/loss"] for r in _metrics(wd) if "train/loss" in r]
    assert losses(straight)[5:] == losses(resumed)[5:]
    # Throughput in model FLOPs: tokens/s x (6N + attention) per token over the devices; no MFU on CPU.
    row = next(r for r in _metrics(straight) if "train/loss" in r)
    per_token = 6 * (param_count(cfg.model) - cfg.model.vocab_size * cfg.model.embed_dim) + 12 * (
        cfg.model.num_layers * cfg.model.num_heads * cfg.model.head_dim * cfg.data.seq_len
    )
    expected = row["train/tokens_per_s"] * per_token / jax.device_count() / 1e12
    assert row["train/tflops_per_device"] == pytest.approx(expected, rel=1e-6)
    assert "train/mfu" not in row


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_overfits_short_text(tmp_path):
    cfg = tiny_config(
        tmp_path,
        **{
            "train.steps": 60,
            "train.eval_every": 1000,
            "train.checkpoint_every": 1000,
            "optim.learning_rate": 1e-2,
            "optim.warmup_steps": 5,
        },
    )
    cfg.data.update(global_batch_size=8)
    _train(cfg, tmp_path / "wd")
    losses = [r["train/ce"] for r in _metrics(tmp_path / "wd") if "train/ce" in r]
    assert losses[0] > 5.0
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses


# --- bad input: one-line ValueError naming the field, nothing in the workdir touched ----------


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"loss.name": "mse"}, "unknown loss 'mse'"),
        ({"loss.gamma": -1.0}, "gamma must be"),
        ({"loss.name": "ce", "loss.gamma": 2.0}, r"loss.gamma=2.0 has no effect on loss 'ce'"),
        ({"mesh.data": 3}, "needs 3 devices but 8 are available"),
        ({"data.global_batch_size": 6}, "not divisible by the data-parallel size 8"),
        ({"optim.num_microbatches": 3}, "micro-batches over 8 data-parallel shards"),
        ({"data.vocab_size": 600}, "larger than model.vocab_size"),
        ({"data.seq_len": 64}, "exceeds model.max_seq_len"),
        ({"data.text_files": ["/nonexistent/corpus.txt"]}, "corpus"),
        ({"train.steps": 0}, r"train.steps=0 must be a whole number >= 1; pass --config.train.steps=N"),
        ({"train.checkpoint_every": 0}, r"train.checkpoint_every=0 must be a whole number >= 1"),
        ({"train.eval_every": -5}, r"train.eval_every=-5 must be a whole number >= 1"),
        ({"train.log_every": 0}, r"train.log_every=0 must be a whole number >= 1"),
        ({"train.keep_checkpoints": 0}, r"train.keep_checkpoints=0 .*\(0 would delete every checkpoint\)"),
        ({"data.global_batch_size": 0}, r"data.global_batch_size=0 must be a whole number >= 1"),
        ({"optim.learning_rate": -3e-4}, r"optim.learning_rate=-0.0003 must be a finite number >= 0; set"),
        ({"optim.learning_rate": float("nan")}, r"optim.learning_rate=nan must be a finite number >= 0"),
        ({"optim.learning_rate": float("inf")}, r"optim.learning_rate=inf must be a finite number >= 0"),
        ({"optim.warmup_steps": -1}, r"optim.warmup_steps=-1 must be a whole number >= 0"),
        ({"optim.b2": 1.0}, r"optim.b2=1.0 must be a finite number >= 0 and < 1"),
    ],
)
def test_bad_config_fails_before_touching_workdir(tmp_path, overrides, match):
    cfg = tiny_config(tmp_path, **overrides)
    workdir = tmp_path / "wd"
    with pytest.raises(ValueError, match=match):
        _train(cfg, workdir)
    assert not workdir.exists()  # nothing created, let alone overwritten


def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 2, "train.eval_every": 100})
    _train(cfg, tmp_path / "wd")
    before = sorted(os.listdir(tmp_path / "wd" / "checkpoints"))
    other = tiny_config(tmp_path, **{"train.steps": 2, "model.num_layers": 3})
    with pytest.raises(ValueError, match="model.num_layers: checkpoint has 2, config has 3"):
        _train(other, tmp_path / "wd")
    # keep_checkpoints=0 on a trained workdir used to exit 0 having deleted every checkpoint.
    keep_none = tiny_config(tmp_path, **{"train.steps": 4, "train.keep_checkpoints": 0})
    with pytest.raises(ValueError, match="keep_checkpoints=0"):
        _train(keep_none, tmp_path / "wd")
    assert sorted(os.listdir(tmp_path / "wd" / "checkpoints")) == before


def test_workdir_that_is_a_file_is_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    for workdir in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError, match="pass a directory"):
            _train(cfg, workdir)
    assert (tmp_path / "afile").read_text() == "keep me"


def _flip_a_bit_in_state(checkpoint_dir):
    """One bit flipped in the middle of every OCDBT data file of the state item. (Orbax keeps both
    the per-process files and the merged ones; a restore reads only some of them, and a flipped
    bit in bytes never read cannot affect training.)"""
    for r, _, files in os.walk(os.path.join(checkpoint_dir, "state")):
        for name in files if os.path.basename(r) == "d" else ():
            data = bytearray(open(os.path.join(r, name), "rb").read())
            data[len(data) // 2] ^= 0x04
            open(os.path.join(r, name), "wb").write(bytes(data))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
    """A flipped bit in the newest checkpoint: one warning, the damaged step is moved aside (not
    deleted), training redoes the lost steps from the previous verified checkpoint, and ends with
    the very state the undamaged checkpoint held; metrics.jsonl lists each step once."""
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 100})
    wd = tmp_path / "wd"
    _train(cfg, wd)
    shutil.copytree(wd / "checkpoints", tmp_path / "pristine")
    _flip_a_bit_in_state(wd / "checkpoints" / "4")
    capfd.readouterr()
    _train(cfg, wd)
    err = capfd.readouterr().err
    # The flip lands in compressed data: the read fails, or a value (and so its checksum) changes.
    assert re.search(
        f"warning: checkpoint step 4 in {re.escape(str(wd / 'checkpoints'))} "
        r"(cannot be read \(.*Error reading|failed its integrity check \(checksum of)",
        err,
    ), err
    assert f"resuming from step 2 instead (moved it to {wd / 'corrupt_checkpoints' / '4'})" in err
    assert sorted(os.listdir(wd / "corrupt_checkpoints")) == ["4"]

    mesh = msharding.make_mesh(cfg.mesh)
    rules = tuple(tuple(r) for r in cfg.sharding_rules)
    _, _, build = mstate.build_state(cfg, mesh, rules)
    _, abstract = msharding.abstract_sharded(build, mesh, rules)
    with Checkpointer(str(wd / "checkpoints"), max_to_keep=None, read_only=True) as ck:
        redone, _ = ck.restore(4, abstract)
    with Checkpointer(str(tmp_path / "pristine"), max_to_keep=None, read_only=True) as ck:
        original, _ = ck.restore(4, abstract)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), redone, original)
    assert [r["step"] for r in _metrics(wd) if "train/loss" in r] == [1, 2, 3, 4]


def _tb_purge_steps(tb_dir):
    """Steps of the TensorBoard purge markers (SessionLog START events) in every event file."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    found = []
    for name in sorted(os.listdir(tb_dir)):
        data, pos = open(os.path.join(tb_dir, name), "rb").read(), 0
        while pos < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 16 + n
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                found.append(event.step)
    return found


def test_resume_drops_metrics_past_the_restored_step(tmp_path):
    """Killed after logging steps past the last checkpoint (here: the final checkpoint removed), a
    restart redoes those steps; metrics.jsonl keeps one row per step, equal to the first run's."""
    cfg = tiny_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 3})
    wd = tmp_path / "wd"
    _train(cfg, wd)
    first = _metrics(wd)
    shutil.rmtree(wd / "checkpoints" / "6")
    with open(wd / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a line torn by the kill
    _train(cfg, wd)
    again = _metrics(wd)
    assert [(r["step"], sorted(r)) for r in again] == [(r["step"], sorted(r)) for r in first]
    assert [r["step"] for r in again if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in again if "eval/ce" in r] == [3, 6]
    clocked = ("train/tokens_per_s", "train/tflops_per_device", "train/mfu")  # wall-clock rates
    timeless = lambda rows: [{k: v for k, v in r.items() if k not in clocked} for r in rows]
    assert timeless(again) == timeless(first)  # the redone steps are bit-identical
    assert _tb_purge_steps(wd / "tb") == [1, 4]  # fresh start, then the resume at step 3


def test_nonfinite_update_leaves_the_state_unchanged(tmp_path):
    cfg = tiny_config(tmp_path, **{"optim.learning_rate": float("inf"), "optim.warmup_steps": 0})
    graphdef, state, step = _step_setup(cfg, _one_device_mesh())
    before = jax.tree.map(np.asarray, state)
    new_state, metrics = step(state, _batch(cfg))
    assert np.isfinite(metrics["loss"]) and not bool(metrics["finite"])  # finite loss, inf update
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state), before)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2, "train.eval_every": 100})
    _train(cfg, tmp_path / "wd")
    assert Checkpointer(str(tmp_path / "wd" / "checkpoints"), max_to_keep=3).latest_step() == 4
    blowup = tiny_config(
        tmp_path,
        **{
            "train.steps": 10,
            "train.checkpoint_every": 2,
            "train.max_nonfinite_steps": 2,
            # finite, so the config is accepted, but the first update overflows the model
            "optim.learning_rate": 1e38,
        },
    )
    blowup.train.eval_every = 100
    with pytest.raises(T.TrainingError, match="2 consecutive non-finite steps"):
        _train(blowup, tmp_path / "wd")
    assert Checkpointer(str(tmp_path / "wd" / "checkpoints"), max_to_keep=3).latest_step() == 4


# --- launch.py end to end ---------------------------------------------------------------------


def _launch(tmp_path, *flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch.py"),
            "--config",
            os.path.join(REPO, "configs/tiny.py"),
            *flags,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )


def test_launch_end_to_end_with_resume_and_clear_errors(tmp_path):
    from train_helpers import write_corpus

    corpus = write_corpus(tmp_path)
    syntax_error = tmp_path / "broken_config.py"
    syntax_error.write_text("def get_config(:\n")
    common = [
        f"--config.data.text_files={corpus}",
        "--config.data.source=text",
        "--config.data.vocab_size=320",
        "--config.model.vocab_size=320",
        "--config.data.validation_every=10",
        f"--config.data.cache_dir={tmp_path}/cache",
    ]
    wd = tmp_path / "wd"
    run = _launch(tmp_path, f"--workdir={wd}", "--config.train.steps=4", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "validation CE" in run.stdout
    run = _launch(tmp_path, f"--workdir={wd}", "--config.train.steps=6", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    steps = [r["step"] for r in _metrics(wd) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 5, not restarted

    before = sorted(os.listdir(wd / "checkpoints")), (wd / "metrics.jsonl").read_text()
    for flag, message in (
        ("--config.loss.name=mse", "unknown loss 'mse'"),
        ("--config.loss.nmae=ce", 'unknown config key in --config.loss.nmae (did you mean "name"?)'),
        ("--config.loss.gamma=-0.5", "gamma must be a finite number >= 0"),
        (
            "--config.train.keep_checkpoints=0",
            "error: train.keep_checkpoints=0 must be a whole number >= 1 (0 would delete every checkpoint); "
            "pass --config.train.keep_checkpoints=N with N >= 1",
        ),
        (
            "--config.train.checkpoint_every=0",
            "error: train.checkpoint_every=0 must be a whole number >= 1; "
            "pass --config.train.checkpoint_every=N with N >= 1",
        ),
        (
            f"--config={tmp_path / 'nope.py'}",
            f"error: cannot load config file {tmp_path / 'nope.py'}: No such file or directory: "
            f"'{tmp_path / 'nope.py'}'; pass an existing file, e.g. --config configs/cpu.py",
        ),
        (
            f"--config={syntax_error}",
            f"error: config file {syntax_error} has a syntax error at line 1: invalid syntax; fix the file",
        ),
        (
            f"--config={REPO}/configs/paper.py:size=468m,loss=mse",
            "error: configs/paper.py:'size=468m,loss=mse': expected '<size>,<loss>'",
        ),
    ):
        bad = _launch(tmp_path, f"--workdir={wd}", flag, *common)
        assert bad.returncode == 2, bad.stderr
        assert bad.stderr.strip().startswith("error: ") and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr  # one line, no traceback
    assert (sorted(os.listdir(wd / "checkpoints")), (wd / "metrics.jsonl").read_text()) == before
    bad = _launch(tmp_path, f"--workdir={corpus}", *common)
    assert bad.returncode == 2 and bad.stderr == (
        f"error: {corpus} is a file, not a directory; pass a directory as --workdir\n"
    )

    # A damaged newest checkpoint: one warning line, and the run redoes step 6 from step 5.
    _flip_a_bit_in_state(wd / "checkpoints" / "6")
    run = _launch(tmp_path, f"--workdir={wd}", "--config.train.steps=6", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, run.stderr
    assert warnings[0].startswith(f"warning: checkpoint step 6 in {wd / 'checkpoints'} "), run.stderr
    # No traceback and no asyncio noise from the abandoned reads (which reports asyncio makes
    # depends on timing). XLA's own timing alarms under load ("Constant folding an instruction is
    # taking > 1s") are not ours, so the check names what must not appear rather than counting lines.
    for noise in ("Traceback", "asyncio", "never retrieved", "destroyed but it is pending", "Event loop is closed"):
        assert noise not in run.stderr, run.stderr
    assert [r["step"] for r in _metrics(wd) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_empty_corpus_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cfg.data.text_files = (str(empty),)
    with pytest.raises(ValueError, match="empty"):
        _train(cfg, tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


# The tiny model's parameters (tiny_model_config(): two unrolled layers), listed by hand.
DECAYED = {"embedding", "head"} | {
    f"layers.{i}.{name}"
    for i in (0, 1)
    for name in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
}
NOT_DECAYED = {"final_norm.scale"} | {f"layers.{i}.{n}_norm.scale" for i in (0, 1) for n in ("attn", "mlp")}


def test_weight_decay_skips_norm_scales_only():
    """One step of the trainer's optimiser with zero gradients moves a parameter only by its weight
    decay: decayed weights shrink by exactly the factor 1 - lr * wd, the norm scales stay put."""
    import optax
    from configs import base
    from model_helpers import tiny_model_config

    from mile.model import Llama

    # The model's parameter tree (abstract, nothing initialised), filled with nonzero values.
    params = nnx.state(nnx.eval_shape(lambda: Llama(tiny_model_config(), rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: 1.0 + rng.random(x.shape, np.float32), params)
    optim = base.get_config().optim  # no warmup, so step 0 runs at the peak learning rate
    optim.update(learning_rate=0.1, end_learning_rate=0.1, warmup_steps=0, weight_decay=0.5)
    assert tuple(optim.no_decay) == ("norm",)  # the default
    tx = mstate.make_optimizer(optim, total_steps=10)

    @jax.jit
    def step(params):
        zeros = jax.tree.map(jax.numpy.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        return optax.apply_updates(params, updates)

    def flat(state):
        return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}

    before, after = flat(params), flat(step(params))
    assert set(before) == DECAYED | NOT_DECAYED
    for name in sorted(DECAYED):
        np.testing.assert_allclose(after[name], (1 - 0.1 * 0.5) * before[name], rtol=1e-6, err_msg=name)
    for name in sorted(NOT_DECAYED):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
