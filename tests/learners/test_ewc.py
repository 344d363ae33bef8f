"""EWC on 2x3 tensors against values computed by hand (written out in the comments)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from learners.ewc import (
    accumulate_fisher,
    add_capped_penalty_grad_,
    consolidate,
    estimate_fisher,
    ewc_penalty,
    load_state,
    normalize_fisher,
    pull_toward_anchor_,
    save_state,
)


def t(rows: list[list[float]] | list[float]) -> Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# theta - anchor = [[0, 1, 2], [2, 3, 4]]
THETA = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
ANCHOR = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
FISHER = [[1.0, 0.5, 0.25], [0.0, 2.0, 1.0]]
# F * (theta - anchor)^2 = [[0, 0.5, 1], [0, 18, 16]], sum 35.5
# lam = 0.5: penalty = 0.5 / 2 * 35.5 = 8.875
# gradient lam * F * (theta - anchor) = 0.5 * [[0, 0.5, 0.5], [0, 6, 4]]
GRAD = [[0.0, 0.25, 0.25], [0.0, 3.0, 2.0]]


def weight() -> nn.Parameter:
    return nn.Parameter(t(THETA))


# --------------------------------------------------------------------------- penalty


def test_penalty_value_by_hand() -> None:
    p = weight()
    value = ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, lam=0.5)
    assert value.shape == ()
    assert value.dtype == torch.float32
    assert_close(value, torch.tensor(8.875))


def test_penalty_gradient_is_lam_f_times_displacement() -> None:
    p = weight()
    ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, lam=0.5).backward()
    assert p.grad is not None
    assert_close(p.grad, t(GRAD))


def test_capped_penalty_gradient_by_hand() -> None:
    """|GRAD| = sqrt(0.25**2 * 2 + 3**2 + 2**2) = sqrt(13.125); a task gradient of length 5
    and a cap of half of it allow 2.5, so GRAD is scaled by 2.5 / sqrt(13.125)."""
    task = [[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
    p = weight()
    p.grad = t(task)
    value, scale = add_capped_penalty_grad_(
        {"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, 0.5, max_share=0.5
    )
    expected = 2.5 / math.sqrt(13.125)
    assert scale == pytest.approx(expected, rel=1e-6)
    assert_close(value, torch.tensor(8.875))  # the value is not capped, only the gradient
    assert_close(p.grad, t(task) + expected * t(GRAD))
    # a cap above what the penalty asks for changes nothing
    q = weight()
    q.grad = t(task)
    _, scale = add_capped_penalty_grad_(
        {"w": q}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, 0.5, max_share=1.0
    )
    assert scale == 1.0
    assert_close(q.grad, t(task) + t(GRAD))


def test_capped_penalty_never_cancels_the_task_gradient() -> None:
    """However large lambda is, the total gradient keeps at least half the task's length."""
    task = [[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
    for lam in (1.0, 1e3, 1e9):
        p = weight()
        p.grad = -t(task)
        add_capped_penalty_grad_({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, lam, max_share=0.5)
        assert float(p.grad.norm()) >= 0.5 * 5.0 - 1e-4


def test_decoupled_pull_by_hand() -> None:
    """lam 0.5, lr 1: factors min(1, 0.5 F) = [[.5, .25, .125], [0, 1, .5]] times the
    displacement [[0, 1, 2], [2, 3, 4]] come off theta; the value is the penalty before."""
    p = weight()
    value = pull_toward_anchor_({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, 0.5, 1.0)
    assert_close(value, torch.tensor(8.875))
    assert_close(p.detach(), t([[1.0, 1.75, 2.75], [4.0, 2.0, 4.0]]))
    assert p.grad is None  # nothing else touched


def test_decoupled_pull_never_crosses_the_anchor() -> None:
    """However large lr * lam, a weight with a Fisher lands on its anchor and no further; a
    weight without one (F = 0) stays where it is."""
    for lr in (8.0, 1e3, 1e9):  # lr * lam * F >= 1 for every F > 0
        p = weight()
        pull_toward_anchor_({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, 0.5, lr)
        assert_close(p.detach(), t([[1.0, 1.0, 1.0], [4.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="lr"):
        pull_toward_anchor_({"w": weight()}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, 0.5, -1.0)


def test_under_adam_only_the_decoupled_pull_follows_the_fisher() -> None:
    """Why "decoupled" exists. Two weights, both 1 from their anchor, Fisher 1 and 0.01, no
    task gradient. Through the gradient, Adam's per-weight normalisation moves both by about
    its learning rate: the Fisher is lost. Pulled after the step, they move 100 to 1."""
    anchor, fisher = {"w": torch.zeros(2)}, {"w": t([1.0, 0.01])}
    coupled = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([coupled], lr=1e-3)
    coupled.grad = torch.zeros(2)
    add_capped_penalty_grad_({"w": coupled}, anchor, fisher, 10.0, max_share=None)
    opt.step()
    moved = 1.0 - coupled.detach()
    assert_close(moved, torch.full((2,), 1e-3), rtol=1e-3, atol=1e-7)
    decoupled = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([decoupled], lr=1e-3)
    decoupled.grad = torch.zeros(2)
    opt.step()  # no task gradient: Adam leaves it
    pull_toward_anchor_({"w": decoupled}, anchor, fisher, 10.0, 1e-3)
    assert_close(1.0 - decoupled.detach(), t([1e-2, 1e-4]))


def test_penalty_matches_autograd_of_the_formula_on_random_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (2, 3), "b": (4,), "c": (3, 5, 2)}
    params = {n: nn.Parameter(torch.randn(s, generator=gen)) for n, s in shapes.items()}
    anchor = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    fisher = {n: torch.rand(s, generator=gen) for n, s in shapes.items()}
    ewc_penalty(params, anchor, fisher, lam=1.7).backward()
    mine = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    reference = sum((fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in shapes) * (1.7 / 2)
    assert isinstance(reference, Tensor)
    reference.backward()
    for n, p in params.items():
        assert p.grad is not None
        assert_close(mine[n], p.grad)


def test_penalty_sums_over_several_parameters_and_ignores_names_without_fisher() -> None:
    w, b, other = weight(), nn.Parameter(t([3.0, -1.0])), nn.Parameter(t([10.0]))
    # b - anchor = [2, -2]; F_b = [1, 3]: F d^2 = [4, 12], sum 16
    # total sum = 35.5 + 16 = 51.5; lam = 2: penalty = 51.5
    value = ewc_penalty(
        {"w": w, "b": b, "other": other},
        {"w": t(ANCHOR), "b": t([1.0, 1.0]), "other": t([0.0])},
        {"w": t(FISHER), "b": t([1.0, 3.0])},
        lam=2.0,
    )
    assert_close(value, torch.tensor(51.5))
    value.backward()
    assert b.grad is not None
    assert_close(b.grad, t([4.0, -12.0]))  # 2 * [1, 3] * [2, -2]
    assert other.grad is None


def test_penalty_is_zero_at_the_anchor_and_gradient_is_zero() -> None:
    p = nn.Parameter(t(ANCHOR))
    value = ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, lam=3.0)
    assert_close(value, torch.tensor(0.0))
    value.backward()
    assert p.grad is not None
    assert_close(p.grad, torch.zeros(2, 3))


def test_penalty_is_zero_when_lam_is_zero_or_fisher_empty() -> None:
    p = weight()
    for value in (
        ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, lam=0.0),
        ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {}, lam=1.0),
    ):
        assert value.shape == ()
        assert value.dtype == torch.float32
        assert value.device == p.device
        assert_close(value, torch.tensor(0.0))


def test_penalty_is_computed_in_float32_for_bf16_params() -> None:
    # theta is exact in bf16; the anchor sits 1/1024 below it, which bf16 cannot represent near
    # 1..6 (its spacing there is 1/128 to 1/32). In float32: d = 2^-10 everywhere, F = 1,
    # sum F d^2 = 6 * 2^-20, lam = 2: penalty = 6 * 2^-20; gradient 2 * 2^-10 = 2^-9. Rounding
    # the anchor to bf16 would give d = 0 (penalty 0).
    p = nn.Parameter(t(THETA).to(torch.bfloat16))
    anchor = t(THETA) - 2.0**-10
    value = ewc_penalty({"w": p}, {"w": anchor}, {"w": torch.ones(2, 3)}, lam=2.0)
    assert value.dtype == torch.float32
    assert_close(value, torch.tensor(6 * 2.0**-20))
    value.backward()
    assert p.grad is not None
    assert p.grad.dtype == torch.bfloat16
    assert_close(p.grad.float(), torch.full((2, 3), 2.0**-9))


def test_sgd_on_the_penalty_pulls_theta_back_monotonically() -> None:
    # One step: theta - anchor <- (1 - lr * lam * F) * (theta - anchor); lr * lam = 0.05, so per
    # entry the factor is 1 - 0.05 * F = [[0.95, 0.975, 0.9875], [1, 0.9, 0.95]]: in (0, 1]
    # where F > 0 (shrinks toward the anchor, never overshoots) and 1 where F = 0 (untouched).
    p = weight()
    anchor, fisher = t(ANCHOR), t(FISHER)
    lr, lam, steps = 0.1, 0.5, 20
    opt = torch.optim.SGD([p], lr=lr)
    distances = [(p.detach() - anchor).abs()]
    values = []
    for _ in range(steps):
        opt.zero_grad()
        value = ewc_penalty({"w": p}, {"w": anchor}, {"w": fisher}, lam=lam)
        values.append(value.item())
        value.backward()
        opt.step()
        distances.append((p.detach() - anchor).abs())
    displacement = t(THETA) - anchor
    moving = (fisher > 0) & (displacement != 0)
    for before, after in itertools.pairwise(distances):
        assert torch.all(after[moving] < before[moving])
        assert torch.equal(after[~moving], before[~moving])
    assert all(b < a for a, b in itertools.pairwise(values))
    expected = anchor + displacement * (1 - lr * lam * fisher) ** steps
    assert_close(p.detach(), expected)


def test_penalty_errors_name_the_parameter() -> None:
    p = weight()
    with pytest.raises(ValueError, match=r"'w'.*params \(2, 3\).*anchor \(3, 2\)"):
        ewc_penalty({"w": p}, {"w": torch.zeros(3, 2)}, {"w": t(FISHER)}, lam=1.0)
    with pytest.raises(ValueError, match=r"'w'.*fisher \(6,\)"):
        ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {"w": torch.zeros(6)}, lam=1.0)
    with pytest.raises(ValueError, match=r"'missing'.*not in params"):
        ewc_penalty({"w": p}, {"missing": p}, {"missing": t(FISHER)}, lam=1.0)
    with pytest.raises(ValueError, match=r"'w'.*no anchor"):
        ewc_penalty({"w": p}, {}, {"w": t(FISHER)}, lam=1.0)
    for lam in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="lam"):
            ewc_penalty({"w": p}, {"w": t(ANCHOR)}, {"w": t(FISHER)}, lam=lam)


# --------------------------------------------------------------------------- consolidation


def test_consolidate_with_decay_by_hand() -> None:
    previous = {"a": t(THETA), "b": t([1.0, 1.0])}
    new = {"a": t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), "c": t([2.0])}
    out = consolidate(previous, new, decay=0.5)
    assert set(out) == {"a", "b", "c"}
    # a: 0.5 * [[1, 2, 3], [4, 5, 6]] + 1 ; b: 0.5 * [1, 1] + 0 ; c: 0 + [2]
    assert_close(out["a"], t([[1.5, 2.0, 2.5], [3.0, 3.5, 4.0]]))
    assert_close(out["b"], t([0.5, 0.5]))
    assert_close(out["c"], t([2.0]))
    # inputs untouched, outputs not aliased to them
    assert_close(previous["a"], t(THETA))
    out["c"].add_(1)
    assert_close(new["c"], t([2.0]))


def test_consolidate_extremes_and_first_cycle() -> None:
    previous, new = {"a": t(THETA)}, {"a": t(FISHER)}
    assert_close(consolidate(previous, new, decay=0.0)["a"], t(FISHER))
    assert_close(consolidate(previous, new, decay=1.0)["a"], t(THETA) + t(FISHER))
    first = consolidate(None, new, decay=0.9)
    assert_close(first["a"], t(FISHER))
    assert first["a"].data_ptr() != new["a"].data_ptr()


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan])
def test_consolidate_rejects_decay_outside_unit_interval(decay: float) -> None:
    with pytest.raises(ValueError, match=f"decay.*{decay}"):
        consolidate(None, {"a": t(FISHER)}, decay=decay)


