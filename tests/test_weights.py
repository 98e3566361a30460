"""Darknet .weights: exact layout, byte-exact round trip, both header sizes, clear errors."""

import numpy as np
import pytest

from kprune.darknet.builder import build_model
from kprune.darknet.cfg import parse_cfg
from kprune.darknet.convert import export_darknet, load_darknet
from kprune.darknet.weights import WeightsError, WeightsHeader, load_weights, read_header, save_weights
from tests.conftest import cfg_path, randomize

TINY_CFG = """[net]
width=32
height=32
channels=3
[convolutional]
batch_normalize=1
filters=2
size=1
stride=1
pad=1
activation=leaky
[convolutional]
filters=4
size=3
stride=1
pad=1
activation=linear
"""


def test_layout_matches_darknet_order(tmp_path):
    """biases, scales, rolling mean, rolling variance, weights[n][c][k][k] per conv, in cfg order."""
    header = WeightsHeader(0, 2, 0, 32013312)
    bn_biases, scales = np.float32([0.1, 0.2]), np.float32([1.5, 2.5])
    mean, variance = np.float32([0.3, 0.4]), np.float32([0.5, 0.6])
    w0 = np.arange(2 * 3, dtype=np.float32).reshape(2, 3, 1, 1)
    b1 = np.float32([-1, -2, -3, -4])
    w1 = np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(4, 2, 3, 3) / 100
    data = header.to_bytes() + b"".join(a.tobytes() for a in (bn_biases, scales, mean, variance, w0, b1, w1))
    assert len(header.to_bytes()) == 20
    model = build_model(parse_cfg(TINY_CFG))
    path = _write(tmp_path / "tiny.weights", data)
    assert load_weights(model, path) == header
    bn = model.get_layer("bn_0")
    np.testing.assert_array_equal(bn.beta.numpy(), bn_biases)
    np.testing.assert_array_equal(bn.gamma.numpy(), scales)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), mean)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), variance)
    kernel0 = model.get_layer("conv_0").kernel.numpy()
    assert kernel0.shape == (1, 1, 3, 2) and kernel0[0, 0, 2, 1] == w0[1, 2, 0, 0]
    kernel1 = model.get_layer("conv_1").kernel.numpy()
    # Keras (kh, kw, c, n) holds Darknet's weights[n][c][kh][kw].
    assert kernel1[2, 0, 1, 3] == w1[3, 1, 2, 0]
    np.testing.assert_array_equal(kernel1, w1.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(kernel0, w0.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.get_layer("conv_1").bias.numpy(), b1)
    # This cfg has no head to keep the header in, so it is passed explicitly.
    save_weights(model, tmp_path / "out.weights", header)
    assert (tmp_path / "out.weights").read_bytes() == data


@pytest.mark.parametrize("header", [WeightsHeader(0, 2, 0, 12_345_678_901), WeightsHeader(0, 1, 0, 64000),
                                    WeightsHeader(1, 0, 3, 5)])
def test_round_trip_is_byte_exact(tmp_path, header):
    model = build_model(cfg_path("yolov2-tiny"), input_size=64)
    randomize(model, seed=4)
    original = tmp_path / "a.weights"
    save_weights(model, original, header)
    size = original.stat().st_size
    assert size == header.nbytes + 4 * 11_237_145
    assert header.nbytes == (20 if header.major * 10 + header.minor >= 2 else 16)
    cfg = tmp_path / "a.cfg"
    cfg.write_text(open(cfg_path("yolov2-tiny")).read())
    converted = load_darknet(cfg, original)
    for a, b in zip(model.weights, converted.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    exported = tmp_path / "b.weights"
    export_darknet(converted, exported)
    assert exported.read_bytes() == original.read_bytes()
    assert read_header(exported.read_bytes()) == header


def test_truncated_and_overlong_files_name_the_layer(tmp_path):
    model = build_model(parse_cfg(TINY_CFG))
    good = tmp_path / "good.weights"
    save_weights(model, good)
    data = good.read_bytes()
    short = tmp_path / "short.weights"
    short.write_bytes(data[:-4 * 10])
    with pytest.raises(WeightsError, match=r"short.weights: file ends in layer conv_1 \(weights: needs 72 values, 62 left\)"):
        load_weights(model, short)
    long = tmp_path / "long.weights"
    long.write_bytes(data + b"\0" * 12)
    with pytest.raises(WeightsError, match=r"long.weights: 3 values \(12 bytes\) are left after the last layer conv_1"):
        load_weights(model, long)
    odd = tmp_path / "odd.weights"
    odd.write_bytes(data + b"\0")
    with pytest.raises(WeightsError, match="not a whole number of float32"):
        load_weights(model, odd)
    with pytest.raises(WeightsError, match="too short for a Darknet header"):
        load_weights(model, _write(tmp_path / "h.weights", b"\0" * 8))
    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights(model, tmp_path / "missing.weights")


def test_header_values_must_fit(tmp_path):
    with pytest.raises(WeightsError, match="does not fit a 16-byte Darknet header"):
        WeightsHeader(0, 1, 0, 2**31).to_bytes()
    assert len(WeightsHeader(0, 2, 0, 2**31).to_bytes()) == 20


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    model = build_model(parse_cfg(TINY_CFG))
    save_weights(model, tmp_path / "m.weights")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.weights").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_load_changes_nothing(tmp_path):
    model = build_model(parse_cfg(TINY_CFG))
    before = [w.numpy().copy() for w in model.weights]
    bad = _write(tmp_path / "bad.weights", WeightsHeader().to_bytes() + np.ones(20, np.float32).tobytes())
    with pytest.raises(WeightsError):
        load_weights(model, bad)
    for old, weight in zip(before, model.weights):
        np.testing.assert_array_equal(old, weight.numpy())


def _write(path, data):
    path.write_bytes(data)
    return path
