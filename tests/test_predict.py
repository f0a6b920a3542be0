"""`regina predict` on a tiny run saved in the run-directory format of engine/checkpoint.py.

The run is untrained: its transitions are then exactly identity plus prompt, which lets the
test recompute a prediction by hand. Training itself is covered by TRAIN's tests.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import scipy.sparse as sp
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from regina_cli import keys
from regina_cli.cli import app
from regina_cli.config import build_config
from regina_cli.data.dataset import write_dataset
from regina_cli.data.split import save_split
from regina_cli.engine import checkpoint as ckpt
from regina_cli.engine.clip_choice import clip_chosen
from regina_cli.engine.predict import predict, sample_plan
from regina_cli.engine.prediction_file import FileOptions
from regina_cli.engine.run_meta import RunMeta, write_meta
from regina_cli.model.prompt import build_prompt
from regina_cli.errors import ReginaError
from regina_cli.model.autoencoder import Autoencoder
from regina_cli.model.gan import LatentCycleGAN
from test_tensors import GENES, tiny_labels, tiny_screen, tiny_split

CELLS = 10


# gan.correction_choice off: these runs test phase-2 training, which the choice skips where it keeps
# the prior alone (test_a_run_that_keeps_the_prior_alone_trains_nothing tests that path).
TINY_MODEL = ["model.seq_len=4", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=8",
              "model.classifier_hidden=8", "model.transition_hidden=16", "model.discriminator_hidden=[16,8]",
              "gan.correction_choice=false"]


def write_tiny_dataset():
    """Dataset `tiny` (GEARS layout), its split and `stress` labels in the data dir."""
    adata = tiny_screen()
    adata.obs[keys.OBS_CONDITION_NAME] = "A_" + adata.obs[keys.OBS_CONDITION].astype(str) + "_1+1"
    adata.obs[keys.OBS_DOSE] = "1+1"
    for field in (keys.UNS_RANK_GENES, keys.UNS_TOP_DE_20, keys.UNS_NON_DROPOUT_IDX,
                  keys.UNS_TOP_NON_ZERO_DE_20, keys.UNS_NON_ZEROS_IDX):
        adata.uns[field] = {"A_G1+ctrl_1+1": np.array(GENES[:3])}
    write_dataset(adata, "tiny")
    split = tiny_split()
    save_split(split)
    labels = tiny_labels(adata)
    path = keys.labels_file("tiny", "stress")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"cell": labels.index, keys.OBS_CELL_STATE: labels.to_numpy()}).to_csv(path, index=False)
    return adata, split


@pytest.fixture
def tiny_run(tmp_path):
    """Dataset `tiny` in the data dir and an untrained two-phase run `runs/tiny`."""
    adata, split = write_tiny_dataset()
    # the method as written (plain decoding, Z_ctrl - Z_fake), so one cell can be recomputed by hand below
    config = build_config(preset="original", overrides=[*TINY_MODEL, "gan.prompt_value=-2.0", "gan.prompt_sign=method"])
    torch.manual_seed(0)
    ae_model = Autoencoder(len(GENES), 2, config.model)
    gan = LatentCycleGAN(config.model.z_dim, config.model, prompt_genes=["NOTMEASURED"], learned_genes=["NOTMEASURED"])
    run = tmp_path / "runs" / "tiny"
    meta = RunMeta(phase="ae", dataset="tiny", split=split.name, labels="stress", gene_names=GENES,
                   label_classes=["Homeostasis", "Stressed"], cell_types=["k562"], conditions=[],
                   train_conditions=list(split.train), val_conditions=list(split.val),
                   test_conditions=list(split.test), perturbed_genes=[], selection="variance_preservation",
                   status="trained")
    ae_paths, gan_paths = ckpt.ae_paths(run), ckpt.gan_paths(run)
    for paths in (ae_paths, gan_paths):
        ckpt.write_config(paths, config)
    write_meta(ae_paths, meta)
    write_meta(gan_paths, meta.for_phase("gan", status="trained", prompt_genes=gan.prompt_genes,
                                         learned_genes=gan.gene_prompts.learned_genes))
    ckpt.save_torch(ae_paths.model, ckpt.state_dict_to_cpu(ae_model))
    phase2 = torch.nn.ModuleDict({"gan": gan, "decoder": ae_model.decoder})  # engine/trained.py's layout
    ckpt.save_torch(gan_paths.model, ckpt.state_dict_to_cpu(phase2))
    return run, adata, ae_model, gan


def test_predict_seen_unseen_unmeasured_and_combinations(tiny_run):
    run, adata, ae_model, gan = tiny_run
    conditions = ["G4+ctrl", "G3+G1", "NOTMEASURED+ctrl", "NOTMEASURED+G4", "G1+G2+G3", "G7"]
    path = predict(run, ",".join(conditions), n_cells=CELLS, seed=3, device="cpu")
    assert path == run / keys.PREDICTIONS_FILE
    written = ad.read_h5ad(path)
    pred = written[written.obs[keys.OBS_PROMPT_SOURCE] != "control"]
    assert list(pred.var_names) == GENES and pred.X.shape == (CELLS * len(conditions), len(GENES))
    # GEARS spelling for a label the data lacks, its targets sorted
    expected_labels = ["G4+ctrl", "G3+G1", "NOTMEASURED+ctrl", "G4+NOTMEASURED", "G1+G2+G3", "G7+ctrl"]
    assert pred.obs[keys.OBS_CONDITION].value_counts().to_dict() == {c: CELLS for c in expected_labels}
    # named by condition (pred_<row> collided between the parts of a job array)
    assert sorted(pred.obs_names) == sorted(f"{c}_{n}" for c in expected_labels for n in range(CELLS))
    sources = pred.obs.groupby(keys.OBS_CONDITION, observed=True)[keys.OBS_PROMPT_SOURCE].first().astype(str)
    assert sources.to_dict() == {"G4+ctrl": "measured", "G3+G1": "measured", "NOTMEASURED+ctrl": "learned",
                                 "G4+NOTMEASURED": "measured", "G1+G2+G3": "measured", "G7+ctrl": "measured"}
    # The real controls the predictions started from are appended under the control label, once each.
    appended = written[written.obs[keys.OBS_PROMPT_SOURCE] == "control"]
    assert set(appended.obs[keys.OBS_CONDITION]) == {"ctrl"}
    assert set(appended.obs_names) == set(pred.obs[keys.OBS_CONTROL_CELL])
    np.testing.assert_array_equal(appended.X, adata[appended.obs_names].X.toarray())
    reconstruction = written.varm[keys.VARM_RECONSTRUCTION]
    assert list(reconstruction.columns) == expected_labels and reconstruction.shape == (len(GENES), len(conditions))
    controls = adata.obs.loc[pred.obs[keys.OBS_CONTROL_CELL]]
    assert (controls[keys.OBS_CONDITION] == "ctrl").all()
    assert (controls[keys.OBS_CELL_TYPE].to_numpy() == pred.obs[keys.OBS_CELL_TYPE].to_numpy()).all()
    assert set(pred.obs[keys.OBS_CELL_TYPE]) == {"A", "B"}  # measured in both: 5 + 5 cells
    assert np.isfinite(pred.X).all()

    # Untrained transitions are identity + prompt: recompute one combination cell by hand.
    row = int(np.flatnonzero(pred.obs[keys.OBS_CONDITION] == "G4+NOTMEASURED")[0])
    x_ctrl = torch.as_tensor(adata[pred.obs[keys.OBS_CONTROL_CELL].iloc[row]].X.toarray())
    ae_model.eval()
    with torch.no_grad():
        z = ae_model.encoder(x_ctrl)
        prompt = build_prompt(ae_model.encoder, x_ctrl, torch.tensor([[-1, 4]]), -2.0, n_targets=torch.tensor([2]))
        fake = x_ctrl.clone()
        fake[0, 4] = -4.0  # prompt value x two targets, the unmeasured one counted too
        assert torch.allclose(prompt, z - ae_model.encoder(fake), atol=1e-6)
        expected = ae_model.decoder(z + prompt + gan.gene_prompts.learned[0])
    np.testing.assert_allclose(pred.X[row], expected[0].numpy(), rtol=1e-4, atol=1e-5)

    again = ad.read_h5ad(predict(run, ",".join(conditions), n_cells=CELLS, seed=3, device="cpu",
                                 out=run / "again.h5ad"))
    np.testing.assert_array_equal(again.X, written.X)
    # A new combination asked alone in either order (two jobs of an array): one label, the same cells.
    # "NOTMEASURED+G4" and "G4+NOTMEASURED" were two conditions with two draws of control cells.
    alone = [ad.read_h5ad(predict(run, spelling, n_cells=CELLS, seed=3, device="cpu", out=run / f"{i}.h5ad"))
             for i, spelling in enumerate(["NOTMEASURED + G4", "G4+NOTMEASURED"])]
    assert [set(a.obs[keys.OBS_CONDITION]) for a in alone] == [{"G4+NOTMEASURED", "ctrl"}] * 2
    np.testing.assert_array_equal(alone[0].X, alone[1].X)
    assert list(again.obs[keys.OBS_CONTROL_CELL]) == list(written.obs[keys.OBS_CONTROL_CELL])
    # The same conditions in another order and spelling are the dataset's conditions.
    reordered = ad.read_h5ad(predict(run, "G1+G3", n_cells=2, device="cpu", out=run / "r.h5ad",
                                     options=FileOptions(with_controls=False)))
    assert set(reordered.obs[keys.OBS_CONDITION]) == {"G3+G1"}


def test_clip_and_sparsify_give_data_like_values(tiny_run):
    run = tiny_run[0]
    plain = ad.read_h5ad(predict(run, "G4+ctrl", n_cells=20, device="cpu", out=run / "a.h5ad",
                                 options=FileOptions(with_controls=False)))
    sparse = ad.read_h5ad(predict(run, "G4+ctrl", n_cells=20, device="cpu", out=run / "b.h5ad",
                                  options=FileOptions(with_controls=False, sparsify=True)))
    assert (plain.X < 0).any()  # an untrained decoder: negative values to clip
    assert sp.issparse(sparse.X) and sparse.X.min() >= 0
    assert sparse.uns[keys.UNS_REGINA]["clip"]  # sparsify implies clipping, and the file says so
    threshold = sparse.uns[keys.UNS_REGINA]["sparsify_threshold"]
    dense = sparse.X.toarray()
    assert threshold > 0 and not ((dense > 0) & (dense < threshold)).any()
    kept = plain.X >= threshold
    np.testing.assert_allclose(dense[kept], plain.X[kept], rtol=1e-6)


def test_the_reconstruction_baseline_is_the_mean_of_each_conditions_decoded_controls(tiny_run):
    """varm `reconstruction` is what `regina evaluate` scores as the honest `reconstruction`
    baseline: per condition, the *mean* of the model's decoded controls with no perturbation
    applied. A sum (or a mean over the wrong cells) would make that baseline look absurdly bad
    and the model look better than its own decoder."""
    run, adata, ae_model, _ = tiny_run
    written = ad.read_h5ad(predict(run, "G4+ctrl,G3+G1", n_cells=CELLS, seed=1, device="cpu"))
    pred = written[written.obs[keys.OBS_PROMPT_SOURCE] != "control"]
    reconstruction = written.varm[keys.VARM_RECONSTRUCTION]
    ae_model.eval()
    for condition in ("G4+ctrl", "G3+G1"):
        started_from = pred.obs.loc[pred.obs[keys.OBS_CONDITION] == condition, keys.OBS_CONTROL_CELL]
        x_ctrl = torch.as_tensor(adata[started_from.to_numpy()].X.toarray())
        with torch.no_grad():
            expected = ae_model.decoder(ae_model.encoder(x_ctrl)).mean(0).numpy()
        np.testing.assert_allclose(reconstruction[condition].to_numpy(), expected, rtol=1e-4, atol=1e-5)


def test_cells_are_shared_between_cell_types_by_largest_remainder():
    """A condition measured as 1 cell of type x for every 2 of type y gets 10 predicted cells as
    3 x and 7 y (shares 3.33 and 6.67): the spare cell goes to the largest remainder, so the
    predicted population's mix is the closest to the real one."""
    obs = pd.DataFrame({
        keys.OBS_CONDITION: ["ctrl"] * 6 + ["A+ctrl"] * 3,
        keys.OBS_CELL_TYPE: ["x", "x", "x", "y", "y", "y"] + ["x", "y", "y"],
    }, index=[f"c{i}" for i in range(9)])
    plan = sample_plan(obs, ["A+ctrl"], ["ctrl", "A+ctrl"], 10, seed=0)
    assert plan.cells.groupby("cell_type").size().to_dict() == {"x": 3, "y": 7}
    # a condition never measured is drawn in the training controls' proportions (here 1 x : 2 y),
    # not split equally between the cell types
    obs[keys.OBS_CELL_TYPE] = ["x", "x", "y", "y", "y", "y"] + ["x", "y", "y"]
    plan = sample_plan(obs, ["B+ctrl"], ["ctrl", "A+ctrl"], 9, seed=0)
    assert plan.cells.groupby("cell_type").size().to_dict() == {"x": 3, "y": 6}


