"""`lmforge export --adapter-only`: a LoRA run's adapters in PEFT's format, loaded by peft itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmforge import checkpoint as ckpt  # noqa: E402
from lmforge.config import Config, LoraConfig  # noqa: E402
from lmforge.inference import load  # noqa: E402
from lmforge.interop.hf import import_folder  # noqa: E402
from lmforge.model.lora import apply_lora  # noqa: E402
from tests.interop.test_hf import random_hf_model, save_hf  # noqa: E402


def lora_run(root: Path, kind: str, targets: tuple[str, ...]) -> Path:
    """A LoRA run on an imported transformers model, its adapters random (B is zero when new)."""
    imported = import_folder(save_hf(random_hf_model(kind), root / "hf"), root / "imported")
    session = load(imported, "last", "cpu", dtype="fp32")
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    model = apply_lora(session.model, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn_like(param))
    config = Config(model=session.config.model, lora=lora)
    run = root / "run"
    ckpt.save_checkpoint(
        run, 3, model, state={}, config=config, tokenizer_file=session.tokenizer_file, val_loss=1.0
    )
    return run


@pytest.mark.parametrize(
    ("kind", "targets"),
    [
        ("llama", ("qkv", "proj", "up", "down")),
        ("qwen2", ("qkv", "up")),
        ("qwen3-wide-heads", ("qkv", "proj")),
        ("gpt2", ("qkv", "proj", "up", "down")),
    ],
)
def test_peft_loads_the_adapter_onto_the_original_model_with_lmforges_logits(
    cli, tmp_path: Path, kind: str, targets: tuple[str, ...]
) -> None:
    run = lora_run(tmp_path, kind, targets)
    code, out, err = cli("export", run, "--out", tmp_path / "adapter", "--adapter-only")
    assert code == 0, err
    written = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert written == {"adapter_config.json", "adapter_model.safetensors", ".lmforge"}  # .lmforge: the marker
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0
    original = random_hf_model(kind)  # the same seeded weights that were imported
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = original(idx).logits
        tuned = peft.PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
        theirs = tuned(idx).logits
        ours = load(run, "last", "cpu", dtype="fp32").model(idx)[0]  # adapters merged by lmforge
    assert (theirs - before).abs().max() > 1e-2  # the adapter changes the function
    assert (theirs - ours).abs().max().item() < 1e-4  # fp32


def test_adapter_only_refuses_a_run_without_lora(cli, tmp_path: Path) -> None:
    imported = import_folder(save_hf(random_hf_model("llama"), tmp_path / "hf"), tmp_path / "imported")
    code, _, err = cli("export", imported, "--out", tmp_path / "adapter", "--adapter-only")
    assert code == 1 and "not a LoRA run (lora.rank = 0)" in err.strip().splitlines()[-1]
    assert not (tmp_path / "adapter").exists()
