"""lowbit.powers.power (t^e by fixed fp32 operations, DGE's power) against the exact power in float64."""
import math

import pytest
import torch

from lowbit.powers import power


@pytest.mark.parametrize("e", [-0.8, -0.5, -2 / 3, -0.95, 0.5, 1.5])
def test_power_is_within_a_few_ulp_of_the_exact_power(e):
    """|power − t^e| ≤ (3 + 1.5·|y|)·2^-24·t^e with y = e·log2 t, for results in fp32's normal range (below it
    power stops at 2^-126): the polynomials add a few ulp, and two fp32 roundings of y (log2 t's sum and the
    product with e, each up to |y|·2^-24 absolute) become ln 2 times that relative error in 2^y. Bugs caught: a
    wrong constant or a dropped term (errors of 1e-5 and more), the mantissa not folded into [√½, √2)."""
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.rand(200_000, generator=g), torch.exp2(-20 * torch.rand(50_000, generator=g)),
                   torch.tensor([1.0, 0.5, 2.0 ** -126, 1 - 2.0 ** -24, math.sqrt(2) / 2])])
    e32 = float(torch.tensor(e, dtype=torch.float32))  # the exponent power() uses
    got, exact = power(t, e).double(), t.double().pow(e32)
    y = (e32 * torch.log2(t.double())).abs()
    normal = exact >= 2.0 ** -126
    assert ((got - exact).abs() <= (3 + 1.5 * y) * 2.0 ** -24 * exact)[normal].all()


def test_power_special_values():
    """t = 1 gives exactly 1 (DGE's grid points then give exactly 1/k); t below 2^-126 gives 0^e; NaN stays."""
    t = torch.tensor([1.0, 0.0, 1e-40, 2.0 ** -149, math.nan])
    assert power(t, -0.8).tolist()[:4] == [1.0, math.inf, math.inf, math.inf] and power(t, -0.8)[4].isnan()
    assert power(t, 0.0)[:4].tolist() == [1.0] * 4
    assert power(t, 0.5)[:4].tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="fp32"):
        power(t.double(), 0.5)
