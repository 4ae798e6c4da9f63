"""The user's starting point (shared/seed.md, section 4): its training loop, run verbatim with
stock torch and again with only the three constructors swapped for fastlin's, must end with the
same weights to float32 rounding."""

import contextlib
import io

import pytest
import torch
from conftest import assert_rel_close

import fastlin

# Verbatim from seed.md (comments translated: data, model, loss and optimizer, training, predict).
SEED = """
import torch
import torch.nn as nn

# data
x = torch.randn(100, 1)
y = 3*x + 2 + torch.randn(100, 1)

# model
model = nn.Linear(1, 1)

# loss and optimizer
criterion = nn.MSELoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

# training
for epoch in range(1000):
    # forward
    outputs = model(x)
    loss = criterion(outputs, y)

    # backward and optimize
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

# predict
test_x = torch.Tensor([[4]])
test_y = model(test_x)
print(test_y)
"""

SWAPS = [
    ("model = nn.Linear(1, 1)", "model = fastlin.nn.Linear(1, 1)"),
    ("criterion = nn.MSELoss()", "criterion = fastlin.nn.MSELoss()"),
    ("optimizer = torch.optim.SGD(", "optimizer = fastlin.optim.SGD("),
]


def fastlin_seed() -> str:
    code = SEED
    for old, new in SWAPS:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    return code


def run(code: str, seed: int) -> dict:
    torch.manual_seed(seed)
    ns = {"__name__": "seed", "fastlin": fastlin}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "seed.md", "exec"), ns)
    ns["stdout"] = out.getvalue()
    return ns


@pytest.fixture
def default_backend(backend_device):
    """Make the pair's backend the process default (the seed code passes no backend=)."""
    backend, device = backend_device
    if device != "cpu":
        pytest.skip(f"the seed loop runs on CPU tensors; backend {backend} runs on {device}")
    old = fastlin.backends.default()
    fastlin.backends.set_default(backend)
    try:
        yield backend
    finally:
        fastlin.backends.set_default(old)


def test_swaps_touch_only_the_three_constructors():
    code = fastlin_seed()
    changed = [(a, b) for a, b in zip(SEED.splitlines(), code.splitlines()) if a != b]
    assert len(changed) == 3 and len(SEED.splitlines()) == len(code.splitlines())


@pytest.mark.parametrize("seed", [0, 1])
def test_seed_loop_matches_stock_torch(default_backend, seed):
    stock = run(SEED, seed)
    fast = run(fastlin_seed(), seed)
    assert type(fast["model"]) is fastlin.nn.Linear and type(fast["optimizer"]) is fastlin.optim.SGD
    assert type(fast["criterion"]) is fastlin.nn.MSELoss
    assert torch.equal(fast["x"], stock["x"]) and torch.equal(fast["y"], stock["y"])  # same draws
    # The 1000 steps contract towards the least-squares fit, so rounding differences do not grow:
    # the same weights to float32 rounding (REL_TOL[float32]).
    for name in ("weight", "bias"):
        got, want = getattr(fast["model"], name), getattr(stock["model"], name)
        assert got.dtype == torch.float32
        assert_rel_close(got, want.double(), torch.float32, what=name)
    assert_rel_close(fast["test_y"], stock["test_y"].double(), torch.float32, what="test_y")
    assert_rel_close(fast["loss"], stock["loss"].double(), torch.float32, what="final loss")
    assert fast["stdout"].startswith("tensor([[") and "grad_fn" in fast["stdout"]
    # and it did learn y = 3x + 2 (the noise is N(0, 1) over 100 points)
    assert abs(fast["model"].weight.item() - 3) < 0.5 and abs(fast["model"].bias.item() - 2) < 0.5


def test_drop_ins_are_isinstance_compatible(backend_device):
    backend, device = backend_device
    lin = fastlin.nn.Linear(3, 2, device=device, backend=backend)
    crit = fastlin.nn.MSELoss(backend=backend)
    fused = fastlin.nn.LinearMSELoss(3, 2, device=device, backend=backend)
    opt = fastlin.optim.SGD(lin.parameters(), lr=0.1, backend=backend)
    assert isinstance(lin, torch.nn.Linear) and isinstance(lin, torch.nn.Module)
    assert isinstance(crit, torch.nn.MSELoss) and isinstance(crit, torch.nn.modules.loss._Loss)
    assert isinstance(fused, torch.nn.Linear)  # a Linear whose forward also takes the target
    assert isinstance(opt, torch.optim.SGD) and isinstance(opt, torch.optim.Optimizer)
    # and they compose like torch's: a Sequential of fastlin layers, trained by fastlin's SGD
    model = torch.nn.Sequential(
        fastlin.nn.Linear(3, 4, device=device, backend=backend),
        torch.nn.Tanh(),
        fastlin.nn.Linear(4, 2, device=device, backend=backend),
    )
    ref = torch.nn.Sequential(
        torch.nn.Linear(3, 4, device=device), torch.nn.Tanh(), torch.nn.Linear(4, 2, device=device)
    )
    ref.load_state_dict(model.state_dict())
    opt = fastlin.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, backend=backend)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, device=device), torch.randn(16, 2, device=device)
    for _ in range(5):
        for m, c, o in ((model, crit, opt), (ref, torch.nn.MSELoss(), ref_opt)):
            o.zero_grad()
            c(m(x), y).backward()
            o.step()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        assert_rel_close(v, v2.double(), torch.float32, what=k)
