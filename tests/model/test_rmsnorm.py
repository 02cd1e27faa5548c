"""The fused CPU RMSNorm (`lmforge.model.gpt.RMSNorm`) against PyTorch's reference `F.rms_norm`.

Every test runs on both of its paths: the compiled kernel (`lmforge.model.cpu_kernels`) and the
aten passes it falls back to (`LMFORGE_CPU_KERNELS=0`, no C compiler, fp64 for gradcheck).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import cpu_kernels
from lmforge.model.gpt import HeadNorm, OffsetRMSNorm, RMSNorm, _FusedRMSNorm
from tests.conftest import BF16_EPS


@pytest.fixture(autouse=True, params=["kernel", "aten"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The norm's path for the test: the compiled kernel (required wherever a C compiler is), or aten."""
    if request.param == "aten":
        monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    elif cpu_kernels.library() is None:
        assert cpu_kernels._compiler() is None, "a C compiler is here, yet the kernel did not build"
        pytest.skip("no C compiler: the aten path only")
    return request.param


def _forward_backward(norm, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    """Output, input gradient and weight gradient of `norm(x, weight)` for the upstream `grad`."""
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = norm(x, weight)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad


def _reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, 1e-5)


def _fused(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _FusedRMSNorm.apply(x, weight, 1e-5, cpu_kernels.rms_norm_usable(x, weight))


def test_gradients_pass_gradcheck_in_fp64() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_fused, (x, weight))


