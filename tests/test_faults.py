"""Kill every writer at random points (SIGTERM and SIGKILL, seeded) and check the invariant of
issue #15: afterwards the target is the complete old output, the complete new one, or absent, and
it loads or is refused in one line.

Writers: the converters (HF -> stjax, stjax -> HF over an existing export), the HF export of a
trained model (`stjax.train.loop.export_hf`, used by the trainer and `stjax.train.export`), checkpoint
saves, and the evaluator (its predictions file, resumed afterwards). Each kill lands while the
writer writes: the test waits for its first output (a partial directory, a checkpoint, a record),
then a random delay within the writer's measured duration."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stjax.convert import hf_to_stjax, stjax_to_hf
from stjax.models.safetensors_io import differing_tensors

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "PYTHONPATH": str(ROOT),
}
KILLS = [signal.SIGTERM, signal.SIGKILL]


def kill_while_writing(args: list[str], started, window: float, rng: random.Random, signum: int) -> None:
    """Start `args`, wait until `started()` holds, sleep up to `window` seconds, send `signum`."""
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not started():
        assert proc.poll() is None, f"the writer ended (status {proc.returncode}) without writing: {args}"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, window))
    proc.send_signal(signum)
    proc.wait(timeout=60)


def snapshot(target: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in target.rglob("*")} if target.exists() else {}


def writing(target: Path):
    """True once a writer of `target` has begun: a partial sibling exists, or the target itself changed."""
    before = snapshot(target)
    partial = lambda: any(p.name.startswith(f".{target.name}.partial-") for p in target.parent.iterdir())
    return lambda: partial() or snapshot(target) != before


def one_of(target: Path, complete: list[Path]) -> str:
    """'absent', or which complete output the target holds; anything else fails the test."""
    if not target.exists():
        return "absent"
    names = lambda path: sorted(p.name for p in path.iterdir())
    for reference in complete:  # the same files (no stray shard or index of another model), the same tensors
        if names(target) == names(reference) and not differing_tensors(target, reference):
            return reference.name
    pytest.fail(f"{target} is neither absent nor a complete output: {sorted(p.name for p in target.iterdir())}")


def loads_or_refused(target: Path) -> None:
    """The target loads, or it is refused with one of our one-line errors (never a raw one)."""
    from stjax.cli import one_line
    from stjax.models.loading import load_pretrained

    try:
        load_pretrained(target)
    except Exception as e:
        assert type(e).__module__.startswith("stjax"), f"{target}: {type(e).__name__}: {e}"
        assert "\n" not in one_line(e)


@pytest.fixture(scope="module")
def models(hf_dirs, tmp_path_factory):
    """Two different HF models, their stjax conversions and the HF exports those give (the references:
    a and b sharded, b also in one file)."""
    root = tmp_path_factory.mktemp("kill")
    a_hf, b_hf = hf_dirs("qwen2_vl")[0], hf_dirs("qwen2_vl", "bfloat16")[0]
    hf_to_stjax(a_hf, root / "a-stjax")
    hf_to_stjax(b_hf, root / "b-stjax")
    stjax_to_hf(root / "a-stjax", root / "a", max_shard_bytes=50_000)
    stjax_to_hf(root / "b-stjax", root / "b", max_shard_bytes=50_000)
    stjax_to_hf(root / "b-stjax", root / "b-one-file")  # as the trainer's export writes it
    return root, a_hf, b_hf


def test_killed_conversions_leave_the_old_or_the_new_model(models, tmp_path):
    root, a_hf, b_hf = models
    rng = random.Random(15)
    seen = []
    for i, signum in enumerate(KILLS):  # stjax -> HF over an existing export of the other model
        target = tmp_path / f"hf{i}"
        stjax_to_hf(root / "a-stjax", target, max_shard_bytes=50_000)
        kill_while_writing(
            [
                sys.executable,
                "convert/to_hf.py",
                str(root / "b-stjax"),
                str(target),
                "--overwrite",
                "--max-shard-size",
                "50000",
            ],
            writing(target),
            1.0,
            rng,
            signum,
        )
        seen.append(one_of(target, [root / "a", root / "b"]))
        loads_or_refused(target)
    for i, signum in enumerate(KILLS):  # HF -> stjax into a fresh directory
        target = tmp_path / f"stjax{i}"
        kill_while_writing(
            [sys.executable, "convert/to_stjax.py", str(b_hf), str(target)], writing(target), 1.0, rng, signum
        )
        if target.exists():
            stjax_to_hf(target, tmp_path / f"check{i}", max_shard_bytes=50_000)
            assert one_of(tmp_path / f"check{i}", [root / "b"]) == "b"
        loads_or_refused(target)
    print("outcomes:", seen)


EXPORT = """
import sys
from stjax.models.loading import load_pretrained
from stjax.train.loop import export_hf
model, _ = load_pretrained(sys.argv[1])
export_hf(model, sys.argv[2], sys.argv[3])
"""


def test_a_killed_export_leaves_the_previous_export_or_the_new_one(models, tmp_path):
    root, a_hf, b_hf = models
    rng = random.Random(16)
    for i, signum in enumerate(KILLS):
        target = tmp_path / f"hf{i}"
        stjax_to_hf(root / "a-stjax", target, max_shard_bytes=50_000)
        kill_while_writing(
            [sys.executable, "-c", EXPORT, str(b_hf), str(target), str(b_hf)], writing(target), 0.5, rng, signum
        )
        assert one_of(target, [root / "a", root / "b-one-file"]) in ("a", "b-one-file", "absent")
        loads_or_refused(target)


SAVES = """
import sys
import jax.numpy as jnp
from stjax.train.checkpoint import Checkpointer
checkpoints = Checkpointer(sys.argv[1], every=1, keep=2)
for step in range(1, 200):
    checkpoints.save(step, {"w": jnp.full((256, 256), float(step)), "step": jnp.asarray(step)}, None)
