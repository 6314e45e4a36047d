"""The trainer on several processes: `torchrun --nproc_per_node=2` with gloo, as a user runs it.

Every run here is a real torchrun launch of `usjepa train` on the tiny model; the checks are
the ones a user makes: the TensorBoard losses, the checkpoints on disk, the exit status.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from usjepa import rundir
from usjepa.config import load_config
from usjepa.train.loop import Trainer
from usjepa.train.meter import module_gib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
COMMON = [f"train.total_steps={STEPS}", "checkpoint.every_steps=4", "data.streams=2", "data.num_workers=1"]


def command(nproc: int, overrides: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "usjepa", "train", "configs/demo.yaml", *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "usjepa",
        "train",
        "configs/demo.yaml",
        *overrides,
    ]


def launch(nproc: int, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command(nproc, overrides),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(nproc: int, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = launch(nproc, overrides)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def losses(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    pointer = run_dir / "checkpoints" / "latest"
    while time.monotonic() < deadline:
        if pointer.is_file() and int(pointer.read_text().strip().split("_")[1]) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before checkpoint {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no checkpoint {step} within {timeout} s")


def assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-7) for s in a), (a, b)


def reference_run(tmp_path_factory, tiny_overrides, objective: str) -> tuple[Path, str]:
    """An uninterrupted 2-rank run and what it printed."""
    run_dir = tmp_path_factory.mktemp(f"reference_{objective}") / "run"
    out = run(2, [*tiny_overrides, *COMMON, f"train.objective={objective}", f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stdout[-3000:]
    assert "global batch 8 = 2 rank(s) x 4" in out.stdout and "(FSDP2, sharded over 2 ranks)" in out.stdout
    return run_dir, out.stdout


@pytest.fixture(scope="module")
def reference(tiny_overrides, tmp_path_factory) -> Path:
    run_dir, out = reference_run(tmp_path_factory, tiny_overrides, "salt")
    assert "teacher none: bfloat16, replicated" in out
    return run_dir


@pytest.fixture(scope="module")
def ema_reference(tiny_overrides, tmp_path_factory) -> Path:
    run_dir, out = reference_run(tmp_path_factory, tiny_overrides, "ema")
    # The EMA target is sharded like the student: each rank holds about half of it.
    single = Trainer(
        load_config(
            "configs/demo.yaml",
            [*tiny_overrides, *COMMON, "train.objective=ema", f"run.dir={run_dir.parent / 'probe_size'}"],
        )
    )
    whole = 1024 * module_gib(single.ema_target)
    per_rank = float(re.search(r"EMA target .*sharded like the student, ([\d.e-]+) MiB per rank", out).group(1))
    assert per_rank == pytest.approx(whole / 2, rel=0.1), (per_rank, whole)
    return run_dir


def student_state(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The student of a finished run, loaded (resharded) into one process."""
    trainer = Trainer(load_config("configs/demo.yaml", overrides))
    return {k: v.clone() for k, v in trainer.student.state_dict().items()}


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """`value` without the key third of an attention's qkv bias. A key bias adds the same
    q.b to every logit of a query, which softmax cancels: its true gradient is zero, so what
    it receives is rounding noise, which AdamW scales up to steps of about lr that differ
    between any two summation orders."""
    if not name.endswith("attn.qkv.bias"):
        return value
    q, _, v = value.chunk(3)
    return torch.cat([q, v])


def test_two_ranks_train_like_one_process_with_the_same_global_batch(reference, tiny_overrides, tmp_path):
    # One process, and the global batch in 4 micro-batches: the same mean loss and gradient.
    single = tmp_path / "single"
    out = run(1, [*tiny_overrides, *COMMON, f"run.dir={single}", "data.micro_batch_size=2"])
    assert out.returncode == 0, out.stdout[-3000:]
    assert_same_losses(losses(reference), losses(single))
    # validation, split by batches over the 2 ranks (one pads with placeholder passes): the same
    assert losses(reference, "val/loss") == pytest.approx(losses(single, "val/loss"), rel=1e-5)
    assert sorted(losses(reference, "val/loss")) == [4, 8, 12]
    a = student_state([*tiny_overrides, *COMMON, f"run.dir={reference}"])
    b = student_state([*tiny_overrides, *COMMON, f"run.dir={single}"])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            without_key_bias(key, a[key]), without_key_bias(key, b[key]), rtol=1e-4, atol=1e-6, msg=key
        )
    for tag in ("perf/data_s", "perf/teacher_s", "perf/student_s", "perf/optimizer_s", "perf/peak_memory_gib"):
        assert len(losses(reference, tag)) == STEPS, tag
    meta = rundir.read_meta(rundir.latest_checkpoint(reference))
    assert meta["world_size"] == 2 and len(meta["rng"]) == 2 and meta["samples_seen"] == STEPS * 8


@pytest.mark.parametrize("objective", ["salt", "ema"])
def test_kill_9_twice_then_restart_gives_the_uninterrupted_losses(request, tiny_overrides, tmp_path, objective):
    reference = request.getfixturevalue("reference" if objective == "salt" else "ema_reference")
    run_dir = tmp_path / "killed"
    overrides = [*tiny_overrides, *COMMON, f"train.objective={objective}", f"run.dir={run_dir}"]
    for checkpoint in (4, 8):  # killed, resumed, killed again: the second start is itself a resume
        proc = launch(2, overrides)
        wait_for_checkpoint(proc, run_dir, checkpoint)
        for pid in [*worker_ranks(proc.pid).values(), proc.pid]:  # the whole job at once, like a lost node
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed_at = rundir.read_meta(rundir.latest_checkpoint(run_dir))["step"]
    assert 8 <= killed_at < STEPS
    out = run(2, overrides)
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"resuming {run_dir} from step {killed_at}" in out.stdout
    assert_same_losses(losses(reference), losses(run_dir))


