"""sfed_theory.peft: the rule as a peft LoraConfig, and gamma changes on a real peft model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

peft = pytest.importorskip("peft")

from sfed_theory import scaling_factor  # noqa: E402
from sfed_theory.peft import (lora_alpha_for, lora_config, lora_scalings, rescale_to_gamma,  # noqa: E402
                              set_scaling)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["inp", "mid", "out"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.inp, self.mid, self.out = nn.Linear(12, 20), nn.Linear(20, 20), nn.Linear(20, 6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def peft_model(config) -> nn.Module:
    model = peft.get_peft_model(Tiny(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking B (peft starts it at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def layer_delta_outputs(model, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted layer's input h and LoRA contribution layer(h) - base_layer(h)."""
    out = {}
    h = {}
    hooks = [model.get_submodule(f"base_model.model.{n}").register_forward_hook(
        lambda m, a, o, n=n: h.__setitem__(n, (a[0], o))) for n in TARGETS]
    try:
        model(x)
    finally:
        for hk in hooks:
            hk.remove()
    for n in TARGETS:
        inp, full = h[n]
        out[n] = inp, full - model.get_submodule(f"base_model.model.{n}").base_layer(inp)
    return out


@pytest.mark.parametrize("rule,rank,n,kw", [
    ("sfed", 16, 8, {}), ("sfed", 3, 7, {}), ("rslora", 5, 1, {}), ("lora", 6, 1, {}),
    ("sfed-general", 7, 10, {"rho": 0.1, "participating": 4}),
    ("sfed-general", 3, 3, {"weights": [5.0, 1.0, 2.0]}),
])
def test_lora_config_scaling_is_the_rules_gamma_on_every_layer(rule, rank, n, kw):
    alpha = 13.0  # != rank, so a scaling bug shows
    cfg = lora_config(rank, n, alpha, rule, target_modules=TARGETS, **kw)
    model = peft_model(cfg)
    gamma = scaling_factor(rule, alpha, rank, n, **kw)
    scal = lora_scalings(model)
    assert sorted(scal) == sorted(f"base_model.model.{t}" for t in TARGETS)
    assert all(abs(s - gamma) <= math.ulp(gamma) for s in scal.values()), (scal, gamma)  # peft: lora_alpha / r
    assert cfg.use_rslora is False and cfg.r == rank
    # and the layers really compute gamma * B @ A x
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name, (h, delta) in layer_delta_outputs(model, x).items():
            layer = model.get_submodule(f"base_model.model.{name}")
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            torch.testing.assert_close(delta, gamma * h @ A.T @ B.T, rtol=1e-5, atol=1e-6)


def test_rank_pattern_gets_the_rules_gamma_at_each_rank():
    cfg = lora_config(4, 16, 8.0, "sfed", target_modules=TARGETS, rank_pattern={"mid": 2})
    scal = lora_scalings(peft_model(cfg))
    assert scal["base_model.model.mid"] == scaling_factor("sfed", 8.0, 2, 16)
    assert scal["base_model.model.inp"] == scal["base_model.model.out"] == scaling_factor("sfed", 8.0, 4, 16)


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-3, 1e3), st.integers(1, 4096))
def test_lora_alpha_for_divides_back_to_gamma(gamma, rank):
    assert abs(lora_alpha_for(gamma, rank) / rank - gamma) <= math.ulp(gamma)
    assert abs(lora_alpha_for(gamma, rank, rslora=True) / math.sqrt(rank) - gamma) <= math.ulp(gamma)


def test_lora_config_refuses_what_the_rule_decides():
    for bad in ({"r": 8}, {"lora_alpha": 16}, {"use_rslora": True}, {"alpha_pattern": {"mid": 2}}):
        with pytest.raises(ValueError, match="sets .* itself from the rule"):
            lora_config(8, 4, 16, target_modules=TARGETS, **bad)
    with pytest.raises(ValueError, match="unknown rule"):
        lora_config(8, 4, 16, "sfed-adaptive")
    with pytest.raises(ValueError, match="rho"):
        lora_config(8, 4, 16, "sfed-general", rho=1.5)


def test_rescale_to_gamma_keeps_the_function_and_set_scaling_does_not():
    model = peft_model(lora_config(5, 4, 16.0, target_modules=TARGETS))
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), model.disable_adapter():
        y0 = model(x)
    with torch.no_grad():
        y1 = model(x)
        old = rescale_to_gamma(model, 2.5)
        y2 = model(x)
    assert all(v == pytest.approx(scaling_factor("sfed", 16.0, 5, 4), rel=1e-15) for v in old.values())
    assert set(lora_scalings(model).values()) == {2.5}
    assert float((y1 - y0).abs().max()) > 1e-3  # the adapter does something
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    g_old = 2.5
    set_scaling(model, 5.0)  # no rescale: the adapter's contribution doubles (to first order)
    with torch.no_grad():
        d = layer_delta_outputs(model, x)["inp"][1]
        set_scaling(model, g_old)
        d_old = layer_delta_outputs(model, x)["inp"][1]
    torch.testing.assert_close(d, 2 * d_old, rtol=1e-5, atol=1e-6)


def test_rescale_to_gamma_is_the_harness_rescale():
    """The peft path and the harness's apply_gamma_change give the same B, bit for bit."""
    from validation.aggregation import ServerState
    from validation.federated import apply_gamma_change

    model = peft_model(lora_config(5, 4, 16.0, target_modules=TARGETS))
    g_old = scaling_factor("sfed", 16.0, 5, 4)
    B = {n: model.get_submodule(f"base_model.model.{n}").lora_B["default"].weight.detach().clone() for n in TARGETS}
    A = {n: torch.zeros(1) for n in TARGETS}

    class NoBackend:
        def set_gamma(self, g):
            pass

    state = apply_gamma_change(ServerState(A, B, {}), NoBackend(), g_old, 0.37)
    rescale_to_gamma(model, 0.37)
    for n in TARGETS:
        assert torch.equal(model.get_submodule(f"base_model.model.{n}").lora_B["default"].weight, state.B[n])


def test_set_scaling_survives_save_and_load(tmp_path):
    model = peft_model(lora_config(6, 4, 16.0, target_modules=TARGETS))
    set_scaling(model, 0.7)
    model.save_pretrained(tmp_path)
    assert set(lora_scalings(model).values()) == {0.7}  # pinned exactly
    back = peft.PeftModel.from_pretrained(Tiny(), tmp_path)
    assert all(abs(s - 0.7) <= math.ulp(0.7) for s in lora_scalings(back).values())  # peft: lora_alpha / r


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="no LoRA layer"):
        lora_scalings(Tiny())
    model = peft_model(lora_config(2, 2, 4.0, target_modules=TARGETS))
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="gamma must be"):
            rescale_to_gamma(model, bad)


def test_sfed_theory_imports_without_peft_and_says_what_to_install():
    code = (
        "import sys; sys.modules['peft'] = None\n"  # peft not installed
        "import sfed_theory, sfed_theory.peft\n"
        "assert sfed_theory.scaling_factor('sfed', 16, 16, 4) == 8.0\n"
        "try:\n"
        "    sfed_theory.lora_config(8, 4, 16)\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR sfed_theory.peft needs the peft package: pip install peft" in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, sfed_theory; print('peft' in sys.modules, "
                            "'flwr' in sys.modules, 'torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert probe.stdout.split() == ["False", "False", "False"], probe.stderr
