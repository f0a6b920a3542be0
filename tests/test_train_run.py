"""Both training phases end to end on CPU with a tiny model: on the demo screen and a real one,
early stopping, exact resume, the pre-emption save, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from typer.testing import CliRunner

from cli_helpers import assert_user_error, invoke
from regina_cli import keys
from regina_cli.cli import app
from regina_cli.config import build_config
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.preemption import TrainingInterrupted
from regina_cli.engine.run_config import ConfigRequest, resolve_run_config
from regina_cli.engine.train_ae import AutoencoderPhase, train_autoencoder
from regina_cli.engine.train_gan import train_gan
from regina_cli.errors import ReginaError

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=16", "model.ff_mult=2",
        "model.classifier_hidden=16", "model.transition_hidden=32", "model.discriminator_hidden=[32,16]",
        "ae.batch_size=64", "ae.lr=0.003", "gan.batch_size=64", "gan.discriminator_every=2",
        "gan.correction_choice=false"]  # phase 2 trains (the choice can keep the prior alone: test_predict)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second intra-op thread costs more than it gains (and on a shared CPU,
    OpenMP's spinning threads make it many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(*extra: str):
    return build_config(preset="demo", overrides=TINY + list(extra))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """A small simulated screen with a split and stress labels, shared by this module's tests."""
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset

    data_dir = tmp_path_factory.mktemp("data")
    write_dataset(simulate_screen(n_cells=400, n_genes=160, n_singles=8, n_doubles=4, seed=0), "screen", data_dir)
    split_dataset("screen", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("screen", "stress", split="simulation_1", data_dir=data_dir)
    return data_dir


def train(data_dir, run_dir, config, **kw):
    return train_autoencoder("screen", split="simulation_1", labels="stress", run_dir=run_dir, config=config,
                             data_dir=data_dir, device="cpu", progress="silent", **kw)


def history(run_dir, phase=keys.AE_DIR):
    return ckpt.read_history(ckpt.PhasePaths(run_dir, phase))


def weights(path):
    return torch.load(path, weights_only=True)


def test_cli_trains_both_phases_on_the_demo(demo_data, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    sets = [a for s in TINY for a in ("--set", s)]
    result = CliRunner().invoke(app, ["train-ae", "screen", "--split", "simulation_1", "--labels", "stress",
                                      "--run", str(run_dir), "--data-dir", str(demo_data), "--device", "cpu",
                                      "--max-epochs", "3", *sets])
    assert result.exit_code == 0, result.output
    assert "d_model 16" in result.output  # the chosen sizes are printed
    rows = history(run_dir)
    assert len(rows) == 3 and float(rows[-1]["train_mse"]) < float(rows[0]["train_mse"])
    for name in ("config.yaml", "meta.json", "history.csv", "model.pt", "best.pt", "last.pt"):
        assert (run_dir / "ae" / name).is_file()
    meta = json.loads((run_dir / "ae" / "meta.json").read_text())
    assert meta["dataset"] == "screen" and meta["label_classes"] == ["Homeostasis", "Stressed"]
    assert len(meta["gene_names"]) == 160 and meta["training"]["stop_reason"].startswith("max_epochs")
    assert meta["selection"] == "variance_preservation"
    assert "encoder.token_proj.weight" in weights(run_dir / "ae" / "model.pt")

    result = CliRunner().invoke(app, ["train-gan", "--run", str(run_dir), "--data-dir", str(demo_data),
                                      "--device", "cpu", "--max-epochs", "2"])
    assert result.exit_code == 0, result.output
    rows = history(run_dir, keys.GAN_DIR)
    # epoch 0 scores the untrained transition (a candidate for the best weights), then 2 epochs
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    assert {"val_pearson_delta", "val_pearson_delta_top20_de", "train_cycle", "train_disc"} <= set(rows[1])
    gan_meta = json.loads((run_dir / "gan" / "meta.json").read_text())
    assert gan_meta["selection"] == "pearson_delta_selectable" and gan_meta["validation_conditions_scored"]
    fit = gan_meta["training"]["prompt_fit"]  # the prior's weights, chosen by the folds, are recorded and shown
    assert fit["prior_covariation_weight"] in (0.0, 0.5, 1.0, 2.0, 3.0) and "expression prior" in result.output
    summary_row = result.output.split("last val_pearson_delta_selectable")[1][:40]
    assert "inf" not in summary_row  # an epoch that may not be kept is said in words, not as -inf
    if rows[-1]["val_pearson_delta_selectable"] == "-inf":
        assert "not above epoch" in " ".join(summary_row.replace("│", " ").split())

    from regina_cli.engine.trained import load_trained

    trained = load_trained(run_dir, device="cpu")
    assert trained.gan is not None and trained.meta.gene_names == meta["gene_names"]
    phase2_decoder = weights(run_dir / "gan" / "model.pt")
    assert torch.equal(trained.autoencoder.decoder.token_out.weight, phase2_decoder["decoder.token_out.weight"])


def test_real_screen_trains_and_reconstruction_improves(mcfaline_path, tmp_path):
    runner = CliRunner()
    data_dir = str(tmp_path / "data")
    for args in (["fetch", "mcfaline", "--from", str(mcfaline_path)], ["split", "mcfaline", "--seed", "1"],
                 ["label", "mcfaline", "--method", "stress", "--split", "simulation_1"]):
        result = runner.invoke(app, [*args, "--data-dir", data_dir])
        assert result.exit_code == 0, result.output
    config = build_config(preset="demo", overrides=TINY + ["ae.max_epochs=2", "gan.max_epochs=1"])
    summary = train_autoencoder("mcfaline", split="simulation_1", labels="stress", run_dir=tmp_path / "run",
                                config=config, data_dir=data_dir, device="cpu", progress="silent")
    rows = history(tmp_path / "run")
    assert summary["epochs"] == 2 and float(rows[-1]["train_mse"]) < float(rows[0]["train_mse"])
    meta = json.loads((tmp_path / "run" / "ae" / "meta.json").read_text())
    assert len(meta["cell_types"]) == 3  # controls are matched per cell line
    summary = train_gan(tmp_path / "run", data_dir=data_dir, device="cpu", progress="silent")
    assert summary["epochs"] == 1
    gan_meta = json.loads((tmp_path / "run" / "gan" / "meta.json").read_text())
    # none of McFaline's CRISPRi targets is among its 500 measured genes: learned prompts only
    assert len(gan_meta["learned_genes"]) == len(meta["train_conditions"]) - 1
    # no validation target has a prompt: two training conditions are held out of phase 2 to validate on
    assert gan_meta["validation_source"].startswith("2 training conditions held out")
    assert len(gan_meta["held_out_conditions"]) == 2 and set(gan_meta["held_out_conditions"]) <= set(meta["train_conditions"])
    # the expression prior works per cell line (gan.prior_cell_types), and prediction finds each line's row
    assert gan_meta["prior_cell_types"] == ["A172", "T98G", "U87MG"]
    from regina_cli.engine.trained import load_trained
    departures = load_trained(tmp_path / "run", device="cpu").gan.expression_prior.cell_type_change
    assert departures.shape == (3, 500) and bool((departures.abs().sum(1) > 0).all())
    trained = sorted(set(meta["train_conditions"]) - {"ctrl"} - set(gan_meta["held_out_conditions"]))[0]
    result = runner.invoke(app, ["predict", "--run", str(tmp_path / "run"), "--conditions", trained, "--cells", "30",
                                 "--data-dir", data_dir, "--out", str(tmp_path / "pred.h5ad")])
    assert result.exit_code == 0, result.output


def test_consistency_early_stopping_triggers_on_rising_l_cons(demo_data, tmp_path, monkeypatch):
    real_validate = AutoencoderPhase.validate

    def drifting(self, epoch):  # an injected run whose round trip drifts more every epoch
        return {**real_validate(self, epoch), "cons": 0.1 * epoch}

    monkeypatch.setattr(AutoencoderPhase, "validate", drifting)
    config = tiny_config("ae.max_epochs=10", "ae.consistency_patience=2", "ae.min_epochs=3")
    summary = train(demo_data, tmp_path / "run", config)
    assert summary["epochs"] == 3 and summary["stop_reason"].startswith("consistency")
    meta = json.loads((tmp_path / "run" / "ae" / "meta.json").read_text())
    assert meta["training"]["stop_reason"] == summary["stop_reason"]
    assert [r["stop_counter"] for r in history(tmp_path / "run")] == ["0", "1", "2"]


def test_consistency_early_stopping_stays_quiet_on_a_healthy_run(demo_data, tmp_path, monkeypatch):
    real_validate = AutoencoderPhase.validate
    monkeypatch.setattr(AutoencoderPhase, "validate",
                        lambda self, epoch: {**real_validate(self, epoch), "cons": 1.0 / epoch})
    summary = train(demo_data, tmp_path / "run", tiny_config("ae.max_epochs=4", "ae.consistency_patience=1",
                                                             "ae.min_epochs=1"))
    assert summary["epochs"] == 4 and summary["stop_reason"].startswith("max_epochs")


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    config = tiny_config("ae.max_epochs=3", "ae.batch_size=32")  # 191 training cells: 5 steps an epoch
    train(demo_data, tmp_path / "straight", config)

    real_step = AutoencoderPhase.train_step

    def preempted(self, epoch, step):
        if (epoch, step) == (2, 2):
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before pre-empting a job
        return real_step(self, epoch, step)

    monkeypatch.setattr(AutoencoderPhase, "train_step", preempted)
    with pytest.raises(TrainingInterrupted, match="--resume") as stopped:
        train(demo_data, tmp_path / "resumed", config)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    state = weights(tmp_path / "resumed" / "ae" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)  # mid-epoch: one epoch done, two steps into the next
    monkeypatch.setattr(AutoencoderPhase, "train_step", real_step)

    train(demo_data, tmp_path / "resumed", config, resume=True)
    a = weights(tmp_path / "straight" / "ae" / "last.pt")["modules"]["autoencoder"]
    b = weights(tmp_path / "resumed" / "ae" / "last.pt")["modules"]["autoencoder"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in history(tmp_path / "resumed")] == ["1", "2", "3"]
    assert history(tmp_path / "resumed")[-1]["train_mse"] == history(tmp_path / "straight")[-1]["train_mse"]


def test_a_stop_signal_during_validation_stops_after_the_epoch_is_saved(demo_data, tmp_path, monkeypatch):
    """A SIGTERM that arrives after an epoch's last step (during validation, say) is not seen by the
    mid-epoch check: the loop must still stop once that epoch is saved, with the resume advice and
    exit code 143, rather than train on into Slurm's SIGKILL."""
    real_validate = AutoencoderPhase.validate

    def signalled(self, epoch):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(self, epoch)

    monkeypatch.setattr(AutoencoderPhase, "validate", signalled)
    with pytest.raises(TrainingInterrupted, match="at epoch 1 .*--resume") as stopped:
        train(demo_data, tmp_path / "run", tiny_config("ae.max_epochs=3"))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert weights(tmp_path / "run" / "ae" / "last.pt")["epoch"] == 1
    assert [r["epoch"] for r in history(tmp_path / "run")] == ["1"]


def test_gan_resume_after_preemption_matches_an_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    import shutil

    from regina_cli.engine.gan_phase import CycleGANPhase

    train(demo_data, tmp_path / "run", tiny_config("ae.max_epochs=1"))
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    gan = dict(data_dir=demo_data, device="cpu", progress="silent")
    request = ConfigRequest(overrides=["gan.max_epochs=2"])
    train_gan(tmp_path / "run", config=resolve_run_config("gan", tmp_path / "run", request)[0], **gan)

    real_step = CycleGANPhase.train_step

    def preempted(self, epoch, step):
        if (epoch, step) == (2, 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, epoch, step)

    monkeypatch.setattr(CycleGANPhase, "train_step", preempted)
    with pytest.raises(TrainingInterrupted):
        train_gan(tmp_path / "other", config=resolve_run_config("gan", tmp_path / "other", request)[0], **gan)
    monkeypatch.setattr(CycleGANPhase, "train_step", real_step)
    resumed = resolve_run_config("gan", tmp_path / "other", request, resume=True)[0]
    train_gan(tmp_path / "other", config=resumed, **gan, resume=True)
    a = weights(tmp_path / "run" / "gan" / "last.pt")["modules"]
    b = weights(tmp_path / "other" / "gan" / "last.pt")["modules"]
    assert history(tmp_path / "run", keys.GAN_DIR)[-1]["train_total"] == history(tmp_path / "other", keys.GAN_DIR)[-1]["train_total"]
    for part in ("gan", "decoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    # the resumed run compares its epochs with the same untrained start (rebuilt, not saved)
    selectable = [[r["val_pearson_delta_selectable"] for r in history(tmp_path / name, keys.GAN_DIR)]
                  for name in ("run", "other")]
    assert selectable[0] == selectable[1] and len(selectable[0]) == 3


def test_gan_max_epochs_0_keeps_the_untrained_start_a_trained_run_would_keep(demo_data, tmp_path):
    """gan.max_epochs=0 validates and saves the expression prior (epoch 0) without a step: the same
    weights and epoch-0 scores as a run whose trained epochs were not kept, and it resumes into
    training; without a prior there is no untrained model to keep."""
    import shutil

    train(demo_data, tmp_path / "trained", tiny_config("ae.max_epochs=1"))
    shutil.copytree(tmp_path / "trained", tmp_path / "untrained")
    gan = dict(data_dir=demo_data, device="cpu", progress="silent")

    def config(run, *overrides, resume=False):
        return resolve_run_config("gan", tmp_path / run, ConfigRequest(overrides=list(overrides)), resume=resume)[0]

    kept = train_gan(tmp_path / "trained", config=config("trained", "gan.max_epochs=1", "gan.selection_se=1000"), **gan)
    summary = train_gan(tmp_path / "untrained", config=config("untrained", "gan.max_epochs=0"), **gan)
    assert kept["best_epoch"] == summary["best_epoch"] == 0 and summary["epochs"] == 0
    assert summary["stop_reason"].startswith("max_epochs: 0") and summary["last"]["epoch"] == 0
    assert "clip_predictions" in summary and not any("no training epoch" in w for w in summary["warnings"])
    a, b = (weights(tmp_path / run / "gan" / "model.pt") for run in ("trained", "untrained"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = {run: history(tmp_path / run, keys.GAN_DIR) for run in ("trained", "untrained")}
    assert [r["epoch"] for r in rows["untrained"]] == ["0"]
    assert rows["untrained"][0] == {k: v for k, v in rows["trained"][0].items() if v != ""}

    resumed = train_gan(tmp_path / "untrained", config=config("untrained", "gan.max_epochs=1", resume=True),
                        resume=True, **gan)
    assert resumed["epochs"] == 1 and [r["epoch"] for r in history(tmp_path / "untrained", keys.GAN_DIR)] == ["0", "1"]
    with pytest.raises(ReginaError, match="expression prior"):
        tiny_config("gan.max_epochs=0", "gan.expression_prior=none")


def _one_line_error(args):
    return assert_user_error(invoke(*args), only_line=False)


def test_bad_inputs_give_one_line_errors(demo_data, tmp_path):
    base = ["train-ae", "screen", "--data-dir", str(demo_data), "--device", "cpu", "--max-epochs", "1",
            *[a for s in TINY for a in ("--set", s)]]
    assert "regina split" in _one_line_error([*base, "--split", "simulation_9", "--labels", "stress"])
    assert "regina split screen --mode simulation --seed 9 --train-gene-frac 0.5`" in _one_line_error(
        [*base, "--split", "simulation_9_0.5", "--labels", "stress"])
    assert "regina label" in _one_line_error([*base, "--split", "simulation_1", "--labels", "cell-cycle"])
    assert "regina train-ae" in _one_line_error(["train-gan", "--run", str(tmp_path / "nothing")])

    run_dir = tmp_path / "run"
    train(demo_data, run_dir, tiny_config("ae.max_epochs=1"))
    assert "--resume" in _one_line_error([*base, "--split", "simulation_1", "--labels", "stress",
                                          "--run", str(run_dir)])
    meta_path = run_dir / "ae" / "meta.json"
    meta = json.loads(meta_path.read_text())
    json.dump({**meta, "dataset": "other"}, meta_path.open("w"))
    assert "another --run" in _one_line_error([*base, "--split", "simulation_1", "--labels", "stress",
                                               "--run", str(run_dir), "--resume"])
    json.dump({**meta, "gene_names": meta["gene_names"][::-1]}, meta_path.open("w"))
    assert "gene set mismatch" in _one_line_error(["train-gan", "--run", str(run_dir), "--data-dir",
                                                   str(demo_data), "--device", "cpu"])
    assert "fixed by the phase-1 run" in _one_line_error(["train-gan", "--run", str(run_dir), "--set",
                                                          "model.z_dim=8"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in _one_line_error([*base, "--split", "simulation_1", "--labels", "stress",
                                                 "--run", str(tmp_path / "gpu"), "--device", "cuda"])


def test_streaming_from_the_h5ad_trains_both_phases(demo_data, tmp_path):
    """`runtime.device_data=never`: rows stream from the file in chunks instead of a dense matrix."""
    config = tiny_config("ae.max_epochs=1", "gan.max_epochs=1", "runtime.device_data=never",
                         "runtime.stream_chunk_cells=64")
    train(demo_data, tmp_path / "run", config)
    meta = json.loads((tmp_path / "run" / "ae" / "meta.json").read_text())
    assert meta["dense_on_device"] is False
    summary = train_gan(tmp_path / "run", data_dir=demo_data, device="cpu", progress="silent")
    assert summary["epochs"] == 1 and summary["best_value"] == summary["best_value"]  # not NaN


def test_a_resume_with_nothing_left_to_train_writes_nothing(demo_data, tmp_path, monkeypatch):
    """`--resume` of a finished phase wrote meta.json back to "training" before finding nothing
    to do (a kill then left a trained run unfinished for good), and phase 2 emptied its record's
    last epoch. Both phases now return their record untouched; other settings are refused."""
    from regina_cli.engine import loop, train_ae as train_ae_module, train_gan as train_gan_module

    run = tmp_path / "run"
    train(demo_data, run, tiny_config("ae.max_epochs=1"))

    def config(phase, *overrides):
        return resolve_run_config(phase, run, ConfigRequest(overrides=list(overrides)), resume=True)[0]

    train_gan(run, config=resolve_run_config("gan", run, ConfigRequest(overrides=["gan.max_epochs=1"]))[0],
              data_dir=demo_data, device="cpu", progress="silent")
    before = {phase: (run / phase / keys.META_FILE).read_bytes() for phase in (keys.AE_DIR, keys.GAN_DIR)}
    monkeypatch.setattr(train_ae_module, "fit", lambda *a, **k: pytest.fail("phase 1 trained"))
    monkeypatch.setattr(train_gan_module, "fit", lambda *a, **k: pytest.fail("phase 2 trained"))
    monkeypatch.setattr(train_gan_module, "run_distributed", lambda *a, **k: pytest.fail("phase 2 started"))
    again = train(demo_data, run, config(keys.AE_DIR, "ae.max_epochs=1"), resume=True)
    gan_again = train_gan(run, config=config(keys.GAN_DIR, "gan.max_epochs=1"), data_dir=demo_data, device="cpu",
                          progress="silent", resume=True)
    assert again["nothing_to_resume"] and gan_again["nothing_to_resume"]
    assert gan_again["last"]["epoch"] == 1 and "clip_predictions" in gan_again  # the record, as trained
    assert {phase: (run / phase / keys.META_FILE).read_bytes() for phase in before} == before
    with pytest.raises(ReginaError, match="already finished .*cannot take other settings"):
        train(demo_data, run, config(keys.AE_DIR, "ae.max_epochs=1", "ae.lr=0.01"), resume=True)
    assert loop.finished_summary(ckpt.ae_paths(run), config(keys.AE_DIR, "ae.max_epochs=2"), 2, resume=True) is None
    monkeypatch.undo()
    untrained = tmp_path / "untrained"  # gan.max_epochs=0: the checkpoint holds no stop reason, the record does
    train(demo_data, untrained, tiny_config("ae.max_epochs=1"))
    zero = ConfigRequest(overrides=["gan.max_epochs=0"])
    train_gan(untrained, config=resolve_run_config("gan", untrained, zero)[0], data_dir=demo_data, device="cpu",
              progress="silent")
    assert train_gan(untrained, config=resolve_run_config("gan", untrained, zero, resume=True)[0], data_dir=demo_data,
                     device="cpu", progress="silent", resume=True)["nothing_to_resume"]


def test_predict_on_a_run_being_trained_says_so(demo_data, tmp_path):
    """predict on a run another process trains said "did not finish training ... --resume",
    advice the run lock would refuse; it now says the run is in use."""
    from regina_cli.engine.predict import predict
    from regina_cli.io import run_lock

    run = tmp_path / "run"
    train(demo_data, run, tiny_config("ae.max_epochs=1"))
    meta = json.loads((run / keys.AE_DIR / keys.META_FILE).read_text())
    (run / keys.AE_DIR / keys.META_FILE).write_text(json.dumps({**meta, "status": "training"}))
    with pytest.raises(ReginaError, match="did not finish training"):
        predict(run, "test", device="cpu", data_dir=demo_data)
    with run_lock(run), pytest.raises(ReginaError, match="is in use by another regina process"):
        predict(run, "test", device="cpu", data_dir=demo_data)


def test_phase_shapes_are_fixed_by_the_weights_saved(demo_data, tmp_path):
    """Phase 2 and every resume reload saved weights: a changed token count (model.seq_len) or a
    changed phase-2 width on a phase-2 resume is refused in one line naming the key, not left to
    fail as a shape mismatch deep inside torch after the run directory was touched."""
    run = tmp_path / "run"
    train(demo_data, run, tiny_config("ae.max_epochs=1"))
    with pytest.raises(ReginaError, match="model.seq_len is fixed by the phase-1 run"):
        resolve_run_config("gan", run, ConfigRequest(overrides=["model.seq_len=8"]))
    train_gan(run, config=resolve_run_config("gan", run, ConfigRequest(overrides=["gan.max_epochs=1"]))[0],
              data_dir=demo_data, device="cpu", progress="silent")
    with pytest.raises(ReginaError, match="model.transition_hidden is fixed by the phase-2 run"):
        resolve_run_config("gan", run, ConfigRequest(overrides=["model.transition_hidden=64"]), resume=True)
    # what phase 2 fits when it starts is in its checkpoint too: a resume with another value crashed
    # on the saved tensors (gan.prior_cell_types) or kept the old value without a word (gan.knockdown_scale)
    for change in ("gan.prior_cell_types=false", "gan.knockdown_scale=4", "gan.covariation_components=8"):
        with pytest.raises(ReginaError, match=f"{change.split('=')[0]} was set when phase 2 of .* started"):
            resolve_run_config("gan", run, ConfigRequest(overrides=[change, "gan.max_epochs=2"]), resume=True)
    resolve_run_config("gan", run, ConfigRequest(overrides=["gan.lr=0.001", "gan.max_epochs=2"]), resume=True)


def test_a_fresh_start_drops_the_history_of_a_start_killed_before_its_first_checkpoint(demo_data, tmp_path):
    """A start killed between writing an epoch's history row and its checkpoint leaves history.csv
    but no last.pt, so the next start is fresh: its history must not carry the dead start's rows
    (the run would report epoch 1 twice)."""
    paths = ckpt.ae_paths(tmp_path / "run")
    ckpt.append_history(paths, {"epoch": 1, "train_mse": 9.0})
    train(demo_data, tmp_path / "run", tiny_config("ae.max_epochs=2"))
    assert [r["epoch"] for r in history(tmp_path / "run")] == ["1", "2"]
    assert history(tmp_path / "run")[0]["train_mse"] != "9"


def test_selection_by_val_mse_keeps_the_epoch_of_lowest_validation_mse(demo_data, tmp_path, monkeypatch):
    """`ae.selection=val_mse` keeps the weights of the epoch with the *lowest* validation MSE."""
    real_validate = AutoencoderPhase.validate
    mse = {1: 3.0, 2: 1.0, 3: 2.0}
    monkeypatch.setattr(AutoencoderPhase, "validate",
                        lambda self, epoch: {**real_validate(self, epoch), "mse": mse[epoch]})
    summary = train(demo_data, tmp_path / "run", tiny_config("ae.max_epochs=3", "ae.selection=val_mse"))
    assert (summary["best_epoch"], summary["best_metric"], summary["best_value"]) == (2, "mse", 1.0)
