"""Config: presets, YAML files and --set overrides, with unknown keys and bad types refused."""

import pytest

from regina_cli.config import (
    PRESETS,
    ReginaConfig,
    auto_preset,
    build_config,
    config_from_dict,
    parse_set,
    to_yaml,
)
from regina_cli.errors import ReginaError


def test_defaults_are_the_original_sizes():
    config = ReginaConfig()
    assert (config.model.seq_len, config.model.d_model, config.model.n_layers) == (16, 512, 4)
    assert (config.model.n_heads, config.model.z_dim) == (8, 256)
    assert config.ae.lr == 1e-4 and config.ae.grad_clip == 0.5 and config.ae.batch_size == 64
    assert config.gan.discriminator_every == 5 and config.gan.real_target == 0.9


def test_dixit_preset_carries_its_loss_weights():
    config = build_config(preset="dixit")
    assert config.ae.lambda_mse == 3.0 and config.ae.lambda_clf == 0.1
    assert config.gan.lambda_cycle == 1.0 and config.gan.prompt_value == -0.1


def test_precedence_preset_then_file_then_set(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("ae:\n  lr: 0.01\n  batch_size: 32\n")
    config = build_config(preset="demo", config_file=config_file, overrides=["ae.batch_size=8"])
    assert config.ae.lr == 0.01  # file beats preset
    assert config.ae.batch_size == 8  # --set beats file
    assert config.model.d_model == PRESETS["demo"]["model"]["d_model"]


def test_set_parses_yaml_values():
    assert parse_set(["model.discriminator_hidden=[256, 128]", "runtime.compile=true"]) == {
        "model": {"discriminator_hidden": [256, 128]},
        "runtime": {"compile": True},
    }
    assert build_config(overrides=["ae.lr=3"]).ae.lr == 3.0  # int accepted for a float
    assert build_config(overrides=["ae.lr=1e-3"]).ae.lr == 1e-3  # YAML reads 1e-3 as text


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("ae.learning_rate=1", "unknown config key ae.learning_rate"),
        ("optim.lr=1", "unknown config section"),
        ("ae.batch_size=1.5", "whole number"),
        ("ae.lr=fast", "takes a number"),
        ("runtime.compile=maybe", "true or false"),
        ("lr=1", "section.key=value"),
        ("runtime.device_data=sometimes", "runtime.device_data takes auto, always or never"),
        ("runtime.amp=fp8", "runtime.amp takes auto, bf16 or off"),
        ("ae.selection=best", "ae.selection takes"),
        ("ae.lr=-1", "ae.lr must be > 0"),
        ("ae.batch_size=0", "ae.batch_size must be >= 2"),
        ("ae.max_epochs=0", "ae.max_epochs must be >= 1"),
        ("gan.max_epochs=-1", "gan.max_epochs must be >= 0"),
        ("runtime.seed=-1", "runtime.seed must be >= 0"),
        ("runtime.seed=4294967296", "runtime.seed must be <="),
        ("model.dropout=1.0", "model.dropout must be < 1"),
        ("model.n_heads=3", "multiple of model.n_heads"),
        ("model.discriminator_hidden=[0]", "positive widths"),
        ("ae.lr=.inf", "finite"),
        ("gan.noise_decay_end=1", "noise_decay_end must not be before"),
        ("gan.modality=off", "gan.modality takes text, not False; quote the value"),
        ("model.gene_knowledge=true", "model.gene_knowledge takes text, not True"),
        ("ae.lr=0", "ae.lr must be > 0"),  # an open bound: a zero learning rate trains nothing
        ("runtime.compile=1", "true or false"),
        ("ae.lr=true", "takes a number"),
        ("model.discriminator_hidden=[]", "positive widths"),
    ],
)
def test_bad_overrides_are_one_line_errors(assignment, message):
    with pytest.raises(ReginaError, match=message):
        build_config(overrides=[assignment])


@pytest.mark.parametrize("assignment", ["model.gene_knowledge=null", "model.gene_knowledge=~", "model.gene_knowledge="])
def test_a_null_text_key_means_none_not_the_word_none(assignment):
    assert build_config(overrides=[assignment]).model.gene_knowledge == ""