def test_consolidate_rejects_shape_change() -> None:
    with pytest.raises(ValueError, match="'a'"):
        consolidate({"a": t(FISHER)}, {"a": torch.zeros(3, 2)}, decay=0.5)


def test_normalize_fisher_divides_by_global_max() -> None:
    out = normalize_fisher({"a": t(FISHER), "b": t([4.0, 1.0])})
    assert_close(out["a"], t([[0.25, 0.125, 0.0625], [0.0, 0.5, 0.25]]))
    assert_close(out["b"], t([1.0, 0.25]))
    assert_close(normalize_fisher({"z": torch.zeros(2, 3)})["z"], torch.zeros(2, 3))


# --------------------------------------------------------------------------- Fisher estimation


def test_accumulate_fisher_is_the_mean_of_squares() -> None:
    g1 = {"w": t([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]])}
    g2 = {"w": t([[3.0, 2.0, 2.0], [-1.0, 0.0, 1.0]])}
    # squares: [[1, 4, 0], [9, 0, 1]] and [[9, 4, 4], [1, 0, 1]]; mean [[5, 4, 2], [5, 0, 1]]
    assert_close(accumulate_fisher([g1, g2])["w"], t([[5.0, 4.0, 2.0], [5.0, 0.0, 1.0]]))
    # a name missing from an item is a zero gradient there: [1, 4] / 2
    assert_close(accumulate_fisher([{"v": t([1.0, 2.0])}, {}])["v"], t([0.5, 2.0]))
    with pytest.raises(ValueError, match="no gradients"):
        accumulate_fisher([])