@pytest.mark.parametrize("target", ["usr2-to-rank-1", "term-to-torchrun"])
def test_a_stop_signal_saves_the_current_step_on_every_rank(reference, tiny_overrides, tmp_path, target):
    run_dir = tmp_path / "signalled"
    overrides = [*tiny_overrides, *COMMON, f"run.dir={run_dir}", "checkpoint.every_steps=100"]
    proc = launch(2, overrides)
    wait_for_signal_ready = time.monotonic() + 120
    ranks = {}
    while len(ranks) < 2 and time.monotonic() < wait_for_signal_ready:  # the two worker processes
        ranks = worker_ranks(proc.pid)
        time.sleep(0.05)
    while not (run_dir / "tb").is_dir() or not losses_so_far(run_dir):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    if target == "usr2-to-rank-1":
        os.kill(ranks[1], signal.SIGUSR2)  # as Slurm's --signal does to one task; rank 0 hears nothing
    else:
        os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it to its workers, then waits 30 s
    out, _ = proc.communicate(timeout=120)
    name = "SIGUSR2" if target == "usr2-to-rank-1" else "SIGTERM"
    if target == "usr2-to-rank-1":
        # Stopped before its end: the ranks exit 3 (saved, rerun to continue), which torchrun
        # reports as a failed worker group (its own status 1); its own SIGTERM it reports as such.
        assert proc.returncode == 1 and "exitcode  : 3" in out, out[-3000:]
    saved = rundir.read_meta(rundir.latest_checkpoint(run_dir))["step"]
    assert 0 < saved < STEPS, out[-2000:]  # stopped early, at a step that is not a checkpoint step
    assert max(losses(run_dir)) == saved  # the last logged step is in the checkpoint: nothing lost
    assert f"{name} received; saved step {saved} and stopped" in out
    out = run(2, [o for o in overrides if not o.startswith("checkpoint.")] + ["checkpoint.every_steps=4"])
    assert out.returncode == 0, out.stdout[-3000:]
    assert_same_losses(losses(reference), losses(run_dir))


def worker_ranks(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes."""
    found = {}
    for child in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(child)
    return found


def losses_so_far(run_dir: Path) -> dict[int, float]:
    try:
        return losses(run_dir)
    except KeyError:  # no train/loss event yet
        return {}


@pytest.mark.parametrize("first, second, objective", [(2, 1, "salt"), (1, 2, "salt"), (2, 1, "ema")])
def test_a_checkpoint_continues_on_another_world_size(request, tiny_overrides, tmp_path, first, second, objective):
    # For the EMA baseline the target encoder's shards are resharded too.
    reference = request.getfixturevalue("reference" if objective == "salt" else "ema_reference")
    run_dir = tmp_path / f"from{first}to{second}"
    overrides = [*tiny_overrides, *COMMON, f"train.objective={objective}", f"run.dir={run_dir}"]
    out = run(first, [*overrides, "run.stop_at_step=4"])
    assert out.returncode == 0, out.stdout[-3000:]
    # The second leg recomputes activations (under FSDP2 in 1 -> 2): the same losses still.
    out = run(second, [*overrides, "train.activation_checkpointing=true"])
    assert out.returncode == 0, out.stdout[-3000:]
    assert f"resharded from {first} to {second} ranks" in out.stdout
    assert_same_losses(losses(reference), losses(run_dir))


def test_uneven_shards_and_a_corrupt_sample_on_two_ranks(uneven_shards, tiny_overrides, tmp_path):
    from test_pipeline import _corrupt_first_train_shard

    broken = _corrupt_first_train_shard(uneven_shards, tmp_path / "broken")
    run_dir = tmp_path / "run"
    args = [*tiny_overrides, *COMMON, f"data.shards={broken}", "data.streams=4"]
    refused = run(2, [*args, f"run.dir={tmp_path / 'refused'}"])
    assert refused.returncode != 0 and "sha256 differs from the manifest" in refused.stdout, refused.stdout[-3000:]
    assert "/usjepa/" not in refused.stdout  # a one-line error, no traceback of ours
    out = run(2, [*args, "data.on_bad_shard=skip", f"run.dir={run_dir}"])
    assert out.returncode == 0, out.stdout[-3000:]
    assert max(losses(run_dir, "data/corrupt_skipped").values()) > 0
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))


def test_too_few_shards_for_the_streams_is_a_one_line_error(tiny_overrides, tmp_path):
    out = run(2, [*tiny_overrides, *COMMON, "data.streams=16", "data.batch_size=16", f"run.dir={tmp_path / 'run'}"])
    assert out.returncode != 0
    assert "usjepa train: error (rank 0): " in out.stdout
    assert "data.streams=16 (at least ranks x data.num_workers) needs at least 16" in out.stdout
    assert "/usjepa/" not in out.stdout  # torchrun reports the failed ranks; no traceback of ours


def test_the_one_node_launcher_script(reference, tiny_overrides, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [str(REPO / "launch" / "torchrun.sh"), "configs/demo.yaml", *tiny_overrides, *COMMON, f"run.dir={run_dir}"],
        cwd=REPO,
        env={**os.environ, "NPROC": "2", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "global batch 8 = 2 rank(s) x 4" in out.stderr
    assert_same_losses(losses(reference), losses(run_dir))
