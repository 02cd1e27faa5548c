"""`lmforge export --adapter-only`: a LoRA run's adapters alone, in PEFT's format.

The folder holds adapter_config.json (written by peft's own `LoraConfig`) and
adapter_model.safetensors with PEFT's tensor names for the transformers model that `lmforge export`
writes, so `peft.PeftModel.from_pretrained(original_model, folder)` adds them to the original model.
lmforge fuses q, k and v into one `qkv` matrix and gate and up into one `up`; a LoRA update
B @ A on a fused matrix is B's row blocks times the same A, so each of PEFT's separate projections
gets its rows of B and a copy of A: the same update, exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import open_checkpoint
from lmforge.config import ModelConfig, head_size
from lmforge.errors import LmforgeError
from lmforge.interop.hf import hf_family
from lmforge.model.gpt import mlp_hidden_size
from lmforge.model.lora import import_peft
from lmforge.staging import check_out, staged_folder

Tensors = dict[str, torch.Tensor]
WRAPPED = "base_model.model."  # the prefix of peft's wrapper, in lmforge's checkpoints and PEFT's files


def export_adapter(target: Path, out: Path, which: str = "best", *, overwrite: bool = False) -> Path:
    """Write the LoRA adapters of checkpoint `which` of `target` to `out` in PEFT's format."""
    peft = import_peft("--adapter-only")
    checkpoint = open_checkpoint(target, which)
    config = checkpoint.config
    if config.lora.rank == 0:
        raise LmforgeError(
            f"{checkpoint.path}: not a LoRA run (lora.rank = 0); export it whole, without --adapter-only"
        )
    family = hf_family(config.model)  # refuse before writing anything
    inputs = [target] if which in ("best", "last") else [target, Path(which)]
    check_out(out, "export", overwrite, inputs=inputs)
    stored = load_file(checkpoint.path / "model.safetensors")
    tensors = peft_tensors(stored, config.model, family)
    modules = sorted({name.split(".")[-3] for name in tensors})
    lora = peft.LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=modules,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores its weights [in, out]
    )
    with staged_folder(out, "export", overwrite, inputs=[*inputs, checkpoint.path]) as staging:
        lora.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def peft_tensors(stored: Tensors, m: ModelConfig, family: str) -> Tensors:
    """The lora_A and lora_B matrices of a LoRA checkpoint's weights under PEFT's names for `family`."""
    out: Tensors = {}
    for name, a in stored.items():
        if ".lora_A." not in name:
            continue
        layer = name.removeprefix(WRAPPED).split(".lora_A.")[0]  # blocks.{i}.attn.qkv
        b = stored[name.replace(".lora_A.", ".lora_B.")]
        for theirs, rows in _hf_parts(layer, m, family):
            out[f"{WRAPPED}{theirs}.lora_A.weight"] = a.clone()  # a copy each: safetensors stores no aliases
            out[f"{WRAPPED}{theirs}.lora_B.weight"] = b[rows].contiguous()
    if not out:
        raise LmforgeError("the checkpoint holds no LoRA adapters")
    return out


def _hf_parts(layer: str, m: ModelConfig, family: str) -> list[tuple[str, slice]]:
    """The transformers modules that lmforge's Linear `layer` (blocks.{i}.attn.qkv, ...) becomes, each
    with its rows of the output."""
    _, index, module, linear = layer.split(".")
    everything = slice(None)
    if family == "gpt2":
        names = {"qkv": "attn.c_attn", "proj": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}
        return [(f"transformer.h.{index}.{names[linear]}", everything)]
    p = f"model.layers.{index}."
    if linear == "qkv":
        hd = head_size(m)  # Qwen3's and Gemma's heads are wider than d_model / n_head
        q, kv = m.n_head * hd, (m.n_kv_head or m.n_head) * hd
        return [
            (p + "self_attn.q_proj", slice(0, q)),
            (p + "self_attn.k_proj", slice(q, q + kv)),
            (p + "self_attn.v_proj", slice(q + kv, q + 2 * kv)),
        ]
    if linear == "up":
        hidden = mlp_hidden_size(m)
        return [(p + "mlp.gate_proj", slice(0, hidden)), (p + "mlp.up_proj", slice(hidden, 2 * hidden))]
    return [(p + ("self_attn.o_proj" if linear == "proj" else "mlp.down_proj"), everything)]
