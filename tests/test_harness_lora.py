"""peft's scaling is the rule's gamma; the own batched layer equals peft's layer; batched == loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import sfed_theory
from test_harness_helpers import synth, tiny_bert
from validation.backends import BatchedBackend, LoopBackend
from validation.batched_lora import BatchedLoRALinear
from validation.federated import run
from validation.models import build_task

# columns that legitimately differ between the two paths
_SKIP = {"train_s", "wall_s", "backend", "batched", "run_id"}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> str:
    return tiny_bert(tmp_path_factory.mktemp("tinybert"))


@pytest.fixture(scope="module")
def text_ds(tmp_path_factory) -> str:
    from test_harness_helpers import tiny_text_dataset

    return tiny_text_dataset(tmp_path_factory.mktemp("ds") / "d")


@pytest.mark.parametrize("rule,rank,n", [("lora", 3, 5), ("rslora", 5, 7), ("sfed", 7, 3), ("sfed", 6, 11)])
def test_peft_scaling_is_gamma(bert_dir, text_ds, rule, rank, n):
    cfg = synth(model=bert_dir, dataset=text_ds, rank=rank, n_clients=n, rule=rule, max_length=8)
    task = build_task(cfg)
    gamma = sfed_theory.scaling_factor(rule, cfg.alpha, rank, n)
    be = LoopBackend(task.model, task.targets, rank, gamma, torch.device("cpu"))
    assert len(be.layers) == 4  # query + value in 2 layers
    for layer in be.layers.values():
        assert layer.scaling["default"] == gamma
        assert layer.lora_alpha["default"] / layer.r["default"] == pytest.approx(gamma, rel=1e-14)
        # and the layer's output really carries gamma: (layer - base) = gamma * B A x
        torch.manual_seed(1)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_()
            x = torch.randn(5, layer.in_features, dtype=torch.float64)
            delta = layer(x) - layer.base_layer(x)
            ref = gamma * x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
        torch.testing.assert_close(delta, ref, rtol=1e-10, atol=1e-12)


def test_set_gamma_reaches_both_backends():
    cfg = synth()
    task = build_task(cfg)
    cpu = torch.device("cpu")
    loop = LoopBackend(task.model, task.targets, 4, 2.0, cpu)
    bat = BatchedBackend(task.model, task.targets, 4, 2.0, cpu, n_slots=1)
    A = {n: torch.randn(4, 16, dtype=torch.float64) for n in task.targets}
    B = {n: torch.randn(16, 4, dtype=torch.float64) for n in task.targets}
    x, y = {"x": task.train_inputs["x"][:8]}, task.train_labels[:8]
    before = loop.probe(A, B, x, y).loss
    for be in (loop, bat):
        be.set_gamma(5.0)
    assert all(layer.scaling["default"] == 5.0 for layer in loop.layers.values())
    after_loop, after_bat = loop.probe(A, B, x, y).loss, bat.probe(A, B, x, y).loss
    assert after_loop != pytest.approx(before)
    assert after_loop == pytest.approx(after_bat, rel=1e-12)


def test_own_layer_equals_peft_layer():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    d, k, r, G, gamma = 7, 5, 3, 3, 2.5
    host = nn.Sequential(nn.Linear(k, d)).double()
    peft_model = get_peft_model(host, LoraConfig(r=r, lora_alpha=gamma * r, target_modules=["0"], lora_dropout=0.0))
    pl = peft_model.base_model.model[0]
    pl.scaling["default"] = gamma
    A = torch.randn(G, r, k, dtype=torch.float64)
    B = torch.randn(G, d, r, dtype=torch.float64)
    own = BatchedLoRALinear(nn.Linear(k, d).double(), G, r, gamma)
    with torch.no_grad():
        own.base.load_state_dict(pl.base_layer.state_dict())
        own.A.copy_(A)
        own.B.copy_(B)
    x = torch.randn(G * 4, 2, k, dtype=torch.float64)  # (G*b, seq, k), client-major
    g_out = torch.randn(G * 4, 2, d, dtype=torch.float64)
    y_own = own(x)
    (y_own * g_out).sum().backward()
    for i in range(G):
        with torch.no_grad():
            pl.lora_A["default"].weight.copy_(A[i])
            pl.lora_B["default"].weight.copy_(B[i])
        pl.zero_grad()
        xi = x[i * 4:(i + 1) * 4]
        y = pl(xi)
        torch.testing.assert_close(y_own[i * 4:(i + 1) * 4], y, rtol=1e-12, atol=1e-12)
        (y * g_out[i * 4:(i + 1) * 4]).sum().backward()
        torch.testing.assert_close(own.A.grad[i], pl.lora_A["default"].weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(own.B.grad[i], pl.lora_B["default"].weight.grad, rtol=1e-10, atol=1e-12)


def _compare(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) > 0
    for c in a.columns:
        if c in _SKIP:
            continue
        if pd.api.types.is_float_dtype(a[c]):
            np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-7, atol=1e-10, err_msg=c)
        else:
            pd.testing.assert_series_equal(a[c], b[c], obj=c)


@pytest.mark.parametrize("scheme,opt", [("fedit", "adamw"), ("fedsa", "adamw"), ("ffa", "sgd"), ("exact", "adamw")])
def test_batched_equals_loop_synthetic(scheme, opt):
    cfg = synth(scheme=scheme, optimizer=opt, n_clients=4, participating=3, weighted=True)
    task = build_task(cfg)
    a = run(cfg, task)
    b = run(dataclasses.replace(cfg, batched=False), task)
    assert not a["diverged"].any()
    assert (a["update_fro"] > 0).all()
    _compare(a, b)


def test_batched_equals_loop_text(bert_dir, text_ds):
    cfg = synth(model=bert_dir, dataset=text_ds, max_length=8, n_clients=3, scheme="fedit", rank=2)
    task = build_task(cfg)
    a = run(cfg, task)
    b = run(dataclasses.replace(cfg, batched=False), task)
    _compare(a, b)


def test_identical_clients_fedit_equals_single_client():
    """K clients with the same start and the same batches, averaged by FedIT, equal one client:
    the batched path's summed loss does not couple clients."""
    cfg = synth(n_clients=4)
    task = build_task(cfg)
    be = BatchedBackend(task.model, task.targets, 4, 3.0, torch.device("cpu"), n_slots=4)
    torch.manual_seed(0)
    A = {n: torch.randn(4, 16, dtype=torch.float64) * 0.2 for n in task.targets}
    B = {n: torch.randn(16, 4, dtype=torch.float64) * 0.1 for n in task.targets}
    batches = [[({"x": task.train_inputs["x"][t * 4:(t + 1) * 4]}, task.train_labels[t * 4:(t + 1) * 4])]
               for t in range(3)]
    kw = dict(train_A=True, optimizer="adamw", lr=1e-2, weight_decay=0.0)
    stack = lambda T, K: {n: v.unsqueeze(0).expand(K, *v.shape).clone() for n, v in T.items()}  # noqa: E731
    A4, B4, l4, _ = be.train_clients(stack(A, 4), stack(B, 4), [s * 4 for s in batches], **kw)
    A1, B1, l1, _ = be.train_clients(stack(A, 1), stack(B, 1), batches, **kw)
    for n in task.targets:
        assert not torch.equal(A1[n][0], A[n])  # training moved the adapter
        torch.testing.assert_close(A4[n].mean(0), A1[n][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(B4[n].mean(0), B1[n][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l4, l1.expand(4, -1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_equals_loop_cuda():
    cfg = synth(scheme="fedit", device="cuda")
    a = run(cfg)
    b = run(dataclasses.replace(cfg, batched=False))
    assert (a["device_used"] == "cuda:0").all() or a["device_used"].str.startswith("cuda").all()
    _compare(a, b)


@pytest.mark.parametrize("backend", ["loop", "batched"])
def test_probe_capture_keeps_real_tokens_and_grad_w_gives_both_gradients(bert_dir, text_ds, backend):
    cfg = synth(model=bert_dir, dataset=text_ds, rank=3, max_length=12)
    task = build_task(cfg)
    cpu = torch.device("cpu")
    be = (LoopBackend(task.model, task.targets, 3, 2.5, cpu) if backend == "loop"
          else BatchedBackend(task.model, task.targets, 3, 2.5, cpu, n_slots=1))
    torch.manual_seed(0)
    A = {n: torch.randn(3, be.shapes[n][1], dtype=torch.float64) for n in task.targets}
    B = {n: 0.1 * torch.randn(be.shapes[n][0], 3, dtype=torch.float64) for n in task.targets}
    x = {k: v[:6] for k, v in task.train_inputs.items()}
    mask = x["attention_mask"]
    assert 0 < int(mask.sum()) < mask.numel()  # the batch really has padding
    out = be.probe(A, B, x, task.train_labels[:6], grads=True, capture=True)
    for n in task.targets:
        assert out.inputs[n].shape[0] == int(mask.sum())  # one row per real token, padding dropped
        G = out.grad_W[n]
        torch.testing.assert_close(out.grad_B[n], 2.5 * G @ A[n].T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.grad_A[n], 2.5 * B[n].T @ G, rtol=1e-10, atol=1e-12)
    # the captured rows are exactly the real-token rows of the layer's full input
    full: dict = {}
    name = task.targets[0]
    h = be.layers[name].register_forward_hook(lambda m, a, o: full.setdefault("x", a[0].detach()))
    try:
        be.probe(A, B, x, task.train_labels[:6])
    finally:
        h.remove()
    rows = full["x"].reshape(-1, full["x"].shape[-1])[mask.reshape(-1).bool()]
    torch.testing.assert_close(out.inputs[name], rows)
