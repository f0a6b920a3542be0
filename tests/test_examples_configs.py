"""Configuration examples and reference cannot drift from the code.

- docs/configuration.md is exactly what `python -m regina_cli.config` prints (`make docs`).
- examples/configs/<preset>.yaml loads to exactly the built-in preset, and its comments are
  the current ones (`python examples/configs/generate.py` rewrites them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from regina_cli.config import (
    PRESETS,
    ReginaConfig,
    apply_overrides,
    build_config,
    config_reference_markdown,
    load_yaml,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_configs", CONFIGS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == config_reference_markdown(), (
        "docs/configuration.md is out of date: run `make docs` (python -m regina_cli.config)"
    )


def test_one_example_config_per_preset():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_example_config_equals_the_builtin_preset(preset):
    loaded = apply_overrides(ReginaConfig(), load_yaml(CONFIGS / f"{preset}.yaml"))
    assert loaded == build_config(preset=preset)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_example_config_is_complete_so_it_overrides_any_sizing(preset):
    """Every key is in the file, so `--config` gives the preset even on an auto-sized model."""
    on_auto_sizing = build_config(n_genes=500, config_file=CONFIGS / f"{preset}.yaml")
    assert on_auto_sizing == build_config(preset=preset)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_example_config_comments_are_current(preset):
    text = (CONFIGS / f"{preset}.yaml").read_text()
    assert text == load_generator().preset_yaml(preset), (
        f"examples/configs/{preset}.yaml is out of date: run `python examples/configs/generate.py`"
    )


def test_set_overrides_win_over_the_config_file():
    config = build_config(config_file=CONFIGS / "demo.yaml", overrides=["ae.max_epochs=2"])
    assert config.ae.max_epochs == 2
    assert config.model.d_model == build_config(preset="demo").model.d_model
