"""Launcher detection (pure) and real 2-process gloo runs under torchrun and a fake Slurm step."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from usjepa.errors import UserError
from usjepa.train.distributed import (
    DistEnv,
    barrier,
    detect_env,
    expand_nodelist,
    init_distributed,
    is_main,
    shutdown_distributed,
    slurm_master_port,
)

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


# --------------------------------------------------------------------------- nodelist parser


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("n1", ["n1"]),
        ("localhost", ["localhost"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2]-ib,b3", ["a1-ib", "a2-ib", "b3"]),
        ("node[001-002]x", ["node001x", "node002x"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[5]", ["n5"]),
        ("n1,n2,n3", ["n1", "n2", "n3"]),
        ("gpu[1,3],cpu[01-02],login", ["gpu1", "gpu3", "cpu01", "cpu02", "login"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node-1.cluster.org,node-2.cluster.org", ["node-1.cluster.org", "node-2.cluster.org"]),
        ("  n[1-2]\n", ["n1", "n2"]),
        ("[1-2]", ["1", "2"]),
    ],
)
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize(
    "text", ["", "   ", "n[1-3", "n1-3]", "n[[1]]", "n[3-1]", "n[a-b]", "n[]", "n[1-]", "n1,,n2", "n1,", "n[1,,2]"]
)
def test_expand_nodelist_rejects_malformed(text):
    with pytest.raises(UserError):
        expand_nodelist(text)


# --------------------------------------------------------------------------- detect_env

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29500"}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[03-04,09]",
    "HOSTNAME": "gpu04",
}


def test_single_process():
    assert detect_env({}) == DistEnv(0, 1, 0, None, None, "single")
    assert detect_env({"HOME": "/root", "WORLD_SIZE": "1"}).source == "single"
    # A one-task Slurm batch script or salloc shell is a plain single process.
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}).source == "single"
    assert detect_env({"SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}).source == "single"
    # Leftover MASTER_* alone do not make a distributed run.
    assert detect_env({"MASTER_ADDR": "x", "MASTER_PORT": "1"}).source == "single"


def test_torchrun():
    assert detect_env(TORCHRUN) == DistEnv(3, 8, 1, "node7", 29500, "torchrun")


def test_torchrun_wins_over_slurm():
    assert detect_env({**SLURM, **TORCHRUN}).source == "torchrun"


def test_torchrun_world_of_one_needs_no_master():
    assert detect_env({"RANK": "0", "WORLD_SIZE": "1"}) == DistEnv(0, 1, 0, None, None, "torchrun")


def test_slurm_multi_node():
    env = detect_env(SLURM)
    assert env == DistEnv(5, 8, 1, "gpu03", 10000 + 123456 % 20000, "slurm")
    assert env.master_addr != SLURM["HOSTNAME"]


def test_slurm_single_node():
    env = detect_env(
        {
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "42",
            "SLURM_JOB_NODELIST": "gpu17",
        }
    )
    assert env == DistEnv(1, 2, 1, "gpu17", 10042, "slurm")


def test_slurm_step_nodelist_is_preferred_and_inherited_master_ignored():
    env = detect_env(
        {
            **SLURM,
            "SLURM_STEP_NODELIST": "gpu[09,03]",
            "SLURM_STEP_ID": "0",
            "MASTER_ADDR": "gpu04",
            "MASTER_PORT": "29500",
        }
    )
    assert (env.master_addr, env.master_port, env.source) == ("gpu09", slurm_master_port(123456), "slurm")
    env = detect_env({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"} | {"SLURM_STEP_NODELIST": "a[2-3]"})
    assert env.master_addr == "a2"


def test_slurm_one_task_srun_step():
    env = detect_env(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
            "SLURM_STEP_ID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_JOB_ID": "9",
            "SLURM_JOB_NODELIST": "n1",
        }
    )
    assert (env.source, env.world_size, env.rank) == ("slurm", 1, 0)


@pytest.mark.parametrize("job_id, port", [(0, 10000), (1, 10001), (19999, 29999), (20000, 10000), (123456, 13456)])
def test_slurm_port_is_derived_from_job_id(job_id, port):
    assert slurm_master_port(job_id) == port
    env = detect_env({**SLURM, "SLURM_JOB_ID": str(job_id)})
    assert env.master_port == port
    # every task of the job derives the same rendezvous
    other = detect_env({**SLURM, "SLURM_JOB_ID": str(job_id), "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (other.master_addr, other.master_port) == (env.master_addr, env.master_port)


def _without(env: dict, *names: str) -> dict:
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize(
    "environ, named",
    [
        (_without(TORCHRUN, "WORLD_SIZE"), ["WORLD_SIZE"]),
        (_without(TORCHRUN, "MASTER_ADDR"), ["MASTER_ADDR"]),
        (_without(TORCHRUN, "MASTER_PORT"), ["MASTER_PORT"]),
        (_without(TORCHRUN, "LOCAL_RANK"), ["LOCAL_RANK"]),
        (_without(TORCHRUN, "MASTER_ADDR", "MASTER_PORT"), ["MASTER_ADDR", "MASTER_PORT"]),
        ({"RANK": "0"}, ["WORLD_SIZE"]),
        ({"RANK": "0", "WORLD_SIZE": ""}, ["WORLD_SIZE"]),
        ({"WORLD_SIZE": "4"}, ["RANK"]),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1", "LOCAL_RANK": "0"}, ["RANK"]),
        ({"SLURM_PROCID": "0"}, ["SLURM_NTASKS"]),
        (_without(SLURM, "SLURM_NTASKS"), ["SLURM_NTASKS"]),
        (_without(SLURM, "SLURM_JOB_NODELIST"), ["SLURM_JOB_NODELIST"]),
        (_without(SLURM, "SLURM_JOB_ID"), ["SLURM_JOB_ID"]),
        (_without(SLURM, "SLURM_LOCALID"), ["SLURM_LOCALID"]),
        (_without(SLURM, "SLURM_LOCALID", "SLURM_JOB_ID"), ["SLURM_LOCALID", "SLURM_JOB_ID"]),
    ],
)
def test_half_set_environment_is_refused(environ, named):
    with pytest.raises(UserError) as err:
        detect_env(environ)
    message = str(err.value)
    assert "\n" not in message
    for name in named:
        assert name in message
    assert "torchrun" in message or "srun" in message  # says how to fix it


@pytest.mark.parametrize(
    "environ",
    [
        {**TORCHRUN, "RANK": "8"},  # rank outside the world
        {**TORCHRUN, "WORLD_SIZE": "eight"},
        {**TORCHRUN, "MASTER_PORT": "70000"},
        {**TORCHRUN, "RANK": "-1"},
        {**SLURM, "SLURM_PROCID": "8"},
        {**SLURM, "SLURM_NTASKS": "0"},
        {**SLURM, "SLURM_JOB_NODELIST": "gpu[03-"},
    ],
)
def test_inconsistent_environment_is_refused(environ):
    with pytest.raises(UserError):
        detect_env(environ)


def test_detect_env_is_pure():
    environ = dict(SLURM)
    before = dict(os.environ)
    detect_env(environ)
    assert environ == SLURM and dict(os.environ) == before


def test_single_process_helpers_are_noops():
    env = init_distributed(torch.device("cpu"), DistEnv(0, 1, 0, None, None, "single"))
    assert env.world_size == 1 and not torch.distributed.is_initialized()
    assert is_main()
    barrier()
    shutdown_distributed()


# --------------------------------------------------------------------------- real 2-process runs

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from usjepa.train.distributed import barrier, init_distributed, is_main, shutdown_distributed

    env = init_distributed(torch.device("cpu"), timeout_s=60)
    t = torch.tensor([float(env.rank)])
    dist.all_reduce(t)
    barrier()
    out = {"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank, "source": env.source,
           "sum": t.item(), "main": is_main(), "pg_rank": dist.get_rank(), "pg_world": dist.get_world_size(),
           "master": [env.master_addr, env.master_port]}
    with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
        json.dump(out, f)
    shutdown_distributed()
""")

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")