def test_a_dataset_whose_genes_changed_is_refused_even_when_allowed_stale(tiny_run):
    """The networks read genes by position: a re-fetched dataset with the same genes in another
    order (or other genes) would feed every gene into another gene's slot and predict nonsense
    without a word. `--allow-stale` lets a changed dataset through, so this check must stand alone."""
    run, adata, *_ = tiny_run
    write_dataset(adata[:, ::-1].copy(), "tiny")
    with pytest.raises(ReginaError, match="no longer has the genes .* re-fetch the same dataset"):
        predict(run, "G4+ctrl", n_cells=2, device="cpu", allow_stale=True)


def test_matched_controls_start_every_prediction_from_the_training_control_mean(tiny_run):
    """With `gan.match_control_mean` (the default) the controls drawn for a condition are shifted
    onto the mean of the training controls of their cell type, as train-gan validated: predictions
    from the raw draws would differ from what validation scored. Residual decoding of an unperturbed
    control gives back the (shifted) control, so the `reconstruction` of each condition is the
    training-control mean, weighted by its cells' cell types."""
    run, adata, *_ = tiny_run
    ckpt.write_config(ckpt.gan_paths(run), build_config(preset="original", overrides=[
        *TINY_MODEL, "gan.residual_decoding=true", "gan.match_control_mean=true"]))
    written = ad.read_h5ad(predict(run, "G4+ctrl,G3+G1", n_cells=CELLS, seed=2, device="cpu",
                                   options=FileOptions(with_controls=False)))
    x = adata.X.toarray()
    is_ctrl = (adata.obs[keys.OBS_CONDITION] == "ctrl").to_numpy()
    type_mean = {t: x[is_ctrl & (adata.obs[keys.OBS_CELL_TYPE] == t).to_numpy()].mean(0) for t in ("A", "B")}
    for condition in ("G4+ctrl", "G3+G1"):
        types = written.obs.loc[written.obs[keys.OBS_CONDITION] == condition, keys.OBS_CELL_TYPE].astype(str)
        expected = np.mean([type_mean[t] for t in types], axis=0)
        np.testing.assert_allclose(written.varm[keys.VARM_RECONSTRUCTION][condition].to_numpy(), expected,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("label", ["NTC", "control", "Non-Targeting"])
def test_every_control_spelling_is_refused_as_a_condition_to_predict(label):
    """`--conditions NTC` (a control label as fetch reads them) is the control, not a gene named
    NTC: the error must say so instead of "gene 'NTC' is not among the measured genes"."""
    from types import SimpleNamespace

    from regina_cli.engine.predict import resolve_conditions

    with pytest.raises(ReginaError, match="is the control condition"):
        resolve_conditions(label, SimpleNamespace(train=[], val=[], test=[]), ["ctrl", "A+ctrl"])


def _file_of(obs: pd.DataFrame, x: np.ndarray, options: FileOptions, n_cells: int = 4):
    """prediction_file.build for condition A+ctrl predicted from `obs`'s training controls."""
    from regina_cli.engine import prediction_file

    plan = sample_plan(obs, ["A+ctrl"], ["ctrl", "A+ctrl"], n_cells, seed=0)
    rows = np.unique(plan.cells["control_row"].to_numpy())
    predicted = np.full((len(plan), x.shape[1]), 0.05, dtype=np.float32)
    return prediction_file.build(predicted, plan, ["A+ctrl"], ["g1", "g2", "g3"], sources={"A+ctrl": "measured"},
                                 reconstruction=np.zeros((1, 3)), controls=(x[rows], obs.iloc[rows]),
                                 options=options, provenance={})


def test_a_screen_without_cell_types_gives_predictions_and_controls_one_cell_type():
    """A screen without a cell_type column is one cell type, `all`, for the predicted cells and the
    appended controls alike: a per-cell-type comparison (rank_genes_groups within a cell type,
    cell-eval) must find the controls in the predictions' cell type."""
    obs = pd.DataFrame({keys.OBS_CONDITION: ["ctrl"] * 6 + ["A+ctrl"] * 2}, index=[f"c{i}" for i in range(8)])
    x = np.arange(24, dtype=np.float32).reshape(8, 3) / 10
    made = _file_of(obs, x, FileOptions())
    assert set(made.obs[keys.OBS_CELL_TYPE].astype(str)) == {"all"}


def test_the_file_records_its_predicted_cell_count_and_sparsify_threshold():
    """uns['regina'] says how many cells were *predicted* (evaluate adds these up over the parts
    of a job array; the appended controls are not predictions) and the threshold `sparsify` used:
    half the smallest non-zero value of the real controls, so a decoded value that small is noise
    while every value a real cell can hold is kept."""
    obs = pd.DataFrame({keys.OBS_CONDITION: ["ctrl"] * 6 + ["A+ctrl"] * 2}, index=[f"c{i}" for i in range(8)])
    x = np.full((8, 3), 0.4, dtype=np.float32)
    x[:, 0] = 0.0
    x[2, 1] = 0.08  # the smallest non-zero control value
    made = _file_of(obs, x, FileOptions(sparsify=True, clip=True), n_cells=6)
    record = made.uns[keys.UNS_REGINA]
    assert record["n_predicted_cells"] == 6 and made.n_obs == 12  # 6 predicted + the 6 controls they started from
    assert record["sparsify_threshold"] == pytest.approx(0.04)
    assert (made[:6].X.toarray() == 0.05).all()  # above the threshold: kept


def test_predict_clips_by_default_where_validation_chose_it(tiny_run):
    """Without --clip/--no-clip, `predict` follows the run's `clip_predictions` (what scored higher
    on validation at train-gan); either flag overrides it; the file records what was done."""
    run = tiny_run[0]
    paths = ckpt.gan_paths(run)
    meta = json.loads(paths.meta.read_text())
    paths.meta.write_text(json.dumps({**meta, "training": {"clip_predictions": True}}))
    chosen = ad.read_h5ad(predict(run, "G4+ctrl", n_cells=20, device="cpu", out=run / "c.h5ad",
                                  options=FileOptions(with_controls=False)))
    kept = ad.read_h5ad(predict(run, "G4+ctrl", n_cells=20, device="cpu", out=run / "k.h5ad",
                                options=FileOptions(with_controls=False, clip=False)))
    assert chosen.X.min() >= 0 and (kept.X < 0).any()
    np.testing.assert_array_equal(chosen.X, np.maximum(kept.X, 0))
    assert chosen.uns[keys.UNS_REGINA]["clip"] and not kept.uns[keys.UNS_REGINA]["clip"]


def test_predict_test_set_through_cli(tiny_run):
    run = tiny_run[0]
    (run / "conds.txt").write_text("# my list\nG4+ctrl\n\nG3+G1\n")
    result = CliRunner().invoke(app, ["--json", "predict", "--run", str(run), "--cells", "4",
                                      "--device", "cpu", "--out", str(run / "p.h5ad")])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout)
    assert reported["skipped"] == ["UNKNOWNGENE+ctrl"]  # no prompt exists for it
    assert any("skipped 1 condition(s)" in w and "UNKNOWNGENE+ctrl" in w for w in reported["warnings"])
    assert reported["clipped"] is False  # the run recorded no choice: values as decoded
    assert reported["replaced"] is False
    pred = ad.read_h5ad(run / "p.h5ad")
    assert set(pred.obs[keys.OBS_CONDITION]) == {"G4+ctrl", "ctrl"}
    assert (pred.obs[keys.OBS_CONDITION] == "G4+ctrl").sum() == 4
    assert list(pred.uns[keys.UNS_REGINA]["skipped_conditions"]) == ["UNKNOWNGENE+ctrl"]
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--conditions-file", str(run / "conds.txt"),
                                      "--cells", "3", "--device", "cpu", "--no-controls", "--clip"])
    assert result.exit_code == 0, result.output
    assert "negative values set to 0 (as asked" in result.output
    clipped = ad.read_h5ad(run / keys.PREDICTIONS_FILE)
    assert clipped.n_obs == 6 and clipped.X.min() >= 0 and clipped.uns[keys.UNS_REGINA]["clip"]
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--conditions", "G4+ctrl", "--cells", "3",
                                      "--device", "cpu", "--no-controls", "--no-clip"])
    assert result.exit_code == 0, result.output
    assert not ad.read_h5ad(run / keys.PREDICTIONS_FILE).uns[keys.UNS_REGINA]["clip"]
    assert "replacing the predictions there" in " ".join(result.output.split())  # the --clip file before it


