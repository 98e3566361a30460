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

from kprune._keras import keras, tf
from kprune.data.pipeline import check_input_size
from kprune.models.layers import HEAD_LAYERS

POLICIES = ("float32", "mixed_bfloat16", "auto")
# CPU flags (Linux /proc/cpuinfo) of native bfloat16 arithmetic; without them TensorFlow emulates
# bfloat16 and a training step runs about 7x slower than in float32 (0.147x, a 2-core EPYC host)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def check_policy(policy: str) -> str:
    """Raises ValueError for a policy kprune does not train with."""
    if policy not in POLICIES:
        raise ValueError(f"precision {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def cpuinfo(field: str, path: str = "/proc/cpuinfo") -> Optional[str]:
    """The value of the first ``field`` line of ``path`` (Linux's CPU description), None where there
    is none or the file cannot be read (not Linux)."""
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The CPU's feature flags, empty where they cannot be read."""
    return set((cpuinfo("flags", path) or "").split())


def resolve_policy(policy: str, flags: Optional[set] = None, gpus: Optional[int] = None) -> str:
    """``policy``, with ``auto`` made ``mixed_bfloat16`` on a CPU-only machine whose CPU has native
    bfloat16 (one of :data:`BF16_FLAGS`), where it trains faster, and ``float32`` everywhere else
    (GPUs differ too much in bfloat16 support to guess; name the policy there)."""
    check_policy(policy)
    if policy != "auto":
        return policy
    if gpus is None:
        gpus = len(tf.config.list_physical_devices("GPU"))
    flags = cpu_flags() if flags is None else flags
    return "mixed_bfloat16" if not gpus and any(f in flags for f in BF16_FLAGS) else "float32"


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
    """``model`` itself if it already uses ``policy``, else a :func:`variant` under ``policy``
    (``auto`` resolved by :func:`resolve_policy`)."""
    policy = resolve_policy(policy)
    return model if model_policy(model) == policy else variant(model, policy=policy)
