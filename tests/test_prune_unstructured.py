"""Unstructured pruning through tfmot: per-layer sparsities of the three methods, schedules that reach
their target exactly, and masks that survive retraining with Adam."""

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

from kprune._keras import keras
from kprune.darknet.builder import build_model
from kprune.models import sparsity as S
from kprune.prune import unstructured as U
from kprune.prune.scope import layers_in_scope, output_layers
from tests.conftest import cfg_path


def two_convs():
    """conv a: kernel 1x1x1x10 with |w| = 1..10; conv b: 1x1x10x2 with |w| = 0.5, 1.0, ..., 10.0."""
    inputs = keras.Input((4, 4, 1))
    a = keras.layers.Conv2D(10, 1, name="a")(inputs)
    b = keras.layers.Conv2D(2, 1, name="b")(a)
    out = keras.layers.Conv2D(1, 1, name="out")(b)
    model = keras.Model(inputs, out)
    signs = np.where(np.arange(10) % 2, -1.0, 1.0)
    model.get_layer("a").kernel.assign((np.arange(1, 11) * signs).reshape(1, 1, 1, 10))
    model.get_layer("b").kernel.assign((np.arange(1, 21) * 0.5).reshape(1, 1, 10, 2))
    return model


def test_methods_give_the_sparsity_of_each_layer():
    model = two_convs()
    assert output_layers(model) == ["out"] and layers_in_scope(model) == ["a", "b"]
    assert U.layer_sparsities(model, "percentage", 0.3, ["a", "b"]) == {"a": 0.3, "b": 0.3}
    # |w| < 3.2: a has 1, 2, 3 (3 of 10); b has 0.5 .. 3.0 (6 of 20)
    assert U.layer_sparsities(model, "threshold", 3.2, ["a", "b"]) == {"a": 0.3, "b": 0.3}
    # |w| < 5.5: a 5 of 10, b 10 of 20
    assert U.layer_sparsities(model, "threshold", 5.5, ["a", "b"]) == {"a": 0.5, "b": 0.5}
    # the 30 magnitudes sorted: 0.5, 1, 1, 1.5, 2, 2, ...; the 12 smallest are all below 4.5 and
    # are 4 of a (1, 2, 3, 4) and 8 of b (0.5 .. 4.0)
    assert U.layer_sparsities(model, "global", 0.4, ["a", "b"]) == {"a": 0.4, "b": 0.4}
    got = U.layer_sparsities(model, "global", 0.6, ["a", "b"])  # 18 smallest: a 1..6, b 0.5..6.0
    assert got == {"a": 0.6, "b": 0.6}
    with pytest.raises(ValueError, match="method 'magic'"):
        U.layer_sparsities(model, "magic", 0.5, ["a"])
    with pytest.raises(ValueError, match=r"sparsity 1.0: must be in \[0, 1\)"):
        U.layer_sparsities(model, "global", 1.0, ["a"])


def test_one_shot_pruning_zeroes_the_smallest_weights():
    model = two_convs()
    wrapped = S.wrap(model, {n: U.make_schedule("constant", s)
                             for n, s in U.layer_sparsities(model, "threshold", 3.2, ["a", "b"]).items()})
    U.prune_now(wrapped)
    pruned = S.strip(wrapped)
    a = pruned.get_layer("a").kernel.numpy().ravel()
    np.testing.assert_array_equal(a == 0, np.abs(model.get_layer("a").kernel.numpy().ravel()) < 3.2)
    assert S.sparsity(pruned) == {"a": 0.3, "b": 0.3, "out": 0.0}
    assert pruned.get_layer("b").bias.numpy().tolist() == [0.0, 0.0]  # untouched (zero-initialised)


def test_schedule_frequency_reaches_the_target_exactly():
    schedule = U.make_schedule("polynomial", 0.8, begin_step=0, end_step=250, frequency=100)
    assert schedule.frequency == 50  # 100 does not divide 250: the update at 250 would be skipped
    prune, target = schedule(250)
    assert bool(prune) and float(target) == pytest.approx(0.8)
    # cubic: s = s_f + (s_i - s_f)(1 - t/n)^3 = 0.8 - 0.8 * 0.125 at half way
    assert float(schedule(125)[1]) == pytest.approx(0.7)
    constant = U.make_schedule("constant", 0.5, begin_step=10, end_step=10)
    assert constant.frequency == 1 and bool(constant(10)[0]) and not bool(constant(11)[0])
    with pytest.raises(ValueError, match="need 0 <= begin <= end"):
        U.make_schedule("constant", 0.5, begin_step=5, end_step=4)


def _fit(model, steps, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((8,) + model.input_shape[1:]).astype(np.float32)
    y = rng.random((8,) + model.output_shape[1:]).astype(np.float32)
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()] if S.pruning_wrappers(model) else []
    model.fit(x, y, batch_size=4, epochs=steps // 2, verbose=0, callbacks=callbacks)


def test_gradual_schedule_during_training_ends_at_the_target():
    model = build_model(cfg_path("yolov2-tiny"), input_size=32, width=0.125, classes=1)
    names = layers_in_scope(model)
    wrapped = S.wrap(model, {n: U.make_schedule("polynomial", 0.75, 0, 10, frequency=4) for n in names})
    _fit(wrapped, 12)
    final = S.sparsity(S.strip(wrapped), names)
    for name, value in final.items():
        size = model.get_layer(name).kernel.shape.num_elements()
        # tfmot keeps every weight tied with the threshold magnitude; float32 draws do tie, a few per layer
        assert round(size * 0.75) - 4 <= round(value * size) <= round(size * 0.75)


def test_masks_survive_retraining_with_adam():
    model = build_model(cfg_path("yolov2-tiny"), input_size=32, width=0.125, classes=1)
    names = layers_in_scope(model)
    wrapped = S.wrap(model, {n: U.make_schedule("constant", s) for n, s in U.layer_sparsities(model, "global", 0.6, names).items()})
    U.prune_now(wrapped)
    sparse = S.strip(wrapped)
    zeros = {n: sparse.get_layer(n).kernel.numpy() == 0 for n in names}
    assert sum(z.sum() for z in zeros.values()) == pytest.approx(0.6 * sum(z.size for z in zeros.values()), abs=4 * len(names))

    retrained = S.keep_masks(sparse)
    _fit(retrained, 10)
    final = S.strip(retrained)
    for name in names:
        kernel = final.get_layer(name).kernel.numpy()
        assert np.count_nonzero(kernel[zeros[name]]) == 0, name
        assert not np.allclose(kernel[~zeros[name]], sparse.get_layer(name).kernel.numpy()[~zeros[name]])

    # the trap this avoids: fine-tuning the stripped model revives pruned weights
    _fit(sparse, 4)
    revived = sum(np.count_nonzero(sparse.get_layer(n).kernel.numpy()[zeros[n]]) for n in names)
    assert revived > 0