def test_unknown_gene_is_a_clear_error(tiny_run):
    run = tiny_run[0]
    with pytest.raises(ReginaError, match=r"gene 'g10' \(condition 'g10\+ctrl'\).*close names: G10, "):
        predict(run, "g10", device="cpu")
    with pytest.raises(ReginaError, match="not perturbed in training"):
        predict(run, "UNMEASURED2+G1", device="cpu")
    with pytest.raises(ReginaError, match=r"write a combination as G4\+G1"):
        predict(run, "G4_G1", device="cpu")  # another tool's separator: it offered "close names: G1"
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--conditions", "ctrl", "--device", "cpu"])
    assert result.exit_code != 0 and "control condition" in result.output
    assert not (run / keys.PREDICTIONS_FILE).exists()


def test_predict_from_a_run_trained_by_the_engine(tmp_path):
    """The run directory TRAIN's engine writes loads and predicts (one epoch per phase)."""
    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.engine.train_gan import train_gan

    write_tiny_dataset()
    config = build_config(overrides=[*TINY_MODEL, "ae.max_epochs=1", "ae.min_epochs=1", "ae.batch_size=32",
                                     "gan.max_epochs=1", "gan.batch_size=32"])
    run = tmp_path / "runs" / "trained"
    train_autoencoder("tiny", split=tiny_split().name, labels="stress", run_dir=run, config=config, device="cpu",
                      progress="silent")
    train_gan(run, device="cpu", progress="silent")
    pred = ad.read_h5ad(predict(run, "all", n_cells=6, device="cpu", options=FileOptions(with_controls=False)))
    trained_on = {"G1+ctrl", "G2+ctrl", "G1+G2", "NOTMEASURED+ctrl", "G3+ctrl", "G3+G1", "G4+ctrl"}
    assert set(pred.obs[keys.OBS_CONDITION]) == trained_on and pred.n_obs == 6 * len(trained_on)
    assert np.isfinite(pred.X).all() and pred.X.std(0).max() > 0
    # train-gan scored its validation predictions clipped at 0 too and recorded which scored higher
    training = json.loads(ckpt.gan_paths(run).meta.read_text())["training"]
    scores = training["diagnostics"]
    assert -1 <= scores["pearson_delta_clipped"] <= 1
    evidence = training["clip_evidence"]
    assert evidence["validation"]["pearson_delta_clipped"] == pytest.approx(scores["pearson_delta_clipped"])
    assert evidence["validation"]["conditions"] == 2  # G3+ctrl, G3+G1
    # and, before training, the four perturbed training conditions, each from the prior fitted without it
    assert evidence["training_held_out"]["conditions"] == 4
    assert -1 <= evidence["training_held_out"]["pearson_delta_clipped"] <= 1
    assert training["clip_predictions"] == clip_chosen(evidence)
    history = ckpt.read_history(ckpt.gan_paths(run))
    assert "val_pearson_delta_clipped" in history[0]
    # each epoch also scores the conditions phase 2 trains on, epoch 0 with that same evidence
    start = evidence["training_held_out"]["pearson_delta"]
    assert float(history[0]["val_fit_pearson_delta"]) == pytest.approx(start, abs=1e-5)  # history keeps 6 digits
    assert all(-1 <= float(row["val_fit_pearson_delta"]) <= 1 for row in history)
    assert -1 <= float(history[1]["val_fit_collapse_index"]) <= 1


