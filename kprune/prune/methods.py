"""What pruning removes: the registry of pruning methods.

A method is an object with a ``name``, a docstring and what the rest of kprune needs to know about
it: whether it removes whole filters (``structured``) or zeroes weights, whether it prunes while
training (tfmot's schedules), and which number it takes. The module loads without TensorFlow, so
that command-line choices come from :data:`METHODS`.
"""

from __future__ import annotations

from kprune.prune.registry import Entry, Registry


class Method(Entry):
    """A pruning method."""

    structured = False  # removes whole filters (a smaller model), else zeroes weights (a sparse one)
    trains = False  # prunes while training (needs data and epochs)
    value = "ratio"  # the option that says how much: ratio or threshold

    @property
    def keeps_sparsity(self) -> bool:
        """Whether retraining after it must keep the pruned weights at zero (tfmot's wrapper does it
        for the methods that train; filters are gone)."""
        return not self.structured and not self.trains


METHODS: Registry[Method] = Registry("method")
register = METHODS.register


def get_method(name: str) -> Method:
    """The method registered as ``name`` (an unknown name is a ValueError listing the known ones)."""
    return METHODS.find(name)


@register
class Threshold(Method):
    """Zero every weight whose magnitude is below --threshold, in every layer in scope."""

    name = "threshold"
    value = "threshold"


@register
class Percentage(Method):
    """Zero the same fraction (--ratio) of the smallest weights in every layer."""

    name = "percentage"


@register
class GlobalMagnitude(Method):
    """Zero the smallest --ratio of all weights in scope, under one global magnitude threshold."""

    name = "global"


@register
class TfmotConstant(Method):
    """tfmot's pruning while training, at a constant sparsity (--ratio) from the first step."""

    name = "tfmot-constant"
    trains = True


@register
class TfmotPolynomial(Method):
    """tfmot's pruning while training, the sparsity rising polynomially to --ratio."""

    name = "tfmot-polynomial"
    trains = True


@register
class Filters(Method):
    """Remove whole filters (structured): a smaller, faster model; see --allocation and --schedule."""

    name = "filters"
    structured = True
