"""Copies of a model with the same weights that run differently: another dtype policy, another input size.

Precision: under ``mixed_bfloat16`` the variables stay float32 and the layers compute in bfloat16, which CPUs
with AVX512-BF16 or AMX run markedly faster than float32 (about 1.2x for a training step of the
synthetic baseline here). The detection heads stay float32, so the loss and the decoding see float32
outputs. Saved models are always float32 copies: nothing downstream (export, pruning, evaluation)
has to know how a model was trained.

Input size: a fully convolutional detector runs with the same weights at other sizes (a YOLO model at
any multiple of 32); running larger than trained shows small objects bigger (YOLOv2's
multi-resolution results). Which sizes a model takes is its family's rule, checked by the caller.
"""

from __future__ import annotations

from typing import Optional

from kprune._keras import keras
from kprune.data.pipeline import check_input_size
from kprune.models.layers import HEAD_LAYERS

POLICIES = ("float32", "mixed_bfloat16")


def check_policy(policy: str) -> str:
    """Raises ValueError for a policy kprune does not train with."""
    if policy not in POLICIES:
        raise ValueError(f"precision {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def model_policy(model) -> str:
    """The policy of the model's first layer with weights (its compute policy)."""
    for layer in model.layers:
        if layer.weights:
            return layer.dtype_policy.name
    return "float32"


def variant(model, policy: Optional[str] = None, input_size: Optional[int] = None):
    """A copy of ``model`` with new layers and the same weights.

    Args:
        model: a functional model (not wrapped for pruning).
        policy: the dtype policy of every layer but the detection heads (default: as it is).
        input_size: the square input size of the copy (default: as it is).

    Raises:
        ValueError: an unknown policy, or a size below 32 pixels.
    """
    if policy is not None:
        check_policy(policy)
    if input_size is not None:
        input_size = check_input_size(input_size, "input size")

    def clone(layer):
        config = layer.get_config()
        if policy is not None and not isinstance(layer, HEAD_LAYERS):
            config["dtype"] = policy
        return layer.__class__.from_config(config)

    inputs = None if input_size is None else keras.Input((input_size, input_size, model.input_shape[-1]))
    copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def with_policy(model, policy: str):
    """``model`` itself if it already uses ``policy``, else a :func:`variant` under ``policy``."""
    check_policy(policy)
    return model if model_policy(model) == policy else variant(model, policy=policy)