def test_a_run_that_keeps_the_prior_alone_trains_nothing(tmp_path):
    """On the tiny screen the untrained model scores higher at correction 0 than at 0.5 on the
    conditions it predicts unseen, so train-gan keeps the prior alone: the transition would move
    no prediction, so nothing is trained, the record says why, a resume has nothing to do, and
    the saved model predicts at 0."""
    from regina_cli.engine.correction_choice import PRIOR_ALONE
    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.engine.train_gan import train_gan

    write_tiny_dataset()
    config = build_config(overrides=[*TINY_MODEL, "ae.max_epochs=1", "ae.min_epochs=1", "ae.batch_size=32",
                                     "gan.max_epochs=2", "gan.batch_size=32", "gan.correction_choice=true"])
    run = tmp_path / "runs" / "alone"
    train_autoencoder("tiny", split=tiny_split().name, labels="stress", run_dir=run, config=config, device="cpu",
                      progress="silent")
    summary = train_gan(run, device="cpu", progress="silent")
    correction = summary["correction_choice"]
    assert correction["configured"] == 0.5 and correction["correction_scale"] == 0.0
    assert set(correction["evidence"]) == {"validation", "training_held_out"}
    assert sum(e["conditions"] * (e["pearson_delta_prior_alone"] - e["pearson_delta"])
               for e in correction["evidence"].values()) > 0
    assert summary["epochs"] == 0 and summary["best_epoch"] == 0 and summary["stop_reason"].endswith(PRIOR_ALONE)
    paths = ckpt.gan_paths(run)
    assert [int(row["epoch"]) for row in ckpt.read_history(paths)] == [0]
    start = ckpt.read_history(paths)[0]
    assert float(start["val_fit_pearson_delta"]) == pytest.approx(
        correction["evidence"]["training_held_out"]["pearson_delta_prior_alone"], abs=1e-5)
    assert float(ckpt.load_torch(paths.model)["gan.correction_scale"]) == 0.0
    again = train_gan(run, device="cpu", progress="silent", resume=True)
    assert again["nothing_to_resume"] and again["stop_reason"] == summary["stop_reason"]


