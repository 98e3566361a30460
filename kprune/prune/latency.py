"""Latency budgets (NetAdapt, Yang et al. 2018): per-layer latency tables, a predicted latency, and
the search that prunes until a model runs in a target time.

The latency of a pruned model is predicted as the sum of its convolutions' latencies plus the rest
of the model. Each convolution's latency is looked up in a table measured once per layer of the
dense model: the layer alone (same kernel, stride, dilation, padding, activation and input size)
timed at every pair of input and output channel counts of a grid (a quarter, half, three quarters
and all of each), bilinearly interpolated in between — a convolution's work is bilinear in its
channel counts, and the grid catches what is not (vector widths, cache sizes). The rest (every
other op, the interpreter's overhead) is the dense model's measured time minus its table sum, taken
as constant. Measurements are cached per host, runtime and thread count (:func:`cache_path`), so a
second search on the same host measures only the dense model.

The search bisects the allocation's number on the predicted latency (:mod:`.budgets`),
then measures the model it found. When the measurement is more than :data:`LANDING` off the target,
the target of the prediction is scaled by target / measured and the search runs again, at most
:data:`MAX_CORRECTIONS` times.

The timing itself belongs to a *runtime* object given by the caller (the registry of runtimes is
:data:`kprune.report.latency.RUNTIMES`): ``runtime.key`` (a string naming runtime and threads) and
``runtime.time(models)`` (name -> Keras model in, name -> median milliseconds at batch 1 out).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from kprune._keras import keras
from kprune.fileio import write_json_atomic
from kprune.models.counting import leaf_layers
from kprune.models.variants import cpuinfo
from kprune.prune.budgets import meet_budget

GRID = (0.25, 0.5, 0.75, 1.0)  # fractions of a layer's dense channel counts the table is measured at
LANDING = 0.05  # a search is done when the measured latency is within 5 % of the target
MAX_CORRECTIONS = 3


def host() -> str:
    """This machine for the cache: its CPU model and the number of CPUs."""
    name = cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{name} x{os.cpu_count()}"


def cache_path() -> Path:
    """The latency cache: ``$KPRUNE_CACHE/latency.json``, by default under ``~/.cache/kprune``."""
    root = os.environ.get("KPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kprune")
    return Path(root) / "latency.json"


def timed_layers(model) -> List:
    """The layers the tables cover: every Conv2D and DepthwiseConv2D (SeparableConv2D excluded)."""
    return [layer for layer in leaf_layers(model)
            if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.SeparableConv2D)]


def channels(layer) -> Tuple[int, int]:
    """(input, output) channels of a convolution."""
    c_in = int(layer.input_shape[-1])
    return (c_in, c_in * layer.depth_multiplier) if _depthwise(layer) else (c_in, int(layer.filters))


def _depthwise(layer) -> bool:
    return isinstance(layer, keras.layers.DepthwiseConv2D)


def signature(layer, c_in: int, c_out: int) -> str:
    """What a convolution's latency depends on, as a cache key."""
    config = layer.get_config()
    h, w = layer.input_shape[1:3]
    policy = config.get("dtype")
    policy = policy.get("config", {}).get("name") if isinstance(policy, dict) else policy
    return (f"{type(layer).__name__} k{tuple(config['kernel_size'])} s{tuple(config['strides'])} "
            f"d{tuple(config['dilation_rate'])} {config['padding']} g{config.get('groups', 1)} "
            f"bias{int(config['use_bias'])} {config['activation']} {policy} {h}x{w} {c_in}>{c_out}")


def single_layer(layer, c_in: int, c_out: int):
    """A model of ``layer`` alone with ``c_in`` input and ``c_out`` output channels (fresh weights)."""
    config = {**layer.get_config(), "name": "timed"}
    if not _depthwise(layer):
        config["filters"] = c_out
    for key in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
        config.pop(key, None)
    inputs = keras.Input(tuple(layer.input_shape[1:3]) + (c_in,), batch_size=1)
    return keras.Model(inputs, type(layer).from_config(config)(inputs), name="timed")