def _clean_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _worker(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    return script, out


def test_two_processes_under_torchrun(tmp_path):
    script, out = _worker(tmp_path)
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(script),
        str(out),
    ]
    proc = subprocess.run(
        cmd, check=False, env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = _results(out, 2)
    for rank, res in enumerate(results):
        assert res["sum"] == 0 + 1
        assert res["source"] == "torchrun"
        assert (res["rank"], res["pg_rank"], res["world"], res["pg_world"]) == (rank, rank, 2, 2)
        assert res["local_rank"] == rank
        assert res["main"] == (rank == 0)
        assert res["master"] == ["127.0.0.1", port]


def test_two_processes_under_fake_slurm(tmp_path):
    script, out = _worker(tmp_path)
    rng = random.Random()
    for _ in range(50):
        job_id = rng.randrange(1, 10**7)
        if _port_free(slurm_master_port(job_id)):
            break
    else:
        pytest.skip("no free port in the Slurm-derived range")
    base = _clean_env() | {
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOB_NUM_NODES": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(out)],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=base | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    for rank, res in enumerate(_results(out, 2)):
        assert res["sum"] == 0 + 1
        assert res["source"] == "slurm"
        assert (res["rank"], res["pg_rank"], res["world"], res["local_rank"]) == (rank, rank, 2, rank)
        assert res["master"] == ["localhost", slurm_master_port(job_id)]
        assert res["main"] == (rank == 0)