def test_gradcheck_on_a_non_contiguous_view_like_the_qk_norm_input() -> None:
    torch.manual_seed(0)
    qkv = torch.randn(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    q = qkv[:, :, 1]  # a strided view, as q and k are views of the qkv projection
    weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert not q.is_contiguous()
    assert torch.autograd.gradcheck(_fused, (q, weight))


def test_gradients_for_a_non_contiguous_upstream_gradient() -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(3, 4, 8), torch.randn(8)
    grad = torch.randn(8, 4, 3).permute(2, 1, 0)  # (3, 4, 8), strided as a transpose's gradient is
    assert not grad.is_contiguous()
    fused, reference = (_forward_backward(f, x, weight, grad) for f in (_fused, _reference))
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trains", ["input", "weight"])
def test_computes_only_the_gradient_asked_for(trains: str) -> None:
    torch.manual_seed(0)
    x, weight, grad = torch.randn(4, 16, 64), torch.randn(64), torch.randn(4, 16, 64)
    grads = []
    for norm in (_fused, _reference):
        xi = x.clone().requires_grad_(trains == "input")
        wi = weight.clone().requires_grad_(trains == "weight")
        norm(xi, wi).backward(grad)
        grads.append(xi.grad if trains == "input" else wi.grad)
        assert (wi.grad if trains == "input" else xi.grad) is None
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_matches_the_reference_in_fp32() -> None:
    torch.manual_seed(0)
    x, weight, grad = torch.randn(4, 16, 64), torch.randn(64), torch.randn(4, 16, 64)
    fused, reference = (_forward_backward(f, x, weight, grad) for f in (_fused, _reference))
    for got, want in zip(fused, reference):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_matches_the_reference_in_bf16() -> None:
    torch.manual_seed(0)
    x, weight, grad = (torch.randn(*shape).bfloat16() for shape in ((4, 16, 64), (64,), (4, 16, 64)))
    exact = _forward_backward(_reference, x.double(), weight.double(), grad.double())
    for got, want, ideal in zip(
        _forward_backward(_fused, x, weight, grad), _forward_backward(_reference, x, weight, grad), exact
    ):
        assert got.dtype == want.dtype == torch.bfloat16
        # both round the fp32 result to bf16 once: within two bf16 roundings of the exact value,
        # relative to the tensor's scale (the weight's gradient sums 64 rows, so it gets more)
        scale = ideal.abs().max().item()
        assert (got.double() - ideal).abs().max().item() <= 4 * BF16_EPS * scale
        assert (want.double() - ideal).abs().max().item() <= 4 * BF16_EPS * scale


@pytest.mark.parametrize("backward_under_autocast", [False, True])
def test_module_matches_nn_rmsnorm_under_bf16_autocast(backward_under_autocast: bool) -> None:
    # the fused norm runs without an autocast guard: none of its ops may be one autocast recasts,
    # in the forward or in a backward called inside the autocast region
    torch.manual_seed(0)
    fused, reference = RMSNorm(32, eps=1e-5), torch.nn.RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        fused.weight.normal_()
    reference.load_state_dict(fused.state_dict())  # the same parameters, the same state dict
    x = torch.randn(2, 8, 32)
    outputs, grads = [], []
    for module in (fused, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = module(xi)
            if backward_under_autocast:
                y.square().sum().backward()
        if not backward_under_autocast:
            y.square().sum().backward()
        outputs.append(y)
        grads.append((xi.grad, module.weight.grad))
    assert outputs[0].dtype == outputs[1].dtype == torch.float32  # autocast runs rms_norm in fp32
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_head_norm_casts_its_weight_to_a_bf16_input() -> None:
    norm = HeadNorm(8, eps=1e-5)
    x = torch.randn(2, 3, 4, 8, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    with torch.autocast("cpu", torch.bfloat16):  # attention's inputs stay bf16, as with F.rms_norm
        assert norm(x).dtype == F.rms_norm(x, (8,), norm.weight.bfloat16(), 1e-5).dtype == torch.bfloat16
    reference = F.rms_norm(x, (8,), norm.weight.bfloat16(), 1e-5)
    torch.testing.assert_close(y, reference, rtol=0, atol=2 * BF16_EPS * 4)  # |y| < 4: two bf16 roundings


def test_head_norm_on_a_bf16_qkv_view_matches_the_reference_under_autocast() -> None:
    # the QK-norm's input in a bf16 step: a strided bf16 view of the qkv projection's output
    torch.manual_seed(0)
    norm = HeadNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    qkv = torch.randn(2, 5, 9, 16).bfloat16()  # (B, T, 3 x 3 heads, head_dim)
    grad = torch.randn(2, 5, 3, 16).bfloat16()
    results = []
    for run in (norm, lambda q: F.rms_norm(q.double(), (16,), norm.weight.double(), 1e-5)):
        source = qkv.detach().double() if run is not norm else qkv.detach()
        source.requires_grad_()
        norm.weight.grad = None
        with torch.autocast("cpu", torch.bfloat16):
            y = run(source[:, :, 3:6])
        y.backward(grad.to(y.dtype))
        results.append((y.detach(), source.grad, norm.weight.grad))
    (y, grad_qkv, grad_weight), (y_exact, grad_qkv_exact, grad_weight_exact) = results
    assert y.dtype == grad_qkv.dtype == torch.bfloat16 and grad_weight.dtype == torch.float32
    assert grad_qkv[:, :, :3].abs().max() == grad_qkv[:, :, 6:].abs().max() == 0  # only q's rows
    for got, exact in ((y, y_exact), (grad_qkv, grad_qkv_exact), (grad_weight, grad_weight_exact)):
        # one bf16 rounding of an fp32 result (the weight's gradient: of 30 rows of bf16 products),
        # relative to the tensor's scale
        scale = exact.abs().max().item()
        assert (got.double() - exact).abs().max().item() <= 4 * BF16_EPS * scale


@pytest.mark.parametrize("requires_grad", [False, True])
def test_saves_only_the_input_and_one_number_per_row(requires_grad: bool) -> None:
    x = torch.randn(4, 16, 64, requires_grad=True)
    norm = RMSNorm(64, eps=1e-5)
    norm.weight.requires_grad_(requires_grad)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    assert [tuple(t.shape) for t in saved] == [(4, 16, 64), (4, 16, 1), (64,)]
    assert saved[0] is x  # the input itself, not a copy


def _exact(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor):
    """The reference's output and gradients computed in fp64 from the same values."""
    return _forward_backward(_reference, x.double(), weight.double(), grad.double())


@pytest.mark.parametrize("width", [1, 7, 33, 256])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_fp64_at_any_width_and_thread_count(width: int, threads: int) -> None:
    # widths that are not a multiple of a vector register, and enough rows (> 32768 elements) that
    # two threads split them and add their halves of the weight's gradient
    torch.manual_seed(0)
    rows = 40000 // width + 3
    x, weight, grad = torch.randn(rows, width), torch.randn(width), torch.randn(rows, width)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _forward_backward(_fused, x, weight, grad)
    finally:
        torch.set_num_threads(before)
    for value, exact in zip(got, _exact(x, weight, grad)):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), exact, rtol=2e-5, atol=2e-5 * exact.abs().max().item())


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t[:, :, 2:4],  # heads of a fused qkv output: two strided leading dimensions
        lambda t: t[:, 1:, :3].transpose(0, 1),  # leading dimensions that fold into none: copied
        lambda t: t[1, :, 5],  # one leading dimension, strided
    ],
)
def test_strided_inputs_match_fp64(view) -> None:
    torch.manual_seed(0)
    qkv = torch.randn(3, 6, 9, 20)
    weight = torch.randn(20)
    x = view(qkv)
    assert not x.is_contiguous()
    grad = torch.randn(x.shape)
    for value, exact in zip(_forward_backward(_fused, x, weight, grad), _exact(x, weight, grad)):
        torch.testing.assert_close(value.double(), exact, rtol=2e-5, atol=2e-5 * exact.abs().max().item())