def _points(count: int, groups: int = 1) -> List[int]:
    """The grid's channel counts of a dimension of ``count`` channels (multiples of ``groups``)."""
    return sorted({max(groups, int(round(f * count / groups)) * groups) for f in GRID})


@dataclass
class LayerTable:
    """One layer's measured grid: channel counts of each dimension and the milliseconds at each pair."""

    inputs: List[int]
    outputs: List[int]
    ms: List[List[float]]  # [input index][output index]

    def __call__(self, c_in: int, c_out: int) -> float:
        """Bilinear interpolation (linear extrapolation below the grid's smallest counts)."""
        def locate(points, value):
            if len(points) == 1:
                return 0, 0, 0.0
            k = int(np.clip(np.searchsorted(points, value) - 1, 0, len(points) - 2))
            return k, k + 1, (value - points[k]) / (points[k + 1] - points[k])

        ms = np.asarray(self.ms)
        i0, i1, a = locate(self.inputs, c_in)
        j0, j1, b = locate(self.outputs, c_out)
        value = ((1 - a) * (1 - b) * ms[i0, j0] + a * (1 - b) * ms[i1, j0]
                 + (1 - a) * b * ms[i0, j1] + a * b * ms[i1, j1])
        return max(float(value), 0.0)


@dataclass
class LatencyTable:
    """Per-layer latency tables of one dense model on one runtime, and the predicted latency of the
    models pruned from it (:meth:`predict`). Build with :meth:`measure`."""

    runtime_key: str
    dense_ms: float
    layers: Dict[str, LayerTable]
    rest_ms: float
    measured: int = 0  # table entries timed by this build (the others came from the cache)
    cached: int = 0
    seconds: float = 0.0
    unknown: List[str] = field(default_factory=list)

    @classmethod
    def measure(cls, model, runtime, cache: Optional[Path] = None, progress: bool = True) -> "LatencyTable":
        """Time ``model`` and every grid point of its convolutions not in the cache.

        Args:
            runtime: the timing object (see the module docstring).
            cache: the JSON cache (None: :func:`cache_path`); new entries are written to it.
        """
        start = time.perf_counter()
        cache = Path(cache) if cache is not None else cache_path()
        store = json.loads(cache.read_text()) if cache.is_file() else {}
        scope = f"{host()} | {runtime.key}"
        known = store.setdefault(scope, {})
        wanted: Dict[str, object] = {}
        grids = {}
        for layer in timed_layers(model):
            c_in, c_out = channels(layer)
            if _depthwise(layer):
                pairs = [(c, c * layer.depth_multiplier) for c in _points(c_in)]
                grids[layer.name] = ([c for c, _ in pairs], None)
            else:
                groups = int(layer.get_config().get("groups", 1))
                ins, outs = _points(c_in, groups), _points(c_out, groups)
                pairs = [(i, o) for i in ins for o in outs]
                grids[layer.name] = (ins, outs)
            for pair in pairs:
                key = signature(layer, *pair)
                if key not in known and key not in wanted:
                    wanted[key] = (layer, pair)
        new = {}
        names = list(wanted)
        with tqdm(total=len(names), desc=f"latency table ({runtime.key})", unit="conv",
                  disable=not progress or not names) as bar:
            for first in range(0, len(names), 16):  # timed in batches, each batch interleaved
                batch = names[first:first + 16]
                models = {key: single_layer(wanted[key][0], *wanted[key][1]) for key in batch}
                new.update(runtime.time(models))
                bar.update(len(batch))
        if new:
            known.update(new)
            write_json_atomic(cache, store)
        dense_ms = runtime.time({"dense": model})["dense"]
        tables = {}
        for layer in timed_layers(model):
            ins, outs = grids[layer.name]
            if outs is None:  # depthwise: one dimension
                m = layer.depth_multiplier
                values = [[known[signature(layer, c, c * m)]] for c in ins]
                tables[layer.name] = LayerTable(ins, [1], values)
            else:
                values = [[known[signature(layer, i, o)] for o in outs] for i in ins]
                tables[layer.name] = LayerTable(ins, outs, values)
        entries = sum(len(t.inputs) * len(t.outputs) for t in tables.values())
        table = cls(runtime.key, dense_ms, tables, 0.0, measured=len(new), cached=entries - len(new))
        table.rest_ms = dense_ms - table.layer_sum(model)
        table.seconds = time.perf_counter() - start
        return table

    def layer_sum(self, model) -> float:
        """The tables' milliseconds of ``model``'s convolutions (named as in the dense model)."""
        total = 0.0
        for layer in timed_layers(model):
            table = self.layers.get(layer.name)
            if table is None:
                raise ValueError(f"layer {layer.name!r} is not in the latency table: the model was not pruned "
                                 "from the model the table was measured on")
            c_in, c_out = channels(layer)
            total += table(c_in, 1 if len(table.outputs) == 1 else c_out)
        return total

    def predict(self, model) -> float:
        """Predicted batch-1 milliseconds of ``model`` (the dense model or one pruned from it)."""
        return self.layer_sum(model) + self.rest_ms

    def summary(self) -> dict:
        return {"runtime": self.runtime_key, "host": host(), "dense_ms": self.dense_ms, "rest_ms": self.rest_ms,
                "layers": len(self.layers), "measured": self.measured, "cached": self.cached,
                "seconds": self.seconds}


