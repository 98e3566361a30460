"""The registry of recovery options: what wins back the accuracy a pruning costs. Each says when it
acts, the key that turns it on in sweep entries and training configs, the ``kprune prune`` option,
and checks its own value. Loads without TensorFlow.

The work itself lives where it acts: reconstruction in :mod:`kprune.prune.reconstruct` (after the
surgery), distillation in :mod:`kprune.detectors.distill` (in the retraining's loss), slimming in
:mod:`kprune.train.slimming` (while the dense model trains).
"""

from __future__ import annotations

import numbers

from kprune.prune.registry import Entry, Registry

RECOVERIES: Registry["Recovery"] = Registry("recovery")


class Recovery(Entry):
    """A recovery option.

    Attributes:
        when: when it acts, in words.
        key: its key in sweep entries (and training configs for ``slimming``).
        option: its ``kprune prune`` option, or "" when it belongs to the training of the dense model.
    """

    when = ""
    key = ""
    option = ""

    def check(self, value):
        """``value`` as the option takes it.

        Raises:
            ValueError: a value the option does not take, naming it.
        """
        raise NotImplementedError


class _Weighted(Recovery):
    """A recovery whose value is its weight in a loss."""

    def check(self, value) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"{self.name} {value!r}: the weight of {self.name}, a number >= 0 (0: none)")
        return float(value)


@RECOVERIES.register
class Reconstruct(Recovery):
    """Re-fit the convs that lost input channels to the dense model's outputs by least squares.

    On activations sampled from training images (He et al. 2017, ThiNet), so that the pruned model is
    good before any retraining."""

    name = "reconstruct"
    when = "after the surgery, before retraining"
    key = "reconstruct"
    option = "--reconstruct"

    def check(self, value) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"reconstruct {value!r}: true or false")
        return value


@RECOVERIES.register
class Distill(_Weighted):
    """Retraining also learns the dense model's head outputs, this weight times their divergence.

    The divergence (:mod:`kprune.detectors.distill`) is masked to where the dense model sees
    objects, so that background noise is not rewarded."""

    name = "distill"
    when = "during retraining"
    key = "distill"
    option = "--distill WEIGHT"


@RECOVERIES.register
class Slimming(_Weighted):
    """Train the dense model with this L1 weight on its batch-norm scales, then prune by bn-gamma.

    Network slimming (Liu et al. 2017), as SlimYOLOv3 prunes YOLOv3: the penalty drives the scales
    of unneeded channels towards zero, and the bn-gamma criterion removes those channels."""

    name = "slimming"
    when = "while the dense model trains"
    key = "slimming"
    option = ""


def get_recovery(name: str) -> Recovery:
    """The recovery option registered as ``name`` (ValueError listing the known ones)."""
    return RECOVERIES.find(name)
