import dataclasses
from pathlib import Path

import pytest

from lmforge.config import Config, ModelConfig, load_config
from lmforge.errors import LmforgeError
from lmforge.recipes import RECIPES_DIR

CONFIGS = RECIPES_DIR


def test_defaults_and_file_and_overrides(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layer = 6\nposition = "rope"\n[optim]\nbetas = [0.8, 0.9]\nlr = 1\n')
    config = load_config(
        path,
        [
            "model.d_model=256",
            "train.compile=true",
            "optim.name=muon",
            "train.device=cuda:1",
            "optim.betas=[0.9, 0.99]",
            "schedule.min_lr=1e-4",
        ],
    )
    assert config.model.n_layer == 6 and config.model.position == "rope" and config.model.d_model == 256
    assert config.train.compile is True and config.optim.name == "muon" and config.train.device == "cuda:1"
    assert config.optim.betas == (0.9, 0.99) and config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.schedule.min_lr == 1e-4


def test_to_toml_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["model.n_kv_head=2", "model.vocab_size=65", "optim.betas=[0.8, 0.9]"])
    path = tmp_path / "saved.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_a_config_file_saved_with_a_utf8_byte_order_mark_loads(tmp_path: Path) -> None:
    """Windows Notepad starts a UTF-8 file with a byte order mark: no part of the TOML."""
    path = tmp_path / "notepad.toml"
    path.write_bytes(b"\xef\xbb\xbf[model]\nn_layer = 3\n")
    assert load_config(path).model.n_layer == 3


def test_a_loaded_config_is_frozen_and_changes_by_copy() -> None:
    config = load_config(None, ["model.n_layer=6"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.n_layer = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = ModelConfig()
    sections = [getattr(config, f.name) for f in dataclasses.fields(config)]  # [data] to [privacy]
    for section in sections:
        first = dataclasses.fields(section)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, first, getattr(section, first))
    copy = dataclasses.replace(config, model=dataclasses.replace(config.model, n_layer=2))
    assert copy.model.n_layer == 2 and config.model.n_layer == 6


@pytest.mark.parametrize("name", sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.toml")))
def test_shipped_configs_load(name: str) -> None:
    load_config(CONFIGS / name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.n_layers=4"], "unknown key model.n_layers"),
        (["modle.n_layer=4"], "unknown key modle"),
        (["model.n_layer=four"], "model.n_layer must be an integer; got 'four'"),
        (["model.n_layer=2.5"], "model.n_layer must be an integer"),
        (["train.compile=1"], "train.compile must be true or false"),
        (["optim.betas=[0.9]"], "optim.betas must be a list of 2 numbers"),
        (["model.position=alibi"], "model.position must be one of learned, rope; got 'alibi'"),
        (
            ["model.d_model=100", "model.n_head=3"],
            "model.d_model (100) must be divisible by model.n_head (3)",
        ),
        (["model.n_kv_head=3"], "model.n_head (4) must be divisible by model.n_kv_head (3)"),
        (["model.n_layer=0"], "model.n_layer must be positive"),
        (["schedule.min_lr=0.1"], "schedule.min_lr must be in [0, optim.lr=0.001]"),
        (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
        (["train.device=tpu"], "train.device must be auto, cpu, cuda, cuda:N or mps"),
        (["model"], "expected SECTION.KEY=VALUE"),
        (["model=3"], "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(LmforgeError) as info:
        load_config(None, overrides, origin="cfg")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[model\nn_layer=")
    with pytest.raises(LmforgeError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "flat.toml").write_text("model = 3\n")
    with pytest.raises(LmforgeError, match="model must be a table"):
        load_config(tmp_path / "flat.toml")


def test_every_config_field_has_a_comment() -> None:
    """House style (torchtitan): each field says what it is, on its own line or the line above."""
    import ast

    import lmforge.config

    source = Path(lmforge.config.__file__).read_text()
    lines = source.splitlines()
    uncommented = [
        f"{cls.name}.{item.target.id}"
        for cls in ast.parse(source).body
        if isinstance(cls, ast.ClassDef)
        for item in cls.body
        if isinstance(item, ast.AnnAssign)
        and "#" not in lines[item.end_lineno - 1]
        and not lines[item.lineno - 2].strip().startswith("#")
    ]
    assert uncommented == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=inf"], "optim.lr must be a finite number; got inf"),
        (["optim.lr=nan"], "optim.lr must be a finite number; got nan"),
        (["optim.betas=[0.9, nan]"], "optim.betas must be a finite number; got nan"),
        (["model.norm_eps=-inf"], "model.norm_eps must be a finite number"),
        (["train.stop_at_val_loss=nan"], "train.stop_at_val_loss must be a finite number"),
        (["optim.eps=-1e-8"], "optim.eps must be positive"),
        (["optim.eps=0"], "optim.eps must be positive"),
        (["model.position=rope", "model.rope_theta=0"], "model.rope_theta must be positive"),
        (["model.rope_theta=-10000"], "model.rope_theta must be positive"),
        (["optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
        (["optim.muon_momentum=-0.1"], "optim.muon_momentum must be in [0, 1)"),
        (["model.vocab_size=16777217"], "model.vocab_size must be at most 16,777,216"),
        (["model.block_size=1048577"], "model.block_size must be at most 1,048,576"),
    ],
)
def test_values_that_type_check_but_cannot_work_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(LmforgeError) as info:
        load_config(None, overrides, origin="cfg")
    assert f"cfg: {message}" in str(info.value)


def test_non_finite_numbers_in_a_toml_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = inf\n")
    with pytest.raises(LmforgeError, match="optim.lr must be a finite number; got inf"):
        load_config(path)


def test_the_largest_accepted_sizes_load() -> None:
    config = load_config(None, ["model.vocab_size=16777216", "model.block_size=1048576"])
    assert (config.model.vocab_size, config.model.block_size) == (2**24, 2**20)


@pytest.mark.parametrize(
    ("value", "message"),
    [("[" * 3000, "nested too deeply"), ("9" * 5000, "a number has too many digits")],
)
def test_values_python_cannot_parse_are_one_line_errors(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(LmforgeError, match=f"--set model.n_layer=...: {message}"):
        load_config(None, [f"model.n_layer={value}"])
    path = tmp_path / "c.toml"
    path.write_text(f"[model]\nn_layer = {value}\n")
    with pytest.raises(LmforgeError, match=f"c.toml: not valid TOML \\({message}\\)"):
        load_config(path)


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_the_generators_cannot_take_is_refused(seed: str) -> None:
    with pytest.raises(LmforgeError, match=r"train.seed must be in \[0, 2\*\*32\)"):
        load_config(None, [f"train.seed={seed}"])
