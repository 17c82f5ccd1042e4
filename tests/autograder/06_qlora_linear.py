"""Hidden checks of Chapter 6's exercises (scripts/assignments.py puts them in the autograder)."""

import torch

from qlora_edu import dequantize_4bit, quantize_4bit


def ch6_ex_targets(env):
    """The adapters of q_proj and v_proj alone, counted in the all-linear model."""
    expected = sum(
        p.numel()
        for name, p in env["ours"].named_parameters()
        if p.requires_grad and ("q_proj" in name or "v_proj" in name)
    )
    assert env["qv_trainable"] == expected


def ch6_ex_backward(env):
    """One dequantization in forward, one more in backward."""
    assert tuple(env["dequantizations"]) == (1, 1)


def ch6_ex_function(env):
    """Other shapes: a 40 x 96 weight, an input of four dimensions, against x W^T in float32."""
    weight = torch.randn(40, 96, generator=torch.Generator().manual_seed(9))
    packed, state = quantize_4bit(weight)
    dense = dequantize_4bit(packed, state)
    x = torch.randn(2, 2, 3, 96, requires_grad=True)
    out = env["My4bitMatmul"].apply(x, packed, state)
    torch.testing.assert_close(out, x.detach() @ dense.T)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ dense)


def ch6_ex_merge(env):
    """The gap, remeasured on other inputs, is below the same bound."""
    q_proj = env["ours"].model.layers[0].self_attn.q_proj
    h = torch.randn(16, q_proj.in_features, generator=torch.Generator().manual_seed(4))
    gap = (q_proj.merge()(h) - q_proj(h)).abs().max()
    assert float(env["gap"]) < 1e-5 and gap < 1e-5