@dataclass
class LatencyResult:
    """The pruning that met a latency target, with every attempt's predicted and measured time."""

    result: object  # what ``prune`` returned
    ratio: float
    target_ms: float
    predicted_ms: float
    measured_ms: float
    attempts: List[dict]
    table: LatencyTable

    def report(self) -> dict:
        return {"target_ms": self.target_ms, "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms,
                "dense_ms": self.table.dense_ms, "within": abs(self.measured_ms - self.target_ms) / self.target_ms,
                "attempts": self.attempts, "table": self.table.summary()}


def meet_latency_budget(model, target_ms: float, prune: Callable[[float], object], high: float, runtime,
                        cache: Optional[Path] = None, progress: bool = True) -> LatencyResult:
    """The smallest value of the allocation's number whose pruned model runs in ``target_ms``.

    Args:
        model: the dense model (left unchanged).
        target_ms: batch-1 milliseconds on ``runtime``.
        prune, high: as in :func:`kprune.prune.budgets.meet_budget`.
        runtime: the timing object (see the module docstring).

    Raises:
        ValueError: a target not below the dense model's measured time, or one the constraints
            cannot reach (the message gives the least reachable).
    """
    if not target_ms > 0:
        raise ValueError(f"target latency {target_ms!r} ms: must be > 0")
    table = LatencyTable.measure(model, runtime, cache, progress)
    if target_ms >= table.dense_ms:
        raise ValueError(f"target latency {target_ms:g} ms: the dense model already runs in {table.dense_ms:.2f} ms "
                         f"({runtime.key}); nothing to prune")
    goal, attempts = target_ms, []
    for _ in range(MAX_CORRECTIONS + 1):
        fraction = 1.0 - goal / table.dense_ms
        if not 0.0 < fraction < 1.0:
            break
        try:
            found = meet_budget(model, fraction, prune, high, cost=table.predict, what="latency")
        except ValueError as error:
            raise ValueError(f"target latency {target_ms:g} ms ({runtime.key}, dense {table.dense_ms:.2f} ms): "
                             f"{error}") from None
        predicted = table.predict(found.result.model)
        measured = runtime.time({"pruned": found.result.model})["pruned"]
        attempts.append({"ratio": found.ratio, "goal_ms": goal, "predicted_ms": predicted, "measured_ms": measured})
        if abs(measured - target_ms) <= LANDING * target_ms:
            break
        goal *= target_ms / measured
    best = min(attempts, key=lambda a: abs(a["measured_ms"] - target_ms))
    chosen = found.result if best is attempts[-1] else prune(best["ratio"])
    return LatencyResult(chosen, best["ratio"], target_ms, best["predicted_ms"], best["measured_ms"], attempts, table)
