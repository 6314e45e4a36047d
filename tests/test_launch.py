"""launch/submit.py's argument handling: Slurm time limits and memory sizes as sbatch writes them, counts,
the signal delay; each bad one a one-line argparse error."""

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("submit", ROOT / "launch" / "submit.py")
submit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(submit)


@pytest.mark.parametrize(
    "text, minutes",
    [
        ("90", 90),  # minutes
        ("5:30", 6),  # MM:SS, rounded up to whole minutes as Slurm does
        ("0:45", 1),
        ("00:30:00", 30),  # HH:MM:SS
        ("01:00:01", 61),
        ("2-0", 2880),  # D-HH
        ("1-02:30", 1590),  # D-HH:MM
        ("1-00:00:30", 1441),  # D-HH:MM:SS
        (" 15 ", 15),
    ],
)
def test_slurm_time_limits_parse_as_sbatch_reads_them(text, minutes):
    assert submit.slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["-5", "0", "00:00:00", "1:2:3:4", "1h", "", "1-", "1.5", "UNLIMITED", "a-01"])
def test_bad_time_limits_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        submit.slurm_minutes(text)


def _submit(*args):
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "launch" / "submit.py"),
            "configs/demo.yaml",
            *args,
            "--dry-run",
            "--no-data-check",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_time_limit_reaches_the_job_parameters_and_bad_ones_are_one_line():
    def run(*args) -> tuple[int, str, str]:
        proc = _submit(*args)
        out, err = proc.communicate(timeout=120)
        return proc.returncode, out, err

    code, out, err = run("--time", "1-02:30:00")
    assert code == 0, err
    assert "  time: 1590\n" in out
    code, _, err = run("--time", "90m")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "submit.py: error: argument --time: '90m' is not a Slurm time limit; write minutes (90), MM:SS, "
        "HH:MM:SS (01:30:00), D-HH, D-HH:MM or D-HH:MM:SS (2-00:00:00)"
    )


@pytest.mark.parametrize(
    "text, value", [("240G", "240G"), ("512000", "512000"), ("16g", "16g"), (" 2T ", "2T"), ("0", "0")]
)
def test_memory_sizes_as_sbatch_takes_them(text, value):
    assert submit.slurm_mem(text) == value


@pytest.mark.parametrize("text", ["lots", "", "1.5G", "240GB", "G", "-1G", "240 G", "1e3"])
def test_bad_memory_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        submit.slurm_mem(text)


_BAD_MEM = (
    "is not a Slurm memory size; write a whole number with an optional K, M, G or T suffix "
    "(240G, 512000; megabytes without a suffix)"
)
# Each bad invocation, and the last line it must print on stderr (exit status 2).
_CASES = {
    "nodes 0": (["--nodes", "0"], "argument --nodes: '0' must be a positive whole number (1 or more)"),
    "nodes two": (["--nodes", "two"], "argument --nodes: 'two' is not a whole number"),
    "tasks 0": (
        ["--tasks-per-node", "0"],
        "argument --tasks-per-node: '0' must be a positive whole number (1 or more)",
    ),
    "cpus -1": (
        ["--cpus-per-task", "-1"],
        "argument --cpus-per-task: '-1' must be a positive whole number (1 or more)",
    ),
    "gpus -1": (["--gpus-per-node", "-1"], "argument --gpus-per-node: '-1' must be a whole number >= 0"),
    "requeues -1": (["--max-requeues", "-1"], "argument --max-requeues: '-1' must be a whole number >= 0"),
    "mem lots": (["--mem", "lots"], f"argument --mem: 'lots' {_BAD_MEM}"),
    "mem 1.5G": (["--mem", "1.5G"], f"argument --mem: '1.5G' {_BAD_MEM}"),
    "signal 0": (["--signal-delay", "0"], "argument --signal-delay: '0' must be a positive whole number (1 or more)"),
    "signal = time": (
        ["--signal-delay", "3600"],
        "argument --signal-delay: 3600 s is not shorter than the time limit --time (60 min = 3600 s): "
        "the job would be asked to stop before it started",
    ),
    "signal > time": (
        ["--time", "0:45", "--signal-delay", "90"],
        "argument --signal-delay: 90 s is not shorter than the time limit --time (1 min = 60 s): "
        "the job would be asked to stop before it started",
    ),
}


@pytest.fixture(scope="module")
def submitted():
    """Every case through the real script, the processes run side by side: name -> (exit status, stdout, stderr)."""
    procs = {name: _submit(*args) for name, (args, _) in _CASES.items()}
    procs["ok"] = _submit("--nodes", "1", "--mem", "16g", "--gpus-per-node", "0", "--signal-delay", "59", "--time", "1")
    outputs = {name: p.communicate(timeout=120) for name, p in procs.items()}
    return {name: (procs[name].returncode, *outputs[name]) for name in procs}


@pytest.mark.parametrize("name", list(_CASES))
def test_bad_job_parameters_are_one_line_errors(submitted, name):
    rc, _, err = submitted[name]
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"submit.py: error: {_CASES[name][1]}"


def test_good_job_parameters_reach_the_job(submitted):
    rc, out, err = submitted["ok"]
    assert rc == 0, err
    assert "  mem: 16g\n" in out and "  signal_delay_s: 59\n" in out and "  time: 1\n" in out
    assert "gpus_per_node" not in out  # 0 GPUs: none requested
