"""Custom layers: Darknet's reorg, Darknet's batch norm, the detection head's metadata."""

import numpy as np
import pytest

from kprune._keras import keras, tf
from kprune.models.layers import DarknetBatchNormalization, DetectionHead, Reorg


def reorg_reference(x_nhwc: np.ndarray, stride: int) -> np.ndarray:
    """Darknet's reorg_cpu(forward=0) written from its definition, over flat NCHW buffers.

    For every position (k, j, i) of the (C, H, W) index space: c2 = k % (C/s²), offset = k / (C/s²),
    the value read sits at (c2, j*s + offset / s, i*s + offset % s) of the input buffer seen as
    (C/s², H*s, W*s); the value is written at (k, j, i) of the output buffer seen as (C, H, W).
    """
    n, h, w, c = x_nhwc.shape
    src = np.transpose(x_nhwc, (0, 3, 1, 2)).reshape(n, -1)  # Darknet's flat NCHW buffer
    dst = np.empty_like(src)
    out_c = c // (stride * stride)
    for b in range(n):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    c2, offset = k % out_c, k // out_c
                    w2 = i * stride + offset % stride
                    h2 = j * stride + offset // stride
                    src_index = w2 + w * stride * (h2 + h * stride * c2)
                    dst_index = i + w * (j + h * k)
                    dst[b, dst_index] = src[b, src_index]
    out = dst.reshape(n, c * stride * stride, h // stride, w // stride)
    return np.transpose(out, (0, 2, 3, 1))


def test_darknet_reorg_matches_reference_exactly():
    x = np.random.default_rng(0).normal(size=(2, 6, 4, 8)).astype(np.float32)
    got = Reorg(2, mode="darknet")(x).numpy()
    assert got.shape == (2, 3, 2, 32)
    np.testing.assert_array_equal(got, reorg_reference(x, 2))


def test_darknet_reorg_is_not_space_to_depth_up_to_permutation():
    x = np.arange(1 * 4 * 4 * 8, dtype=np.float32).reshape(1, 4, 4, 8)
    darknet = Reorg(2, mode="darknet")(x).numpy()
    s2d = Reorg(2, mode="space_to_depth")(x).numpy()
    np.testing.assert_array_equal(s2d, tf.nn.space_to_depth(x, 2).numpy())
    # Values gathered at output pixel (0, 0) differ as sets, so no channel permutation maps one to the other.
    assert set(darknet[0, 0, 0].tolist()) != set(s2d[0, 0, 0].tolist())


def test_reorg_errors_and_config():
    with pytest.raises(ValueError, match="mode 'pixel'"):
        Reorg(2, mode="pixel")
    with pytest.raises(ValueError, match="channels divisible by 4, got 6"):
        Reorg(2)(keras.Input((4, 4, 6)))
    with pytest.raises(ValueError, match="height 5 is not a multiple of stride 2"):
        Reorg(2)(keras.Input((5, 4, 8)))
    layer = Reorg.from_config(Reorg(2, mode="space_to_depth", name="r").get_config())
    assert (layer.stride, layer.mode, layer.name) == (2, "space_to_depth", "r")


def _bn_with(gamma, beta, mean, variance):
    layer = DarknetBatchNormalization()
    layer.build((None, 2, 2, len(gamma)))
    layer.set_weights([np.float32(gamma), np.float32(beta), np.float32(mean), np.float32(variance)])
    return layer


def test_batch_norm_follows_darknet_formula_including_tiny_variance():
    gamma, beta = [1.5, -0.5, 2.0], [0.1, 0.2, -0.3]
    mean, variance = [0.5, -1.0, 0.01], [4.0, 0.25, 1e-4]
    layer = _bn_with(gamma, beta, mean, variance)
    x = np.random.default_rng(1).normal(size=(2, 2, 2, 3)).astype(np.float32) * 0.02 + 0.01
    expected = (x - np.array(mean)) / (np.sqrt(variance) + 1e-6) * np.array(gamma) + np.array(beta)
    got = layer(x, training=False).numpy()
    assert np.max(np.abs(got - expected) / (1 + np.abs(expected))) < 1e-5
    # Keras' own formula, sqrt(variance + 1e-3), is visibly wrong on the channel with variance 1e-4.
    keras_bn = keras.layers.BatchNormalization(epsilon=1e-3)
    keras_bn.build((None, 2, 2, 3))
    keras_bn.set_weights(layer.get_weights())
    wrong = keras_bn(x, training=False).numpy()
    assert np.max(np.abs(wrong[..., 2] - expected[..., 2])) > 0.1


def test_batch_norm_training_uses_batch_statistics_and_updates_moving_average():
    layer = _bn_with([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0])
    x = np.zeros((4, 2, 2, 2), np.float32)
    x[..., 0] = np.arange(16).reshape(4, 2, 2)
    x[..., 1] = 3.0
    out = layer(x, training=True).numpy()
    batch_mean, batch_var = x[..., 0].mean(), x[..., 0].var()
    np.testing.assert_allclose(out[..., 0], (x[..., 0] - batch_mean) / (np.sqrt(batch_var) + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(out[..., 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(layer.moving_mean.numpy(), [0.01 * 7.5, 0.01 * 3.0], rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), [0.99 + 0.01 * batch_var, 0.99], rtol=1e-5)
    layer.trainable = False  # frozen: inference mode even when asked to train
    frozen = layer(x, training=True).numpy()
    np.testing.assert_allclose(frozen, layer(x, training=False).numpy())


def test_detection_head_metadata_and_checks():
    head = DetectionHead("yolo", [[10, 14], [23, 27], [37, 58]], 2, mask=[1, 2], names=["a", "b"],
                         darknet_header=[0, 2, 0, 7])
    assert head.head_anchors == [[23.0, 27.0], [37.0, 58.0]] and head.channels == 14
    copy = DetectionHead.from_config(head.get_config())
    assert (copy.kind, copy.mask, copy.names, copy.darknet_header) == ("yolo", [1, 2], ["a", "b"], [0, 2, 0, 7])
    with pytest.raises(ValueError, match="needs 14 channels, got 15"):
        head(keras.Input((4, 4, 15)))
    with pytest.raises(ValueError, match="kind 'ssd'"):
        DetectionHead("ssd", [[1, 1]], 2)
    with pytest.raises(ValueError, match="2 classes but 1 names"):
        DetectionHead("region", [[1, 1]], 2, names=["a"])
    with pytest.raises(ValueError, match="mask \\[3\\]"):
        DetectionHead("yolo", [[1, 1]], 2, mask=[3])


def test_keras_3_is_refused():
    """kprune needs Keras 2: a process that asked for Keras 3 gets a clear ImportError."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_USE_LEGACY_KERAS": "0"}
    result = subprocess.run([sys.executable, "-c", "import kprune._keras"], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "kprune needs Keras 2 (tf_keras) but TF_USE_LEGACY_KERAS is set to '0'" in result.stderr
