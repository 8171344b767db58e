"""Every layer type the issue names, variationalized through its parameters: forward in train
(fresh samples, means untouched) and eval (the plain model's output), backward reaching every
mean and every scale, a finite prior_loss."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

import pyvarinf2 as pv


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # one intra-op thread: no OpenMP spin-waiting against other processes on a busy CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seq(*layers):
    return nn.Sequential(*layers)


class MHA(nn.Module):
    """MultiheadAttention called with keyword arguments (self-attention + a padding mask)."""

    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **kw)

    def forward(self, x, mask=None):
        return self.attn(x, x, x, key_padding_mask=mask)[0]


CASES = {
    "linear": (lambda: nn.Linear(5, 3), lambda: (torch.randn(4, 5),), {}),
    "linear_no_bias": (lambda: nn.Linear(5, 3, bias=False), lambda: (torch.randn(4, 5),), {}),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3, groups=2), lambda: (torch.randn(2, 2, 8),), {}),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), lambda: (torch.randn(2, 2, 6, 6),), {}),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: (torch.randn(2, 2, 4, 4, 4),), {}),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(2, 3, 3, stride=2),
                         lambda: (torch.randn(2, 2, 5),), {}),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2, bias=False),
                         lambda: (torch.randn(2, 2, 4, 4),), {}),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2),
                         lambda: (torch.randn(2, 2, 3, 3, 3),), {}),
    "batchnorm1d": (lambda: _seq(nn.Linear(3, 4), nn.BatchNorm1d(4)),
                    lambda: (torch.randn(6, 3),), {}),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), lambda: (torch.randn(4, 3, 5, 5),), {}),
    "batchnorm3d": (lambda: nn.BatchNorm3d(2), lambda: (torch.randn(3, 2, 3, 3, 3),), {}),
    "layernorm": (lambda: _seq(nn.Linear(3, 6), nn.LayerNorm(6)),
                  lambda: (torch.randn(4, 3),), {}),
    "embedding": (lambda: nn.Embedding(10, 4, padding_idx=0),
                  lambda: (torch.tensor([[1, 2, 3], [4, 5, 9]]),), {}),
    "lstm_2_layers": (lambda: nn.LSTM(4, 5, num_layers=2), lambda: (torch.randn(3, 2, 4),), {}),
    "lstm_proj_bidir": (lambda: nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True,
                                        batch_first=True),
                        lambda: (torch.randn(2, 3, 4),), {}),
    "gru_2_layers": (lambda: nn.GRU(4, 5, num_layers=2, batch_first=True, bidirectional=True),
                     lambda: (torch.randn(2, 3, 4),), {}),
    "multihead_attention": (lambda: MHA(), lambda: (torch.randn(3, 2, 8),),
                            {"mask": torch.tensor([[False, False, True], [False] * 3])}),
    "multihead_attention_kdim": (
        lambda: nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True),
        lambda: (torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 6)), {}),
    "transformer_encoder_layer": (
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
        lambda: (torch.randn(2, 3, 8),), {}),
    "transformer_encoder_2_layers": (
        lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 2,
                                      enable_nested_tensor=False),
        lambda: (torch.randn(3, 2, 8),), {}),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10),
                 lambda: (torch.randn(2, 3, 32, 32),), {}),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                           lambda: (torch.randn(2, 3, 32, 32),), {}),
}


def first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_layer(case):
    make, inputs, kwargs = CASES[case]
    model = make()
    plain = copy.deepcopy(model)
    vm = pv.variationalize(model, init_std=0.05)
    args = inputs()
    n_params = len(list(plain.parameters()))
    assert len(list(vm.named_posteriors())) == n_params
    assert len(list(vm.parameters())) == 2 * n_params

    # eval: exactly the plain model (the posterior means)
    vm.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(first(vm(*args, **kwargs)), first(plain(*args, **kwargs)),
                                   rtol=0, atol=0)

    # train: fresh weights per forward, means untouched
    vm.train()
    means_before = [p.detach().clone() for p in vm.mean_parameters()]
    with torch.no_grad():
        a = first(vm(*args, **kwargs))
        b = first(vm(*args, **kwargs))
    assert a.shape == first(plain(*args, **kwargs)).shape
    assert not torch.equal(a, b)
    for before, p in zip(means_before, vm.mean_parameters()):
        assert torch.equal(before, p)

    # the data term's backward reaches every mean and every scale (so every layer really uses
    # the sampled weights); the prior loss is finite and differentiable
    out = first(vm(*args, **kwargs))
    weights = torch.randn_like(out)
    names = [name for name, _ in vm.named_posteriors()]
    leaves = [(name, "mean", post.mean) for name, post in vm.named_posteriors()]
    leaves += [(name, "scale", s) for name, post in vm.named_posteriors() for s in post.parameters()]
    grads = torch.autograd.grad((weights * out).sum() + (out ** 2).sum(),
                                [p for _, _, p in leaves], allow_unused=True)
    for (name, what, _), g in zip(leaves, grads):
        assert g is not None, f"{case}: no gradient for the {what} of {name}"
        assert torch.isfinite(g).all(), f"{case}: non-finite {what} gradient of {name}"
        assert (g != 0).any(), f"{case}: zero gradient for the {what} of {name}"
    kl = vm.prior_loss()
    assert kl.shape == () and torch.isfinite(kl) and kl > 0
    kl.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, _, p in leaves)
    assert len(names) == n_params
