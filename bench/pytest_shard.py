"""pytest plugin: `-p pytest_shard --shard i/n` keeps the i-th of n contiguous slices of the collected
tests. bench/gpu_check.sh runs tests/test_triton.py as parallel shards on the GPU machine, where
the time goes into compiling kernels (one process compiles one at a time); contiguous slices keep
the tests that share kernels in one process."""


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, help="i/n: run only the i-th (0-based) of n contiguous slices")


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if not spec:
        return
    i, n = (int(v) for v in spec.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"--shard {spec}: need 0 <= i < n")
    lo, hi = len(items) * i // n, len(items) * (i + 1) // n
    config.hook.pytest_deselected(items=items[:lo] + items[hi:])
    items[:] = items[lo:hi]