def test_cells_follow_the_conditions_cell_type_mix():
    obs = pd.DataFrame({
        keys.OBS_CONDITION: ["ctrl"] * 6 + ["A+ctrl"] * 4 + ["B+ctrl"] * 3,
        keys.OBS_CELL_TYPE: ["x", "x", "y", "y", "z", "z"] + ["x", "y", "y", "y"] + ["z"] * 3,
    }, index=[f"c{i}" for i in range(13)])
    plan = sample_plan(obs, ["A+ctrl", "B+ctrl", "NEW+ctrl"], ["ctrl", "A+ctrl"], 8, seed=0)
    per_type = plan.cells.groupby(["condition_index", "cell_type"]).size().to_dict()
    assert per_type == {(0, "x"): 2, (0, "y"): 6, (1, "z"): 8, (2, "x"): 3, (2, "y"): 3, (2, "z"): 2}
    assert plan.n_new == 1  # NEW+ctrl has no real cells: spread over every cell type
    controls = obs.iloc[plan.cells["control_row"]]
    assert (controls[keys.OBS_CONDITION] == "ctrl").all()
    assert (controls[keys.OBS_CELL_TYPE].to_numpy() == plan.cells["cell_type"].to_numpy()).all()
    assert list(plan.control_names) == list(controls.index)