def test_an_empty_text_key_in_a_config_file_means_none(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  gene_knowledge:\n")
    assert build_config(config_file=path).model.gene_knowledge == ""


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ReginaError, match="unknown preset"):
        build_config(preset="nope")
    with pytest.raises(ReginaError, match="does not exist"):
        build_config(config_file=tmp_path / "missing.yaml")


def test_yaml_round_trip():
    config = build_config(preset="norman", overrides=["gan.prompt_value=1.0"])
    import yaml

    assert config_from_dict(yaml.safe_load(to_yaml(config))) == config


@pytest.mark.parametrize("n_genes", [300, 500, 1000, 5045])
def test_auto_preset_sizes_fit_the_gene_count(n_genes):
    config = build_config(n_genes=n_genes)
    assert config.model.d_model % config.model.n_heads == 0
    assert config.model.d_model <= 512
    assert config == build_config(n_genes=n_genes)
    assert auto_preset(500)["model"]["d_model"] < auto_preset(5045)["model"]["d_model"]


def test_flags_layer_on_top_of_set_and_are_validated():
    config = build_config(preset="demo", overrides=["ae.max_epochs=3"], flags={"ae": {"max_epochs": 7}})
    assert config.ae.max_epochs == 7
    with pytest.raises(ReginaError, match="ae.batch_size must be >= 2"):
        build_config(flags={"ae": {"batch_size": -3}})


@pytest.mark.parametrize("overrides, message", [
    (["model.gene_knowledge=go", "gan.expression_prior=none"], "set gan.expression_prior=linear too"),
    (["gan.expression_prior=none", "gan.residual_decoding=false"], "set gan.residual_decoding=true too"),
    (["gan.match_control_mean=false", "gan.residual_decoding=false"], "set gan.residual_decoding=true too"),
])
def test_settings_that_would_silently_do_nothing_together_are_refused(overrides, message):
    """Gene knowledge reaches predictions only through the expression prior, and the prior and
    the matched controls only through residual decoding: without the other key each would be
    recorded in the run's config while changing nothing the user asked it to."""
    with pytest.raises(ReginaError, match=message):
        build_config(overrides=overrides)
    build_config(overrides=overrides[:1])  # alone, with the defaults, each is fine


def test_values_a_config_file_may_hold_are_taken_as_meant(tmp_path):
    """A config file whose every line is commented out is the defaults, not an error; a whole
    number written as 64.0 is 64; and noise may stop decaying the epoch it starts (a step)."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# ae:\n#   lr: 0.01\n")
    assert build_config(config_file=empty) == build_config()
    assert build_config(overrides=["ae.batch_size=64.0"]).ae.batch_size == 64
    assert build_config(overrides=["gan.noise_decay_start=5", "gan.noise_decay_end=5"]).gan.noise_decay_end == 5


def test_a_dataset_without_a_preset_gets_sizes_fitted_to_its_genes():
    """`n_genes` picks the model sized to the gene count (a 300-gene screen is not trained with the
    original 512-wide model, which would take hours on a laptop)."""
    fitted = build_config(n_genes=300)
    assert fitted.model.d_model == auto_preset(300)["model"]["d_model"] == 64
    assert fitted.ae.max_epochs == auto_preset(300)["ae"]["max_epochs"]


def test_layering_leaves_its_base_config_unchanged():
    """`layered` returns a new config: a base read once (phase 1's saved config, say) and layered
    for one purpose must not carry that purpose's overrides into the next comparison with it."""
    from regina_cli.config import layered

    base = ReginaConfig()
    layered(base, overrides=["ae.lr=0.5", "model.d_model=64", "model.n_heads=2"])
    assert base == ReginaConfig()


def test_a_dataset_named_like_a_preset_trains_with_that_preset(tmp_path):
    """`regina train-ae dixit ...` without --preset uses the dixit preset's loss weights (the
    published settings for that screen), not sizes fitted to its gene count."""
    from regina_cli.engine.run_config import resolve_run_config

    config, source = resolve_run_config("ae", tmp_path / "run", dataset="dixit")
    assert source == "preset dixit" and config == build_config(preset="dixit")
