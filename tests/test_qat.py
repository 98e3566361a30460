"""Quantization-aware training: exact batch-norm folding, all-integer int8 export of the QAT model
and its agreement with Keras, and sparse kernels whose zeros survive QAT."""

import numpy as np
import pytest

from kprune import detectors
from kprune._keras import keras
from kprune.darknet.builder import build_model
from kprune.export.qat import fold_batch_norms, quantize_aware_train
from kprune.export.tflite import calibration_images, convert
from kprune.models.layers import DarknetBatchNormalization
from kprune.models.litert import TFLiteRunner, operators
from tests.conftest import cfg_path, randomize

QAT_OPTIONS = {"batch_size": 8, "steps_per_epoch": 2}


def _flat(outputs):
    return [o.numpy() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def _tiny_yolov2(seed=3):
    model = build_model(cfg_path("yolov2"), input_size=64, width=0.125, classes=5)
    randomize(model, seed=seed, scale=0.1)
    return model


@pytest.mark.parametrize("name", ["yolov2", "yolov4-tiny"])
def test_folded_batch_norm_is_exact(name):
    # yolov2: Darknet's (x - mean) / (sqrt(var) + 1e-6); yolov4-tiny: the fork's / sqrt(var + 1e-5)
    model = _tiny_yolov2() if name == "yolov2" else detectors.build(name, input_size=64, width=0.125, classes=5)
    randomize(model, seed=4, scale=0.1)  # variances down to 1e-4, where the formulas differ most
    formulas = {layer.formula for layer in model.layers if isinstance(layer, DarknetBatchNormalization)}
    assert formulas == {"original" if name == "yolov2" else "alexeyab"}
    folded = fold_batch_norms(model)
    norms = sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert norms > 0 and len(folded.layers) == len(model.layers) - norms
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in folded.layers)
    assert all(layer.use_bias for layer in folded.layers if isinstance(layer, keras.layers.Conv2D))
    x = np.random.default_rng(5).random((2, 64, 64, 3)).astype(np.float32)
    for expected, got in zip(_flat(model(x)), _flat(folded(x))):
        assert np.max(np.abs(expected)) > 0.1
        assert np.max(np.abs(expected - got)) < 1e-5, np.max(np.abs(expected - got))


def _is_integer(ops) -> bool:
    """Every op but the float input's QUANTIZE and the outputs' DEQUANTIZE on int8 tensors (int32
    only for biases, shapes and paddings)."""
    inner = [op for op in ops if not (op["op"] == "QUANTIZE" and op["inputs"] == ["float32"]
                                      or op["op"] == "DEQUANTIZE" and op["outputs"] == ["float32"])]
    return all(op["outputs"] == ["int8"] and set(op["inputs"]) <= {"int8", "int32"} for op in inner)


def _kernel(wrapper):
    """The float kernel variable under a QAT wrapper (the wrapped layer's ``kernel`` attribute is
    the fake-quantized tensor once the wrapper has been called)."""
    (kernel,) = [w for w in wrapper.weights if w.name.endswith("kernel:0")]
    return kernel.numpy()


def test_sparse_qat_model_converts_all_integer_keeps_zeros_and_matches_keras(tiny_synth_data, tmp_path):
    model = _tiny_yolov2(seed=6)
    zeros = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kernel = layer.kernel.numpy()
            kernel[np.abs(kernel) < np.quantile(np.abs(kernel), 0.6)] = 0.0  # 60 % unstructured sparsity
            layer.kernel.assign(kernel)
            zeros[layer.name] = kernel == 0
    qat, metrics = quantize_aware_train(model, tiny_synth_data, 1, {**QAT_OPTIONS, "lr": 1e-2},
                                        run_dir=str(tmp_path / "qat"))
    assert metrics["epochs"] == 1 and (tmp_path / "qat" / "log.csv").is_file()
    assert detectors.family_of(qat).name == "yolo"  # the head stays a head: the exporter reads its metadata
    changed = kept = 0
    for layer in qat.layers:
        name = getattr(layer, "layer", layer).name
        if name in zeros:
            trained, mask = _kernel(layer), zeros[name]
            assert np.all(trained[mask] == 0.0), name  # exactly zero, every one (prune-preserving QAT)
            kept += int(np.sum(~mask))
            changed += int(np.sum(trained[~mask] != model.get_layer(name).kernel.numpy()[~mask]))
    assert changed > 0.5 * kept  # while the other weights did train

    content = convert(qat, "int8", calibration_images(tiny_synth_data, 16, "train", 64))
    ops = operators(content)
    assert _is_integer(ops), ops
    assert {op["op"] for op in ops} >= {"CONV_2D", "LEAKY_RELU", "SPACE_TO_DEPTH", "CONCATENATION", "MAX_POOL_2D"}
    # the int8 file stores the zeros too: its conv filters hold at least as many zeros as the model had
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    filters = [interpreter.get_tensor(d["index"]) for d in interpreter.get_tensor_details()
               if d["dtype"] == np.int8 and len(d["shape"]) == 4 and "conv" in d["name"] and d["shape"][0] > 0
               and not d["shape_signature"][0] < 0]
    assert sum(int(np.sum(f == 0)) for f in filters) >= sum(int(np.sum(z)) for z in zeros.values())

    images = calibration_images(tiny_synth_data, 8, "val", 64)
    expected = _flat(qat(images, training=False))[0]
    got = TFLiteRunner(content, qat)(images)[0]
    # the QAT model computes what the int8 file computes up to integer rounding, which flips single
    # steps along 23 layers: measured max 1.9 %, mean 0.8 % of the output's size
    assert np.max(np.abs(got - expected)) < 0.05 * np.max(np.abs(expected))
    assert np.mean(np.abs(got - expected)) < 0.02 * np.mean(np.abs(expected))