def test_each_cell_types_draw_is_moved_onto_that_types_training_control_mean():
    """`gan.match_control_mean` on a screen of several cell types: every (condition, cell type)
    group of predicted cells starts from controls whose mean is that type's training-control mean
    exactly; a mix-up of the type codes would move a type onto another type's mean."""
    from regina_cli.engine.predict import matched_control_shifts

    rng = np.random.default_rng(0)
    types = ["y", "y", "x", "x", "x", "y", "z", "z", "x", "y"] * 3
    x = rng.normal(size=(34, 5)).astype(np.float32)
    x[np.flatnonzero(np.array(types) == "y")] += 4.0  # each type's controls sit apart
    x[np.flatnonzero(np.array(types) == "z")] -= 4.0
    obs = pd.DataFrame({keys.OBS_CONDITION: ["ctrl"] * 30 + ["A+ctrl"] * 4,
                        keys.OBS_CELL_TYPE: types + ["z", "x", "y", "y"]}, index=[f"c{i}" for i in range(34)])
    adata = ad.AnnData(x, obs=obs)
    plan = sample_plan(obs, ["B+ctrl", "A+ctrl"], ["ctrl", "A+ctrl"], 9, seed=0)
    rows, inverse = np.unique(plan.cells["control_row"].to_numpy(), return_inverse=True)
    controls, position = torch.from_numpy(x[rows]), torch.as_tensor(inverse)
    moved = (controls[position] + matched_control_shifts(adata, plan, controls, position, "cpu")).numpy()
    groups = plan.cells.groupby(["condition_index", "cell_type"]).indices
    assert {t for _, t in groups} == {"x", "y", "z"}
    for (_, cell_type), members in groups.items():
        pool = np.flatnonzero((obs[keys.OBS_CONDITION] == "ctrl") & (obs[keys.OBS_CELL_TYPE] == cell_type))
        np.testing.assert_allclose(moved[members].mean(0), x[pool].mean(0), atol=1e-5)


