"""The batch-norm formulas of the Darknet family: how a channel's variance becomes its divisor.

Pure Python (no TensorFlow), so that command-line choices can be derived from :data:`BN_FORMULAS`
without loading TensorFlow. :class:`kprune.models.layers.DarknetBatchNormalization` computes
``gamma * (x - mean) / divisor(variance) + beta`` with the formula it is given.

- ``original`` (pjreddie's Darknet): ``divisor = sqrt(variance) + 1e-6``.
- ``alexeyab`` (AlexeyAB's fork, which trained YOLOv4 and YOLOv7): ``divisor = sqrt(variance + 1e-5)``.

The two differ by several percent on channels whose variance is below about 1e-4, so weights need
the formula of the Darknet that trained them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict


@dataclass(frozen=True)
class BatchNormFormula:
    """One formula.

    Attributes:
        name: its key in :data:`BN_FORMULAS`.
        epsilon: the constant it adds.
        inside_sqrt: True to add ``epsilon`` to the variance, False to add it to the standard deviation.
        description: the formula, for help texts.
    """

    name: str
    epsilon: float
    inside_sqrt: bool
    description: str

    def divisor(self, variance, sqrt: Callable, epsilon: float | None = None):
        """The divisor of ``x - mean`` for ``variance`` (any array type ``sqrt`` accepts).

        Args:
            variance: per-channel variance.
            sqrt: the square root of the array library (``numpy.sqrt``, ``tf.sqrt``).
            epsilon: overrides :attr:`epsilon`.
        """
        eps = self.epsilon if epsilon is None else epsilon
        return sqrt(variance + eps) if self.inside_sqrt else sqrt(variance) + eps


BN_FORMULAS: Dict[str, BatchNormFormula] = {
    "original": BatchNormFormula("original", 1e-6, False, "(x - mean) / (sqrt(var) + 1e-6), pjreddie's Darknet"),
    "alexeyab": BatchNormFormula("alexeyab", 1e-5, True, "(x - mean) / sqrt(var + 1e-5), AlexeyAB's fork"),
}


def bn_formula(name: str) -> BatchNormFormula:
    """The formula called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in BN_FORMULAS:
        raise ValueError(f"batch-norm formula {name!r} is not one of {', '.join(BN_FORMULAS)}")
    return BN_FORMULAS[name]
