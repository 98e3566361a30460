"""Importing kprune._keras hides TensorFlow's C++ start-up log, and nothing else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kprune import _keras

REPO = Path(__file__).resolve().parents[1]
STARTUP_LINES = ("All log messages before absl::InitializeLog() is called", "cudart_stub.cc",
                 "Could not find cuda drivers", "port.cc", "oneDNN custom operations are on",
                 "cpu_feature_guard.cc")
NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
INFO = b"I0000 00:00:1796285265.778342    2434 port.cc:153] oneDNN custom operations are on.\n"
WARNING = b"W0000 00:00:1796285265.779998    2434 env.cc:7] a C++ warning\n"
ERROR = b"E0514 12:34:56.789012    2434 cuda_platform.cc:52] a C++ error\n"
NO_DRIVER = (b"E0000 00:00:1796341556.740408   23119 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
             b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
FATAL = b"F0000 00:00:1796285265.779998    2434 check.cc:1] Check failed: x\n"
PYTHON = b"/x/y.py:3: UserWarning: a Python warning\n  warnings.warn('a Python warning')\n"


def run_import(**env) -> subprocess.CompletedProcess:
    """`import kprune._keras`, a first TensorFlow op, then a Python warning, in a process without any
    TF_* variable."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "PYTHON"))}
    code = ("import warnings, kprune._keras; kprune._keras.tf.constant(1.0) + 1.0; "
            "warnings.warn('emitted after the import')")
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_import_prints_no_startup_log_but_later_warnings_appear():
    result = run_import()
    assert result.returncode == 0, result.stderr
    assert [line for line in STARTUP_LINES if line in result.stderr] == []
    assert result.stderr == "<string>:1: UserWarning: emitted after the import\n"


def test_a_user_set_log_level_still_wins():
    result = run_import(TF_CPP_MIN_LOG_LEVEL="0")
    assert result.returncode == 0, result.stderr
    # libtensorflow_framework.so.2 and _pywrap_profiler_plugin.so each hold a copy of Abseil: two notices
    assert result.stderr.count("All log messages before absl::InitializeLog() is called") == 2
    assert result.stderr.count("oneDNN custom operations are on") == 2
    assert result.stderr.endswith("<string>:1: UserWarning: emitted after the import\n")


@pytest.mark.parametrize("level, expected", [
    (0, NOTICE + INFO + WARNING + ERROR + FATAL + PYTHON),
    (1, WARNING + ERROR + FATAL + PYTHON),
    (2, ERROR + FATAL + PYTHON),
    (3, FATAL + PYTHON),
    (7, FATAL + PYTHON),
])
def test_filter_drops_only_log_lines_below_the_level(level, expected):
    assert _keras._filter_log(NOTICE + INFO + WARNING + ERROR + FATAL + PYTHON, level) == expected


@pytest.mark.parametrize("driver, expected", [(False, WARNING + PYTHON), (True, WARNING + NO_DRIVER + PYTHON)])
def test_cuinit_failure_is_dropped_only_where_there_is_no_nvidia_driver(monkeypatch, driver, expected):
    monkeypatch.setattr(_keras.os.path, "exists", lambda path: driver and path == "/dev/nvidiactl")
    assert _keras._filter_log(WARNING + NO_DRIVER + PYTHON, 1) == expected


@pytest.mark.parametrize("value, level", [("2", 2), (" 3", 3), ("1abc", 1), ("abc", 0), ("", 0), ("-1", -1)])
def test_log_level_is_read_as_tensorflow_reads_it(monkeypatch, value, level):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", value)
    assert _keras._min_log_level() == level


def test_captured_stderr_is_passed_on_filtered_even_when_the_block_fails(capfd):
    with _keras._startup_log_filtered(2):
        os.write(2, NOTICE + INFO + ERROR)
        os.write(2, PYTHON)
    os.write(2, b"after the block\n")
    assert capfd.readouterr().err == (ERROR + PYTHON + b"after the block\n").decode()
    with pytest.raises(ImportError, match="no such module"):
        with _keras._startup_log_filtered(2):
            os.write(2, INFO + b"Traceback: the real reason\n")
            raise ImportError("no such module")
    os.write(2, b"stderr restored\n")
    assert capfd.readouterr().err == "Traceback: the real reason\nstderr restored\n"