def linear_model() -> nn.Linear:
    # y = W x + b with W = [[1, 2, 0], [0, 1, -1]] (trainable) and b = 0 (frozen).
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(t([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]))
        model.bias.zero_()
    model.bias.requires_grad_(False)
    return model


def half_squared_error(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=-1).mean()


# With L = 0.5 * ||W x - y||^2 the gradient is dL/dW = r x^T, r = W x - y.
# Batch 1: x = [1, 0, 1], y = [0, 0]: W x = [1, -1], r = [1, -1],
#          g = [[1, 0, 1], [-1, 0, -1]], g^2 = [[1, 0, 1], [1, 0, 1]]
# Batch 2: x = [0, 1, 1], y = [0, 2]: W x = [2, 0], r = [2, -2],
#          g = [[0, 2, 2], [0, -2, -2]], g^2 = [[0, 4, 4], [0, 4, 4]]
BATCH1 = (t([[1.0, 0.0, 1.0]]), t([[0.0, 0.0]]))
BATCH2 = (t([[0.0, 1.0, 1.0]]), t([[0.0, 2.0]]))


def test_estimate_fisher_of_a_linear_model_by_hand() -> None:
    model = linear_model()
    fisher = estimate_fisher(model, [BATCH1, BATCH2], half_squared_error)
    assert set(fisher) == {"weight"}  # the frozen bias is left out
    assert_close(fisher["weight"], t([[0.5, 2.0, 2.5], [0.5, 2.0, 2.5]]))
    only_first = estimate_fisher(model, [BATCH1, BATCH2], half_squared_error, max_batches=1)
    assert_close(only_first["weight"], t([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))


def test_estimate_fisher_squares_the_batch_mean_gradient() -> None:
    # One batch holding both samples: the batch loss is their mean, so its gradient is the mean
    # [[0.5, 1, 1.5], [-0.5, -1, -1.5]], squared [[0.25, 1, 2.25], ...]: not the per-sample
    # mean of squares [[0.5, 2, 2.5], ...]. This pins down the documented estimator.
    both = (torch.cat([BATCH1[0], BATCH2[0]]), torch.cat([BATCH1[1], BATCH2[1]]))
    fisher = estimate_fisher(linear_model(), [both], half_squared_error)
    assert_close(fisher["weight"], t([[0.25, 1.0, 2.25], [0.25, 1.0, 2.25]]))


def test_estimate_fisher_leaves_the_model_as_it_found_it() -> None:
    model = nn.Sequential(linear_model(), nn.Dropout(0.5))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = estimate_fisher(model, [BATCH1, BATCH2], half_squared_error, names=["0.weight"])
    # eval mode inside: dropout off, so the hand values hold
    assert_close(fisher["0.weight"], t([[0.5, 2.0, 2.5], [0.5, 2.0, 2.5]]))
    assert all(m.training for m in model.modules())
    for n, p in model.named_parameters():
        assert p.grad is None
        assert torch.equal(p.detach(), before[n])


def test_estimate_fisher_errors() -> None:
    model = linear_model()
    with pytest.raises(ValueError, match="'nope'"):
        estimate_fisher(model, [BATCH1], half_squared_error, names=["nope"])
    with pytest.raises(ValueError, match=r"'bias'.*frozen"):
        estimate_fisher(model, [BATCH1], half_squared_error, names=["bias"])
    with pytest.raises(ValueError, match="no gradients"):
        estimate_fisher(model, [], half_squared_error)
    with pytest.raises(ValueError, match="max_batches"):
        estimate_fisher(model, [BATCH1], half_squared_error, max_batches=0)
    with pytest.raises(ValueError, match="batch 1 is not finite"):
        nan_batch = (BATCH2[0], t([[math.nan, 0.0]]))
        estimate_fisher(model, [BATCH1, nan_batch], half_squared_error)


# --------------------------------------------------------------------------- persistence


def assert_same(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert_close(a[name], b[name])


def test_save_load_roundtrip(tmp_path: Path) -> None:
    fisher = {"base.layers.0.lora_A.weight": t(FISHER), "b": t([1.0, 3.0])}
    anchor = {
        "base.layers.0.lora_A.weight": t(ANCHOR).to(torch.bfloat16),
        "b": t([1.0, 1.0]),
        "anchor_only": t([7.0]),
    }
    meta = {"version": "v0003", "decay": "0.9"}
    path = tmp_path / "ewc.safetensors"
    save_state(path, fisher, anchor, meta)
    fisher2, anchor2, meta2 = load_state(path)
    assert_same(fisher2, fisher)
    assert_same(anchor2, anchor)
    assert meta2 == meta
    assert [p.name for p in tmp_path.iterdir()] == ["ewc.safetensors"]  # no temporary left


def test_save_state_errors(tmp_path: Path) -> None:
    path = tmp_path / "ewc.safetensors"
    with pytest.raises(ValueError, match=r"'w'.*no anchor"):
        save_state(path, {"w": t(FISHER)}, {}, {})
    with pytest.raises(ValueError, match="metadata"):
        save_state(path, {}, {}, {"n": 3})  # type: ignore[dict-item]
    assert not path.exists()


def test_load_state_rejects_other_safetensors_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({"w": t(FISHER)}, str(path))
    with pytest.raises(ValueError, match="not an EWC state file"):
        load_state(path)


def test_add_penalty_grad_matches_autograd_of_the_penalty() -> None:
    from learners.ewc import add_penalty_grad_, ewc_penalty

    torch.manual_seed(0)
    theta = {"a": torch.randn(2, 3, requires_grad=True), "b": torch.randn(3, requires_grad=True)}
    anchor = {k: torch.randn_like(v) for k, v in theta.items()}
    fisher = {k: torch.rand_like(v) for k, v in theta.items()}
    ewc_penalty(theta, anchor, fisher, 3.0).backward()
    want = {k: v.grad.clone() for k, v in theta.items()}  # type: ignore[union-attr]
    value_autograd = ewc_penalty(theta, anchor, fisher, 3.0).detach()
    base_grad = {k: torch.full_like(v, 0.5) for k, v in theta.items()}
    for k, v in theta.items():
        v.grad = base_grad[k].clone()
    value = add_penalty_grad_(theta, anchor, fisher, 3.0)
    for k, v in theta.items():
        torch.testing.assert_close(v.grad, base_grad[k] + want[k])
    torch.testing.assert_close(value, value_autograd)
    # By hand for one entry: lam * F * (theta - anchor).
    k = "b"
    expected0 = 0.5 + 3.0 * fisher[k][0] * (theta[k][0] - anchor[k][0])
    torch.testing.assert_close(theta[k].grad[0], expected0.detach())  # type: ignore[index]