checkpoints.wait()
"""


def test_killed_checkpoint_saves_leave_checkpoints_that_restore(tmp_path):
    import jax
    import jax.numpy as jnp

    from stjax.train.checkpoint import Checkpointer, abstract_like

    rng = random.Random(17)
    abstract = abstract_like({"w": jnp.zeros((256, 256)), "step": jnp.asarray(0)})
    for i, signum in enumerate(KILLS + [signal.SIGKILL]):
        directory = tmp_path / f"ck{i}"
        kill_while_writing(
            [sys.executable, "-c", SAVES, str(directory)],
            lambda directory=directory: directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()),
            1.0,
            rng,
            signum,
        )
        checkpoints = Checkpointer(directory, every=1, keep=2)
        step, state = checkpoints.restore_latest(abstract, None)
        checkpoints.close()
        assert step >= 1 and int(state["step"]) == step
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full((256, 256), float(step)))
        assert not [p for p in directory.iterdir() if ".damaged-" in p.name]
        jax.clear_caches()


def test_a_killed_evaluation_resumes_to_the_same_records(tmp_path):
    from stjax.data.synthetic import generate
    from stjax.data.tokenizer import tiny_model_dir
    from stjax.eval.mcq import load_records

    data = generate(tmp_path / "data", 1, seed=0, sheet=0)
    model = tiny_model_dir(data / "tokenizer", tmp_path / "model", "qwen2_5_vl", seed=0)
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "stjax.eval.mcq",
        "--model",
        str(model),
        "--data",
        str(data / "plain.jsonl"),
        "--out",
        str(out),
        "--batch-size",
        "1",
        "--mode",
        "logits",
        "--num-frames",
        "4",
        "--max-pixels",
        "12544",
    ]
    rng = random.Random(18)
    predictions = out / "predictions.jsonl"
    kill_while_writing(args, lambda: predictions.exists() and predictions.stat().st_size > 0, 1.0, rng, signal.SIGKILL)
    records = load_records(predictions)  # repairs a line cut short
    assert all({"id", "pred", "gold"} <= r.keys() for r in records)
    assert not (out / "accuracy.json").exists() or json.loads((out / "accuracy.json").read_text())
    result = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    ids = [r["id"] for r in load_records(predictions)]
    assert len(ids) == len(set(ids)) == 6
