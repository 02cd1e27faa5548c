"""Low-precision frozen bases for LoRA: the layer, its gradients, its state dict and its storage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("torchao")

from lmforge.config import LoraConfig, ModelConfig, load_config  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.model import GPT  # noqa: E402
from lmforge.model.lora import FrozenLinear, apply_lora, lower_base_precision  # noqa: E402

LOW = ["bf16", "int8", "nf4"]
# the largest error of one weight, relative to its matrix's absmax: bf16's 8-bit mantissa, int8's
# half step of 127 levels, nf4's widest gap between its 16 levels (0.7230 to 1.0) halved, 0.139, plus
# the error of its block's scale (itself quantized to int8)
RELATIVE_ERROR = {"bf16": 2.0**-8, "int8": 0.5 / 127 + 1e-6, "nf4": 0.16}


def linear(out_features: int = 96, in_features: int = 64) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features)
    layer.requires_grad_(False)
    return layer


@pytest.mark.parametrize("base_dtype", LOW)
def test_frozen_linear_computes_with_its_dequantized_weight_and_passes_gradients(base_dtype: str) -> None:
    plain = linear()
    frozen = FrozenLinear(plain, base_dtype, name="layer")
    weight = frozen.dequantized()
    error = (weight - plain.weight).abs().max() / plain.weight.abs().max()
    assert 0 < error <= RELATIVE_ERROR[base_dtype]
    x = torch.randn(3, 5, 64, requires_grad=True)
    frozen(x).pow(2).sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    expected = nn.functional.linear(reference_x, weight, plain.bias)
    expected.pow(2).sum().backward()
    torch.testing.assert_close(frozen(x), expected, rtol=1e-6, atol=1e-6)  # fp32 throughout
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-5)
    assert not frozen.weight.requires_grad and frozen.weight.grad is None


@pytest.mark.parametrize("base_dtype", LOW)
def test_frozen_linear_under_bf16_autocast_gives_fp32_input_gradients(base_dtype: str) -> None:
    frozen = FrozenLinear(linear(), base_dtype, name="layer")
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = frozen(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    expected = nn.functional.linear(x.detach(), frozen.dequantized(), frozen.bias)
    # bf16 matmul over 64 products: each rounded to 8 bits of mantissa
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)


def test_the_base_takes_less_memory_the_lower_its_precision() -> None:
    sizes = {}
    for base_dtype in LOW:
        weight = FrozenLinear(linear(256, 256), base_dtype, name="layer").weight
        inner = weight.__tensor_flatten__()[0] if hasattr(weight, "__tensor_flatten__") else []
        parts = [getattr(weight, name) for name in inner] or [weight]
        sizes[base_dtype] = sum(p.numel() * p.element_size() for p in parts)
    full = 256 * 256 * 4
    assert sizes["bf16"] == full // 2
    assert full // 4 <= sizes["int8"] < full // 4 * 1.05  # int8 values + one fp32 scale per row
    assert full // 8 <= sizes["nf4"] < full // 8 * 1.1  # 4 bits each + int8 block scales


@pytest.mark.parametrize("base_dtype", LOW)
def test_state_dict_holds_the_dequantized_base_and_loads_back_only_that(base_dtype: str) -> None:
    frozen = FrozenLinear(linear(), base_dtype, name="layer")
    state = frozen.state_dict()
    assert state["weight"].dtype == torch.float32 and torch.equal(state["weight"], frozen.dequantized())
    again = FrozenLinear(linear(), base_dtype, name="layer")
    assert not again.load_state_dict(state).missing_keys
    state["weight"][0, 0] += 1e-3
    with pytest.raises(LmforgeError, match="weight: the stored frozen base is not train.init_from's"):
        again.load_state_dict(state)


@pytest.mark.parametrize("base_dtype", LOW)
def test_lower_base_precision_replaces_the_frozen_block_linears_only(base_dtype: str) -> None:
    m = ModelConfig(n_layer=2, n_head=2, d_model=64, block_size=16, vocab_size=64, tie_embeddings=False)
    model = apply_lora(GPT(m), LoraConfig(rank=4, targets=("qkv", "down")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lower_base_precision(model, base_dtype)
    frozen = [name for name, module in model.named_modules() if isinstance(module, FrozenLinear)]
    # the targets' base layers and the untargeted proj and up; not the head, not the adapters
    assert len(frozen) == 2 * 4 and not any("head" in name or "lora_" in name for name in frozen)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    after = model.state_dict()
    assert after.keys() == before.keys()
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(idx)[0], model.base_model.model(idx)[0])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(
        ".base_layer.weight" in k or k.endswith(("proj.weight", "up.weight")) for k in changed
    )


def test_nf4_refuses_a_matrix_not_made_of_whole_blocks() -> None:
    with pytest.raises(LmforgeError, match="layer has 96 weights, not a multiple of the NF4 block of 64"):
        FrozenLinear(linear(3, 32), "nf4", name="layer")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.base_dtype=nf4"], "lora.base_dtype = 'nf4' needs lora.rank > 0"),
        (["lora.base_dtype=int8", "lora.rank=4", "train.compile=true"], "needs train.compile = false"),
        (["lora.base_dtype=int4", "lora.rank=4"], "lora.base_dtype"),
    ],
)
def test_base_dtype_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)
