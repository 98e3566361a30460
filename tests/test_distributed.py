"""Two worker processes on localhost train together (MultiWorkerMirroredStrategy over CPU, TF_CONFIG),
as one process does with the same global batch; only the chief writes the run directory; a pair that
lost a worker mid-run finishes after a restart with ``--resume``."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from kprune.config import dump_yaml
from kprune.train import TrainConfig, train

SMALL = dict(model="yolov2", input_size=64, width=0.125, batch_size=8, lr=2e-3, seed=5)
KPRUNE = [sys.executable, "-c", "from kprune.cli import main; main()"]


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_pair(config_path, tmp_path, tag, resume=False):
    """Two ``kprune train`` processes, worker 0 (the chief) and worker 1, each with its scratch TMPDIR."""
    hosts = [f"localhost:{port}" for port in free_ports(2)]
    workers = []
    for index in (0, 1):
        scratch = tmp_path / f"scratch-{tag}-{index}"
        scratch.mkdir()
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(scratch),
               "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})}
        log = open(tmp_path / f"{tag}-{index}.log", "w")
        args = [*KPRUNE, "train", str(config_path), *(["--resume"] if resume else [])]
        workers.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
    return workers


def finish(workers, tmp_path, tag, timeout=300):
    for index, worker in enumerate(workers):
        code = worker.wait(timeout=timeout)
        assert code == 0, (tmp_path / f"{tag}-{index}.log").read_text()[-3000:]


def losses(run):
    return [[float(row[key]) for key in ("loss", "val_loss")] for row in csv.DictReader(open(run / "log.csv"))]


@pytest.mark.distributed
def test_two_workers_train_like_one_with_the_same_global_batch_and_only_the_chief_writes(tiny_synth_data, tmp_path):
    values = dict(SMALL, dataset=tiny_synth_data, epochs=1)
    train(TrainConfig(**values, out=str(tmp_path / "one")), progress=False)
    dump_yaml(dict(values, out=str(tmp_path / "two"), distribution="multi-worker"), tmp_path / "two.yaml")
    finish(start_pair(tmp_path / "two.yaml", tmp_path, "two"), tmp_path, "two")

    # each worker computes half of every global batch of 8; batch norm and gradients are reduced
    # over both, so the pair trains as one process does, up to float summation order (one epoch:
    # two Adam steps, whose near-sign updates can flip on a gradient component near zero)
    (train_one, val_one), = losses(tmp_path / "one")
    (train_two, val_two), = losses(tmp_path / "two")
    assert train_two == pytest.approx(train_one, rel=1e-2)
    assert val_two == pytest.approx(val_one, rel=1e-3)
    # the chief wrote what one process writes; worker 1 said where its own files went and removed them
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "worker 1 (not the chief): the chief writes the run directory" in (tmp_path / "two-1.log").read_text()
    assert "not the chief" not in (tmp_path / "two-0.log").read_text()
    assert list((tmp_path / "scratch-two-1").iterdir()) == []


@pytest.mark.distributed
def test_a_pair_that_lost_a_worker_finishes_after_a_restart_with_resume(tiny_synth_data, tmp_path):
    out = tmp_path / "run"
    dump_yaml(dict(SMALL, dataset=tiny_synth_data, epochs=3, out=str(out), distribution="multi-worker"),
              tmp_path / "pair.yaml")
    chief, worker = start_pair(tmp_path / "pair.yaml", tmp_path, "first")
    state = out / "state.json"
    deadline = time.monotonic() + 300
    while not (state.is_file() and json.loads(state.read_text())["epoch"] >= 1):
        assert chief.poll() is None and time.monotonic() < deadline, (tmp_path / "first-0.log").read_text()[-3000:]
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # the chief's next collective fails without its peer: it stops, saying how to go on
    chief.wait(timeout=120)
    said = (tmp_path / "first-0.log").read_text()
    assert chief.returncode == 1 and "Traceback" not in said, said[-3000:]
    assert "the multi-worker cluster lost a worker in epoch" in said and "again with --resume" in said
    interrupted = json.loads(state.read_text())["epoch"]
    assert 1 <= interrupted < 3 and not (out / "metrics.json").exists()

    finish(start_pair(tmp_path / "pair.yaml", tmp_path, "again", resume=True), tmp_path, "again")
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3
    assert [row["epoch"] for row in csv.DictReader(open(out / "log.csv"))][-(3 - interrupted):] == \
        [str(e) for e in range(interrupted, 3)]


EXPERIMENT = textwrap.dedent("""
    import sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kprune.experiment import Experiment, load_config
    Experiment(load_config(sys.argv[1]), progress=False, log=print).run()
""")


@pytest.mark.distributed
def test_an_experiment_trains_its_baseline_cells_and_control_with_the_configured_strategy(tiny_synth_data, tmp_path):
    """``distribution`` of the baseline's training settings serves the baseline and the dense control;
    the cells train on one device and say so."""
    train_values = dict(SMALL, epochs=1, distribution="mirrored")
    dump_yaml({"name": "mirrored", "dataset": tiny_synth_data, "baseline": {"train": train_values},
               "sweep": [{"method": "filters", "allocation": "uniform", "criterion": "l1", "ratios": [0.5]},
                         {"method": "global", "ratios": [0.5]}],
               "retrain": {"epochs": 1}, "export": ["none"], "latency_runs": 1, "samples": 0,
               "out": str(tmp_path / "run")}, tmp_path / "experiment.yaml")
    script = tmp_path / "experiment.py"
    script.write_text(EXPERIMENT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "experiment.yaml")], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    replicas = {p.parent.parent.relative_to(run).as_posix(): json.loads(p.read_text())["replicas"]
                for p in run.rglob("run/metrics.json")}
    assert replicas == {"baseline": 2, "controls/dense-1ep": 2, "cells/filters-uniform-l1-0.5": 1,
                        "cells/global-0.5": 1}
    for cell in ("filters-uniform-l1-0.5", "global-0.5"):
        assert f"{cell}: trains on one device (cells do not use the mirrored strategy" in result.stdout