def test_control_cells_are_drawn_without_replacement_while_there_are_enough():
    """Each predicted cell starts from another control cell as long as the cell type has enough:
    drawing with replacement regardless repeats controls, and the repeats shrink the predicted
    population's spread (what the distribution metrics score)."""
    obs = pd.DataFrame({keys.OBS_CONDITION: ["ctrl"] * 40 + ["A+ctrl"] * 5}, index=[f"c{i}" for i in range(45)])
    plan = sample_plan(obs, ["A+ctrl", "B+ctrl", "A+B"], ["ctrl", "A+ctrl"], 40, seed=0)
    for _, rows in plan.cells.groupby("condition_index")["control_row"]:
        assert rows.nunique() == 40
    more = sample_plan(obs, ["A+ctrl"], ["ctrl", "A+ctrl"], 60, seed=0)  # more cells than controls: repeats
    assert more.cells["control_row"].nunique() <= 40 and len(more) == 60


def test_conditions_files_from_any_editor_are_read(tmp_path):
    """A byte-order mark, Windows line ends, blank lines and comments are not conditions."""
    from regina_cli.engine.predict import read_conditions_file

    (tmp_path / "c.txt").write_bytes("\ufeffA+ctrl\r\n\r\n# doubles\r\nA+B  # the pair\r\n".encode("utf-8"))
    assert read_conditions_file(tmp_path / "c.txt") == ["A+ctrl", "A+B"]


def test_a_combination_asked_in_both_orders_is_one_condition():
    """Targets, not their order, make a condition: the dataset's spelling when it measured them,
    else the first spelling asked; an unmeasured pair asked as A+B and B+A was predicted twice."""
    from types import SimpleNamespace

    from regina_cli.engine.predict import resolve_conditions

    split = SimpleNamespace(train=[], val=[], test=[])
    data = ["ctrl", "A+ctrl", "B+A"]
    assert resolve_conditions("A+B,C+D,D+C,A,A+ctrl", split, data) == ["B+A", "C+D", "A+ctrl"]
    with pytest.raises(ReginaError, match=r"'A\+A' names A twice; a gene is perturbed once \(A\+ctrl\)"):
        resolve_conditions("A+A", split, data)  # was the single A+ctrl without a word


def test_a_missing_dataset_is_named_before_its_split(tiny_run, tmp_path):
    """A wrong --data-dir was reported as a missing split, whose suggested fix then failed."""
    with pytest.raises(ReginaError, match="dataset 'tiny' not found.*regina fetch"):
        predict(tiny_run[0], "G1", device="cpu", data_dir=tmp_path / "elsewhere")


