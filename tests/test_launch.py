"""launch/submit.py's argument handling: Slurm time limits as sbatch writes them."""

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


def test_the_time_limit_reaches_the_job_parameters_and_bad_ones_are_one_line():
    def run(*args):
        return subprocess.run(
            [
                sys.executable,
                str(ROOT / "launch" / "submit.py"),
                "configs/demo.yaml",
                *args,
                "--dry-run",
                "--no-data-check",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = run("--time", "1-02:30:00")
    assert ok.returncode == 0, ok.stderr
    assert "  time: 1590\n" in ok.stdout
    bad = run("--time", "90m")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "submit.py: error: argument --time: '90m' is not a Slurm time limit; write minutes (90), MM:SS, "
        "HH:MM:SS (01:30:00), D-HH, D-HH:MM or D-HH:MM:SS (2-00:00:00)"
    )
