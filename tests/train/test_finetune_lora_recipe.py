"""The finetune-lora recipe: an imported model fine-tuned on chat data with QLoRA, then exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("torchao")

from lmforge.config import load_config  # noqa: E402
from lmforge.inference import load  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.interop.test_hf import random_hf_model, save_hf  # noqa: E402
from tests.train.conftest import read_metrics  # noqa: E402

RECIPE = REPO / "src" / "lmforge" / "recipes" / "finetune-lora.toml"
CHAT = REPO / "tests" / "fixtures" / "chat"


def test_the_recipe_is_qlora_on_chat_data_with_fine_tuning_settings() -> None:
    config = load_config(RECIPE)
    assert (config.data.kind, config.lora.rank, config.lora.base_dtype) == ("sft", 16, "nf4")
    assert set(config.lora.targets) == {"qkv", "proj", "up", "down"} and config.train.init_from
    assert config.optim.lr == 2e-4 and config.optim.weight_decay == 0.0 and config.schedule.name == "cosine"
    assert config.train.eval_interval == config.train.checkpoint_interval < config.train.max_steps
    header = "".join(line for line in RECIPE.read_text().splitlines() if line.startswith("#"))
    steps = ["lmforge download", "lmforge import", "lmforge finetune", "lmforge chat", "lmforge export"]
    assert [header.index(step) for step in steps] == sorted(header.index(step) for step in steps)


@pytest.mark.slow
def test_the_recipe_fine_tunes_an_imported_model_at_toy_size(cli, tmp_path: Path) -> None:
    hf = save_hf(random_hf_model("llama"), tmp_path / "hf")
    assert cli("import", hf, "--out", tmp_path / "imported")[0] == 0
    toy = [
        f"train.init_from={tmp_path / 'imported'}",
        f"data.dir={CHAT}",
        "train.max_steps=4",
        "train.eval_interval=2",
        "train.checkpoint_interval=2",
        "train.batch_size=2",
        "train.grad_accum_steps=1",
        "schedule.warmup_steps=1",
        "train.device=cpu",
        "log.progress=false",
    ]
    code, _, err = cli("finetune", RECIPE, "--out", tmp_path / "run", *sum((["--set", s] for s in toy), []))
    assert code == 0, err
    steps, evals = read_metrics(tmp_path / "run")
    assert [e["step"] for e in evals] == [2, 4] and len(steps) == 4
    assert load_config(tmp_path / "run" / "config.toml").lora.base_dtype == "nf4"
    # the adapters moved the model away from the imported one
    idx = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = load(tmp_path / "imported", "last", "cpu", dtype="fp32").model(idx)[0]
        tuned = load(tmp_path / "run", "last", "cpu", dtype="fp32").model(idx)[0]
    assert (tuned - start).abs().max() > 1e-4
    code, _, err = cli("export", tmp_path / "run", "--checkpoint", "last", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(idx).logits - tuned).abs().max().item() < 1e-4  # fp32
    code, _, err = cli("export", tmp_path / "run", "--adapter-only", "--out", tmp_path / "adapter")
    assert code == 0, err
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 16