def _export(*args):
    from click.testing import CliRunner

    from kprune.cli import main

    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def test_export_with_qat_and_ptq_options(tiny_synth_data, tmp_path):
    import json

    from kprune.models.io import save_model

    model = build_model(cfg_path("yolov2-tiny"), input_size=64, width=0.125, classes=5)
    randomize(model, seed=12, scale=0.1)
    path = tmp_path / "tiny.keras"
    save_model(model, path)
    config = tmp_path / "train.yaml"
    config.write_text("batch_size: 8\nsteps_per_epoch: 1\nepochs: 30\nlr: 0.004\n")  # epochs and lr: QAT's own
    out = tmp_path / "qat.tflite"
    result = _export(path, "--quant", "int8", "--data", tiny_synth_data, "--qat-epochs", 1, "--qat-config", config,
                     "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["qat"]["epochs"] == 1 and report["qat"]["run"] == str(tmp_path / "qat.qat")
    assert (tmp_path / "qat.qat" / "log.csv").read_text().count("\n") == 2  # a header and one epoch
    assert _is_integer(operators(out.read_bytes()))
    check = report["check"]  # against the QAT model: what the file should compute
    assert check["mean_abs_diff"] < 0.02 * check["mean_abs_output"]
    from kprune.export.command import summary

    assert "quantization-aware training: 1 epochs before the int8 conversion" in summary({**report, "model": "m"})
    out = tmp_path / "ptq.tflite"
    result = _export(path, "--quant", "int8", "--data", tiny_synth_data, "--ptq", "bias-correction", "--ptq", "equalize",
                     "--out", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ptq"]["options"] == ["equalize", "bias-correction"] and report["ptq"]["per_channel"]
    assert report["ptq"]["equalize"]["range_ratio_after"] < report["ptq"]["equalize"]["range_ratio_before"]
    assert report["check"]["mean_abs_diff"] < 0.05 * report["check"]["mean_abs_output"]
    for args, message in [(["--qat-epochs", 1], "add --quant int8"),
                          (["--quant", "int8", "--qat-epochs", 1, "--ptq", "equalize"], "give one of them"),
                          (["--quant", "int8", "--qat-lr", 0.001], "apply with --qat-epochs")]:
        result = _export(path, "--data", tiny_synth_data, "--out", tmp_path / "x.tflite", *args)
        assert result.exit_code != 0 and message in result.output, result.output


def test_cli_ptq_choices_are_the_library_options():
    from kprune.cli import main
    from kprune.export.ptq import PTQ_OPTIONS

    (option,) = [p for p in main.commands["export"].params if p.name == "ptq"]
    assert tuple(option.type.choices) == PTQ_OPTIONS


def test_experiment_config_takes_qat():
    from kprune.config import build
    from kprune.experiment import ExperimentConfig

    values = {"baseline": {"model": "m.keras"}, "sweep": [{"method": "filters", "ratios": [0.5]}]}
    assert build(ExperimentConfig, {**values, "qat": {"epochs": 2, "lr": 1e-4}}, "e.yaml").qat == {"epochs": 2, "lr": 1e-4}
    assert build(ExperimentConfig, values, "e.yaml").qat is None
    with pytest.raises(ValueError, match="qat: unknown key.*epochs_per_round.*known keys: epochs, lr"):
        build(ExperimentConfig, {**values, "qat": {"epochs_per_round": 2}}, "e.yaml")
    with pytest.raises(ValueError, match="epochs >= 1 and lr > 0"):
        build(ExperimentConfig, {**values, "qat": {"epochs": 0}}, "e.yaml")