def test_a_conditions_control_draw_does_not_depend_on_the_rest_of_the_request():
    """Job arrays split one request into several: each part must predict what the whole does."""
    from regina_cli.engine.predict import sample_plan

    obs = pd.DataFrame({keys.OBS_CONDITION: ["ctrl"] * 50 + ["A+ctrl"] * 5},
                       index=[f"c{i}" for i in range(55)])
    whole = sample_plan(obs, ["A+ctrl", "B+ctrl", "A+B"], ["ctrl", "A+ctrl"], 20, seed=3)
    part = sample_plan(obs, ["A+B"], ["ctrl", "A+ctrl"], 20, seed=3)
    drawn = whole.cells.loc[whole.cells["condition_index"] == 2, "control_row"].to_numpy()
    np.testing.assert_array_equal(drawn, part.cells["control_row"].to_numpy())
    other_seed = sample_plan(obs, ["A+B"], ["ctrl", "A+ctrl"], 20, seed=4)
    assert not np.array_equal(part.cells["control_row"].to_numpy(), other_seed.cells["control_row"].to_numpy())


def test_a_run_finds_the_data_it_was_trained_on_from_anywhere(tmp_path, monkeypatch):
    """A run trained with --data-dir elsewhere predicted from another folder read ./data or
    $REGINA_DATA: "not found", or a false "stale" against another copy. It now reads the folder it
    was trained on, and an error against another folder names the one to pass."""
    import shutil

    from regina_cli.engine.train_ae import train_autoencoder
    from regina_cli.engine.train_gan import train_gan

    trained_on = keys.data_root().resolve()
    adata, _ = write_tiny_dataset()
    config = build_config(overrides=[*TINY_MODEL, "ae.max_epochs=1", "ae.min_epochs=1", "ae.batch_size=32",
                                     "gan.max_epochs=0"])
    run = tmp_path / "runs" / "r"
    train_autoencoder("tiny", split=tiny_split().name, labels="stress", run_dir=run, config=config, device="cpu",
                      progress="silent")
    other = tmp_path / "elsewhere"
    write_dataset(adata[::2].copy(), "tiny", other / "data")  # another copy of `tiny`
    monkeypatch.setenv("REGINA_DATA", str(other / "data"))
    monkeypatch.chdir(other)
    train_gan(run, device="cpu", progress="silent")
    assert json.loads(ckpt.gan_paths(run).meta.read_text())["data_dir"] == str(trained_on)
    assert ad.read_h5ad(predict(run, "G1", n_cells=4, device="cpu")).n_obs > 0
    with pytest.raises(ReginaError, match=f"dataset changed.*pass --data-dir {trained_on} "):
        predict(run, "G1", n_cells=4, device="cpu", data_dir=other / "data")
    shutil.move(trained_on, tmp_path / "moved")
    with pytest.raises(ReginaError, match=f"trained on the data in {trained_on}, which no longer holds 'tiny'"):
        predict(run, "G1", n_cells=4, device="cpu")


def test_cell_types_restrict_where_a_condition_is_predicted(tiny_run):
    """A multi-line screen's user asks for a perturbation in one line (measured in another, say):
    there was no way to, every condition was drawn in its measured mix."""
    obs = pd.DataFrame({
        keys.OBS_CONDITION: ["ctrl"] * 6 + ["A+ctrl"] * 3,
        keys.OBS_CELL_TYPE: ["x", "x", "y", "y", "y", "z"] + ["x", "x", "x"],
    }, index=[f"c{i}" for i in range(9)])
    in_y = sample_plan(obs, ["A+ctrl"], ["ctrl", "A+ctrl"], 6, seed=0, cell_types=["y"])
    assert set(in_y.cells["cell_type"]) == {"y"} and len(in_y) == 6  # measured only in x: moved to y
    both = sample_plan(obs, ["A+ctrl"], ["ctrl", "A+ctrl"], 6, seed=0, cell_types=["z", "x"])
    assert both.cells.groupby("cell_type").size().to_dict() == {"x": 6}  # its measured mix, within those asked
    with pytest.raises(ReginaError, match=r"--cell-types: 'w' has no training control cells to start from; "
                                          r"cell types with them: x, y, z"):
        sample_plan(obs, ["A+ctrl"], ["ctrl", "A+ctrl"], 6, seed=0, cell_types=["x", "w"])

    run, adata, *_ = tiny_run
    types = sorted(set(adata.obs[keys.OBS_CELL_TYPE]))
    written = ad.read_h5ad(predict(run, "G4+ctrl", n_cells=CELLS, device="cpu", cell_types=f" {types[-1]} ,"))
    predicted = written.obs[keys.OBS_CONDITION] == "G4+ctrl"
    assert set(written.obs.loc[predicted, keys.OBS_CELL_TYPE]) == {types[-1]}
    assert set(written.obs[keys.OBS_CELL_TYPE]) == {types[-1]}  # the appended controls too
    assert written.uns[keys.UNS_REGINA]["cell_types"] == types[-1]
    result = CliRunner().invoke(app, ["predict", "--run", str(run), "--conditions", "G4+ctrl", "--cell-types", ","])
    assert result.exit_code == 2 and "--cell-types is empty" in result.output
