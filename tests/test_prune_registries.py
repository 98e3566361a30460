"""The registries of pruning methods, allocation strategies and schedules: unknown names are refused
with the known ones listed, the command line offers exactly the registered names, and the README's
tables are the registries."""

from pathlib import Path

import pytest

from kprune.prune.allocation import ALLOCATIONS, get_allocation
from kprune.prune.methods import METHODS, get_method
from kprune.prune.schedules import SCHEDULES, get_schedule
from kprune.report.runtimes import RUNTIMES, get_runtime

README = Path(__file__).resolve().parents[1] / "README.md"


def test_registries_refuse_unknown_names_listing_the_known_ones():
    for get, name, message in [
            (get_method, "prune-all", "method 'prune-all': choose one of threshold, percentage, global, "
                                      "tfmot-constant, tfmot-polynomial, filters"),
            (get_allocation, "random", "allocation 'random': choose one of uniform, independent, global, sensitivity"),
            (get_schedule, "daily", "schedule 'daily': choose one of once, gradual, iterative"),
            (get_runtime, "onnx", "runtime 'onnx': choose one of tflite, keras")]:
        with pytest.raises(ValueError, match=message):
            get(name)


def test_what_the_registries_say_of_each_entry():
    assert [n for n, m in METHODS.items() if m.structured] == ["filters"]
    assert [n for n, m in METHODS.items() if m.trains] == ["tfmot-constant", "tfmot-polynomial"]
    assert [n for n, m in METHODS.items() if m.keeps_sparsity] == ["threshold", "percentage", "global"]
    assert [n for n, a in ALLOCATIONS.items() if a.in_rounds] == ["uniform", "global"]
    assert [n for n, a in ALLOCATIONS.items() if a.budget_only] == ["sensitivity"]
    assert [(n, s.in_rounds, s.allocation, s.criterion, s.rounds) for n, s in SCHEDULES.items()] == [
        ("once", False, "uniform", "l1", 1), ("gradual", True, "global", "l1-normalized", 4),
        ("iterative", True, "uniform", "l1", 10)]


def test_the_command_line_offers_the_registered_names():
    from kprune.cli import prune

    choices = {p.name: list(p.type.choices) for p in prune.params if hasattr(p.type, "choices")}
    assert choices["method"] == list(METHODS) and choices["allocation"] == list(ALLOCATIONS)
    assert choices["schedule"] == list(SCHEDULES) and choices["runtime"] == list(RUNTIMES)


def test_the_readme_tables_are_the_registries():
    rows = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("| `")]
    yes = {True: "yes", False: "no"}
    allocations = [f"| `{n}` | {yes[a.in_rounds]} | {yes[a.budget_only]} | {a.description} |"
                   for n, a in ALLOCATIONS.items()]
    schedules = [f"| `{n}` | {s.allocation} | {s.criterion} | {s.description} |" for n, s in SCHEDULES.items()]
    assert [r for r in rows if r in allocations] == allocations
    assert [r for r in rows if r in schedules] == schedules


def test_recovery_options_check_their_values_and_are_the_readme_table():
    from kprune.prune.recovery import RECOVERIES, get_recovery

    assert list(RECOVERIES) == ["reconstruct", "distill", "slimming"]
    assert get_recovery("distill").check(2) == 2.0 and get_recovery("reconstruct").check(True) is True
    for name, value, message in [("distill", -1.0, "distill -1.0: the weight of distill, a number >= 0"),
                                 ("slimming", True, "slimming True: the weight of slimming"),
                                 ("reconstruct", 1, "reconstruct 1: true or false")]:
        with pytest.raises(ValueError, match=message):
            get_recovery(name).check(value)
    with pytest.raises(ValueError, match="recovery 'pray': choose one of reconstruct, distill, slimming"):
        get_recovery("pray")
    rows = [line.strip() for line in README.read_text().splitlines()]
    table = [f"| `{n}` | {r.when} | `{r.key}` | " + (f"`{r.option}`" if r.option else "–") + f" | {r.description} |"
             for n, r in RECOVERIES.items()]
    assert [r for r in rows if r in table] == table
