"""Reports: compressed sizes of known bytes, latency statistics, and `kprune report`."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from kprune.cli import main
from kprune.darknet.builder import build_model
from kprune.evaluate import evaluate_loaded
from kprune.models.io import save_model
from kprune.report.command import table
from kprune.report.latency import interleaved, latency_stats, time_calls
from kprune.models.counting import count_params
from kprune.report.metrics import compressed_sizes, file_sizes
from tests.conftest import cfg_path, randomize


def test_sizes_of_known_files(tmp_path):
    path = tmp_path / "known.bin"
    path.write_bytes(b"kprune" * 1000)
    # gzip -9 (no timestamp), bzip2 -9 and xz -6 of 6000 bytes repeating a 6-byte word
    assert file_sizes(path) == {"bytes": 6000, "gzip": 51, "bzip2": 55, "xz": 104}
    noise = np.random.default_rng(0).bytes(100_000)
    sizes = compressed_sizes(noise)
    assert sizes["bytes"] == 100_000 and all(sizes[k] > 100_000 for k in ("gzip", "bzip2", "xz"))  # incompressible
    with pytest.raises(ValueError, match="not a file"):
        file_sizes(tmp_path)


def test_latency_statistics():
    stats = latency_stats([0.004, 0.001, 0.003, 0.002])
    # p90 by linear interpolation between the 3rd and 4th of 1, 2, 3, 4 ms: 3 + 0.7
    assert stats == pytest.approx({"mean_ms": 2.5, "median_ms": 2.5, "p90_ms": 3.7, "min_ms": 1.0})
    calls = []
    result = time_calls(lambda: calls.append(1), runs=20, warmup=3)
    assert len(calls) == 23 and result["runs"] == 20 and result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    with pytest.raises(ValueError, match="runs 0"):
        time_calls(lambda: None, runs=0)
    # side by side: the warm-up of each pass, then one call of every pass per round
    order = []
    stats = interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=3, warmup=1)
    assert "".join(order) == "ab" + "ab" * 3 and stats["a"]["runs"] == stats["b"]["runs"] == 3


def test_report_command(tmp_path, tiny_synth_data):
    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=4, scale=0.05)
    kernel = model.get_layer("conv_12").kernel
    kernel.assign(np.zeros(kernel.shape, np.float32))  # zeros: fewer non-zero parameters, better compression
    path = tmp_path / "tiny.keras"
    save_model(model, path)
    result = CliRunner().invoke(main, ["report", str(path), "--data", tiny_synth_data, "--runs", "3", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    counts = count_params(model)
    assert row["params"] == counts["params"] and row["nonzero_params"] == counts["nonzero_params"]
    assert row["params"] - row["nonzero_params"] >= kernel.shape.num_elements()
    assert row["keras_size"]["bytes"] == os.path.getsize(path)
    assert row["keras_size"]["xz"] < row["keras_size"]["bytes"] and row["tflite"].startswith("float32")
    assert set(row["latency"]) == {"keras_1t", "keras_2t", "tflite_1t", "tflite_2t", "tflite_int8_1t", "tflite_int8_2t"}
    assert row["tflite_int8"] == "int8, calibrated on 16 dataset images for this report"  # all 16 train images
    assert all(v["runs"] == 3 and 0 < v["min_ms"] <= v["median_ms"] for v in row["latency"].values())
    scores = evaluate_loaded(model, tiny_synth_data)
    assert row["map50"] == scores["map50"] and row["coco_map"] == scores["coco_map"]
    lines = table([row]).splitlines()
    assert lines[0].split(" | ")[-4:] == ["tflite int8 1t ms", "tflite int8 2t ms", "mAP@0.5", "COCO mAP |"]
    cells = lines[2].split(" | ")
    assert cells[0] == "| tiny.keras" and cells[1] == f"{row['params']:,}" and cells[-2] == f"{row['map50']:.4f}"


def test_measure_a_model_in_memory(tmp_path, monkeypatch):
    from kprune._keras import keras
    from kprune.report.command import measure_model, report_models

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.25, classes=5)
    randomize(model, seed=4, scale=0.05)
    path = tmp_path / "tiny.keras"
    save_model(model, path)
    from_file = measure_model(str(path), threads=())

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(keras.models, "load_model", no_load)
    in_memory = measure_model(str(path), threads=(), model=model)
    assert in_memory == from_file  # the sizes come from the file, the counts from the model
    assert in_memory["keras_size"]["bytes"] == os.path.getsize(path)
    assert in_memory["params"] == count_params(model)["params"] and in_memory["latency"] == {}
    with pytest.raises(ValueError, match="1 models given for 2 paths"):
        report_models([path, path], threads=(), models=[model])
    with pytest.raises(ValueError, match="takes .keras models"):
        measure_model(str(tmp_path / "tiny.tflite"), threads=(), model=model)


def _row(name, latency):
    return {"model": name, "params": 1000, "nonzero_params": 900, "flops": 2.5e9,
            "keras_size": {"bytes": 4e6, "gzip": 3e6, "bzip2": 2.9e6, "xz": 2.8e6},
            "tflite_size": {"bytes": 4e6, "xz": 2.7e6},
            "latency": {key: {"median_ms": value} for key, value in latency.items()}}


def test_table_puts_int8_latency_beside_float():
    rows = [_row("runs/a.keras", {"keras_1t": 20.0, "tflite_1t": 9.04, "tflite_2t": 5.55, "tflite_int8_1t": 3.14,
                                  "tflite_int8_2t": 2.26})]
    head, _, line = table(rows).splitlines()
    assert head.split(" | ")[-4:] == ["tflite 1t ms", "tflite 2t ms", "tflite int8 1t ms", "tflite int8 2t ms |"]
    assert line.split(" | ")[-4:] == ["9.0", "5.5", "3.1", "2.3 |"]  # medians to 0.1 ms
    assert line.startswith("| a.keras | 1,000 | 900 | 2.500 | 4.00 | 3.00 | 2.90 | 2.80 | 4.00 | 2.70 | 20.0 |")


def test_int8_file_beside_the_model_is_used_and_unknown_int8_paths_refused(tmp_path):
    from kprune.report.command import int8_flatbuffer
    from kprune.report.latency import side_by_side

    (tmp_path / "m-int8.tflite").write_bytes(b"TFL3 as written")
    # the file as written is taken as it is: nothing converted (the model is not even looked at)
    assert int8_flatbuffer(None, str(tmp_path / "m.keras")) == (b"TFL3 as written", str(tmp_path / "m-int8.tflite"))
    with pytest.raises(ValueError, match="int8 files given for other.keras: not among the models timed"):
        side_by_side({"m.keras": (b"", None)}, threads=[1], int8={"other.keras": b""})


def test_experiment_tables_put_int8_latency_beside_float():
    from kprune.report.experiment import findings, flat_rows, headline_table, summary_rows

    def result(label, kind, flops, float_ms, int8_ms, map50):
        measure = {"params": 1000, "nonzero_params": 1000, "flops": flops,
                   "keras_size": {"bytes": 4e6, "gzip": 3e6, "bzip2": 3e6, "xz": 3e6}, "tflite_size": {"bytes": 4e6},
                   "latency": {"tflite_1t": {"median_ms": 2 * float_ms}, "tflite_2t": {"median_ms": float_ms},
                               "tflite_int8_1t": {"median_ms": 2 * int8_ms}, "tflite_int8_2t": {"median_ms": int8_ms}}}
        return {"label": label, "family": label, "kind": kind, "ratio": 0.0, "map50": map50, "coco_map": 0.5,
                "map50_pruned": None, "measure": measure, "control": "baseline",
                "export": {"none": {"bytes": 4e6, "map50": map50}, "int8": {"bytes": 1e6, "map50": map50 - 0.005}}}

    rows = [result("baseline", "baseline", 2e9, 9.0, 3.0, 0.80), result("filters-0.5", "cell", 1e9, 6.0, 2.4, 0.79)]
    flat = summary_rows(flat_rows(rows), spread=0.02)
    assert [(r["tflite_int8_1t_ms"], r["tflite_int8_2t_ms"], r["speedup_int8_2t"]) for r in flat] == [
        (6.0, 3.0, 3.0), (4.8, 2.4, 2.5)]
    head, _, base, cell = headline_table(flat).splitlines()
    columns = [c.strip() for c in head.strip("|").split("|")]
    assert columns[-5:] == ["TFLite 2t ms", "speed-up", "int8 2t ms", "int8 vs float", "int8 MB"]
    assert [c.strip() for c in cell.strip("|").split("|")][-5:] == ["6.0", "1.50x", "2.4", "2.50x", "1.00"]
    assert [c.strip() for c in base.strip("|").split("|")][-5:] == ["9.0", "1.00x", "3.0", "3.00x", "1.00"]
    assert ("int8 TFLite at 2 threads (timed in the same runs as float): the baseline 3.0 ms against 9.0 ms float "
            "(3.00x); the smallest int8 gain is 2.50x (filters-0.5).") in findings(flat)
