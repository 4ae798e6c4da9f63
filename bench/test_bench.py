"""pytest-benchmark versions of bench/bench.py's cases, for regression tracking:

    pytest bench/ --benchmark-only                       # all of them
    pytest bench/ --benchmark-only -k seed               # one case
    pytest bench/ --benchmark-only --benchmark-save=base  # then --benchmark-compare to see changes

Not collected by the plain ``pytest`` run (pyproject's testpaths = tests). One benchmark per case x
contender, each doing the case's quick step count per round; torch.compile is left out (its
compile would dominate a regression run; bench/bench.py times it). Ratios between contenders
within one run are the figure to watch, not the absolute times (the machine is shared).
"""

import functools

import pytest
import torch

from bench.bench import CASES, make_contenders, make_data

CONTENDERS = ("stock eager", "fastlin drop-in", "fastlin step", "fastlin fit")


@functools.lru_cache(maxsize=1)
def _data(case_name: str):
    case = next(c for c in CASES if c.name == case_name)
    return case, make_data(case, torch.device("cpu"))


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case_name", [c.name for c in CASES])
def test_train(benchmark, case_name, contender):
    case, (x, y) = _data(case_name)
    steps = case.quick_steps
    contenders, models = make_contenders(case, [x], [y], steps, "cpu", "auto", with_compile=False)
    c = next(c for c in contenders if c.name == contender)
    if c.skip:
        pytest.skip(c.skip)
    benchmark.group = f"{case.name} ({steps} steps)"
    benchmark.extra_info.update({"shape": case.shape, "dtype": str(case.dtype), "steps": steps})
    rounds = 5 if case.seed_data else 3
    benchmark.pedantic(c.run, args=(0,), rounds=rounds, iterations=1, warmup_rounds=1)
    for p in models[contender].parameters():
        assert torch.isfinite(p).all(), f"{contender} diverged"