def test_inference_skips_autograd_and_gives_the_same_output() -> None:
    torch.manual_seed(0)
    norm, x = RMSNorm(48, eps=1e-5), torch.randn(2, 1, 48)
    with torch.no_grad():
        norm.weight.normal_()
        y = norm(x)
    assert y.grad_fn is None
    with torch.inference_mode():
        torch.testing.assert_close(norm(x), y, rtol=0, atol=0)
    torch.testing.assert_close(y, F.rms_norm(x, (48,), norm.weight.detach(), 1e-5), rtol=1e-5, atol=1e-5)


def test_row_layout_folds_leading_dimensions() -> None:
    qkv = torch.empty(2, 5, 9, 16)
    assert cpu_kernels.row_layout(qkv) == (90, 90, 0, 16)  # contiguous: one strided level
    assert cpu_kernels.row_layout(qkv[:, :, 3:6]) == (30, 3, 144, 16)  # (B·T) x heads
    assert cpu_kernels.row_layout(qkv[:, :, 3]) == (10, 10, 0, 144)
    assert cpu_kernels.row_layout(qkv.transpose(0, 1)[:, :, :2]) is None  # three strided levels
    assert cpu_kernels.row_layout(qkv.transpose(2, 3)) is None  # the last dimension strided


def test_bf16_results_are_the_fp32_results_rounded_to_nearest_even() -> None:
    # a bf16 input computes in fp32 and rounds once, as PyTorch's .bfloat16() rounds (ties to even)
    torch.manual_seed(0)
    x, weight, grad = (torch.randn(*shape).bfloat16() for shape in ((64, 96), (96,), (64, 96)))
    y16, dx16, _ = _forward_backward(_fused, x, weight, grad)
    y32, dx32, _ = _forward_backward(_fused, x.float(), weight.float(), grad.float())
    assert torch.equal(y16, y32.bfloat16())
    assert torch.equal(dx16, dx32.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_offset_norm_matches_its_fp32_formula(dtype: torch.dtype) -> None:
    # Gemma's norm: F.rms_norm in fp32, scaled by 1 + weight in fp32, cast back to x's dtype once
    torch.manual_seed(0)
    norm = OffsetRMSNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.2)
    x, grad = torch.randn(3, 5, 24).to(dtype), torch.randn(3, 5, 24).to(dtype)

    def formula(t: torch.Tensor) -> torch.Tensor:
        return (F.rms_norm(t.float(), (24,), None, 1e-6) * (1.0 + norm.weight.float())).to(t.dtype)

    results = []
    for run in (norm, formula):
        xi = x.clone().requires_grad_()
        norm.weight.grad = None
        y = run(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, norm.weight.grad))
    # the same fp32 values rounded once: equal in fp32 to rounding, and bf16 within one rounding
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0, "atol": 8 * BF16_EPS}
    for got, want in zip(*results):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("width", [1, 4, 16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_an_input_of_the_wrong_width_raises_as_nn_rmsnorm_does(width: int, requires_grad: bool) -> None:
    # the kernel reads x.shape[-1] weights: a wider input must not read past the weight's 8
    norm = RMSNorm(8, eps=1e-5)
    x = torch.randn(3, width, requires_grad=requires_grad)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        norm(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_none_is_nn_rmsnorms_default(dtype: torch.dtype) -> None:
    # F.rms_norm's default epsilon is its compute type's: fp32's for a bf16 input, not bf16's 2^-7,
    # which would swamp mean(x²) of a small input
    torch.manual_seed(0)
    fused, reference = RMSNorm(32).to(dtype), torch.nn.RMSNorm(32).to(dtype)
    x = (torch.randn(4, 32) * 1e-3).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(fused(x).float(), reference(x).float(), rtol=0, atol=4 * BF16_EPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_spread_as_in_the_reference(dtype: torch.dtype) -> None:
    # a row with a NaN is NaN; a row with an infinity has rms = inf: NaN there, 0 elsewhere
    torch.manual_seed(0)
    x, weight, grad = torch.randn(4, 16).to(dtype), torch.randn(16).to(dtype), torch.randn(4, 16).to(dtype)
    x[0, 3], x[1, 2], x[2, 0] = float("nan"), float("inf"), -float("inf")
    for got, want in zip(
        _forward_backward(_fused, x, weight, grad), _forward_backward(_reference, x, weight, grad)
    ):
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        finite = want.isfinite()
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-2, atol=1e-2)
