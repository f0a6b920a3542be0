"""Training engine parts that need no dataset: stopping rules, checkpoints, signals, progress,
process discovery."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from regina_cli.engine import checkpoint as ckpt
from regina_cli.devices import resolve_device
from regina_cli.engine.distributed import launched_by_scheduler
from regina_cli.engine.early_stopping import BestTracker, ConsistencyStopper, PatienceStopper
from regina_cli.engine.preemption import StopOnSignal, TrainingInterrupted
from regina_cli.engine.progress import TrainingProgress
from regina_cli.engine.gan_phase import instance_noise_std
from regina_cli.config import GANConfig
from regina_cli.errors import ReginaError


def _first_stop(stopper, values) -> int | None:
    for epoch, value in enumerate(values, start=1):
        if stopper.update(epoch, value):
            return epoch
    return None


def test_consistency_stopper_stops_after_patience_rises_in_a_row():
    values = [1.0, 0.8, 0.6, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]  # rises from epoch 5 on
    stopper = ConsistencyStopper(patience=3, min_delta=0.01, min_epochs=1)
    assert _first_stop(stopper, values) == 7
    assert "3 epochs in a row" in stopper.reason and "epoch 7" in stopper.reason


def test_consistency_stopper_ignores_noise_small_rises_and_early_epochs():
    noisy = [1.0, 1.1, 0.9, 1.0, 0.8, 0.9, 0.7, 0.8, 0.6]  # never two rises in a row
    assert _first_stop(ConsistencyStopper(patience=2, min_delta=0.0, min_epochs=1), noisy) is None
    creeping = [1.0 + 1e-5 * i for i in range(20)]  # rises below min_delta do not count
    assert _first_stop(ConsistencyStopper(patience=2, min_delta=1e-4, min_epochs=1), creeping) is None
    rising = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert _first_stop(ConsistencyStopper(patience=2, min_delta=0.0, min_epochs=5), rising) == 5


def test_stopper_state_round_trips():
    a = ConsistencyStopper(patience=3, min_delta=0.0, min_epochs=1)
    for epoch, value in enumerate([1.0, 1.5, 2.0], 1):
        a.update(epoch, value)
    b = ConsistencyStopper(patience=3, min_delta=0.0, min_epochs=1)
    b.load_state_dict(a.state_dict())
    assert b.update(4, 2.5) and a.update(4, 2.5)


def test_patience_stopper_and_best_tracker():
    stopper = PatienceStopper(metric="pearson_delta", patience=2)
    assert _first_stop(stopper, [0.1, 0.3, 0.2, 0.25, 0.4]) == 4
    assert "best of the trained epochs 0.3000" in stopper.reason
    never = PatienceStopper(metric="pearson_delta_selectable", patience=2)  # no trained epoch may be kept
    assert _first_stop(never, [float("-inf")] * 3) == 2 and "no trained epoch could be kept" in never.reason
    best = BestTracker("mse", "min")
    flags = [best.update(e, v) for e, v in enumerate([3.0, 2.0, float("nan"), 2.5, 1.0], 1)]
    assert flags == [True, True, False, False, True] and best.epoch == 5


def test_a_flat_l_cons_is_not_a_rise():
    """Only a rise by *more than* `min_delta` counts: with `ae.consistency_min_delta=0` a
    consistency loss that settles (the same value epoch after epoch, e.g. saturated at 0) must not
    read as "constantly increasing" and stop a healthy phase 1 after `patience` epochs."""
    flat = [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert _first_stop(ConsistencyStopper(patience=2, min_delta=0.0, min_epochs=1), flat) is None
    by_exactly_delta = [1.0, 1.5, 2.0, 2.5, 3.0]  # each rise equals min_delta: not more than it
    assert _first_stop(ConsistencyStopper(patience=2, min_delta=0.5, min_epochs=1), by_exactly_delta) is None


def test_a_resumed_phase_keeps_its_best_value_best_epoch_and_patience_count():
    """Resume reloads the stopper and the best tracker from last.pt: a patience stopper that forgot
    its best would count a worse epoch after the resume as a new best (phase 2 trained on past its
    patience), and a tracker that forgot its epoch would record the wrong `best_epoch` in meta.json."""
    stopper = PatienceStopper(metric="pearson_delta", patience=2)
    best = BestTracker("pearson_delta", "max")
    for epoch, value in enumerate([0.2, 0.5, 0.4], 1):
        stopper.update(epoch, value)
        best.update(epoch, value)
    resumed_stopper = PatienceStopper(metric="pearson_delta", patience=2)
    resumed_stopper.load_state_dict(stopper.state_dict())
    resumed_best = BestTracker("pearson_delta", "max")
    resumed_best.load_state_dict(best.state_dict())
    assert (resumed_best.value, resumed_best.epoch) == (0.5, 2)
    assert not resumed_best.update(4, 0.45) and resumed_best.epoch == 2
    assert resumed_stopper.update(4, 0.45)  # a second epoch below 0.5: patience 2 is used up
    assert "best of the trained epochs 0.5000" in resumed_stopper.reason


def test_an_epoch_has_at_least_one_step_and_a_rank_at_least_two_cells():
    """Fewer training cells than one batch still trains one (partial) batch an epoch: zero steps
    would "train" every epoch without a single update and report the untrained model as done. A
    rank with a single cell is refused in words (BatchNorm cannot normalise one cell)."""
    from regina_cli.engine.distributed import DistContext
    from regina_cli.engine.loop import steps_per_epoch

    one, four = (DistContext(0, 0, n, torch.device("cpu")) for n in (1, 4))
    assert steps_per_epoch(50, 64, one) == 1
    assert steps_per_epoch(200, 64, one) == 3  # the last partial batch is dropped
    assert steps_per_epoch(8, 64, four) == 1  # two cells a rank
    with pytest.raises(ReginaError, match="only 1 training cells for 1 process"):
        steps_per_epoch(1, 64, one)
    with pytest.raises(ReginaError, match="only 7 training cells for 4 process"):
        steps_per_epoch(7, 64, four)


def test_learning_rates_scale_with_the_global_batch_against_64_only_when_asked():
    """`ae.lr_scale_batch` / `gan.lr_scale_batch` scale the rate by (batch x processes) / 64, the
    reference batch the documented rates were tuned at; off (the default) the rate is as set."""
    from regina_cli.engine.loop import scaled_lr

    assert scaled_lr(1e-3, True, 256) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, True, 64) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, False, 256) == 1e-3


def test_instance_noise_decays_linearly_between_start_and_end():
    cfg = GANConfig(instance_noise=0.1, noise_decay_start=20, noise_decay_end=80)
    assert instance_noise_std(cfg, 1) == 0.1
    assert instance_noise_std(cfg, 50) == pytest.approx(0.05)
    assert instance_noise_std(cfg, 80) == 0.0


def test_rng_state_and_checkpoint_round_trip_with_weights_only(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = ckpt.capture_rng_state({"pairing": gen})
    expected = (torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=gen))
    path = tmp_path / "state.pt"
    ckpt.save_torch(path, {"rng": state, "weights": torch.nn.Linear(2, 2).state_dict()})
    loaded = torch.load(path, weights_only=True)  # the promise: no pickled objects
    gen2 = torch.Generator().manual_seed(99)
    ckpt.restore_rng_state(loaded["rng"], {"pairing": gen2})
    again = (torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=gen2))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1] and expected[2] == again[2]
    assert torch.equal(expected[3], again[3])
    assert not list(tmp_path.glob(".*part*")), "no temporary file left behind"


def test_weights_of_a_compiled_model_are_saved_under_the_plain_names():
    """`--compile` wraps the model (`torch.compile`), whose state_dict names every weight
    `_orig_mod.<name>`: model.pt must hold the plain names, or predict (an uncompiled model)
    cannot load it. The copies are on the CPU and detached from the live weights."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any("_orig_mod." in name for name in compiled.state_dict())
    weights = ckpt.state_dict_to_cpu(compiled)
    assert set(weights) == set(model.state_dict())
    torch.nn.Sequential(torch.nn.Linear(3, 2)).load_state_dict(weights)
    weights["0.weight"].add_(1.0)
    assert not torch.equal(weights["0.weight"], model[0].weight)


def test_history_appends_and_truncates_on_resume(tmp_path):
    paths = ckpt.ae_paths(tmp_path / "run")
    for epoch in (1, 2, 3):
        ckpt.append_history(paths, {"epoch": epoch, "train_mse": 1.0 / epoch})
    ckpt.append_history(paths, {"epoch": 4, "train_mse": 0.2, "val_cons": 0.5})
    rows = ckpt.read_history(paths)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"] and rows[3]["val_cons"] == "0.5"
    ckpt.truncate_history(paths, 2)
    assert [r["epoch"] for r in ckpt.read_history(paths)] == ["1", "2"]
    ckpt.append_history(paths, {"epoch": 3, "train_mse": 0.123456789, "val_cons": 12345.678})
    assert ckpt.read_history(paths)[-1] == {"epoch": "3", "train_mse": "0.123457", "val_cons": "12345.7"}  # 6 digits


def test_damaged_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ReginaError, match="cannot read checkpoint"):
        ckpt.load_torch(bad)


def test_a_failed_checkpoint_write_advises_resume_only_when_there_is_something_to_resume(tmp_path, monkeypatch):
    """A full disk before the first last.pt advised `--resume`, which then said "nothing to resume"."""
    def full(obj, path, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(ReginaError, match="then run the same command again$"):
        ckpt.save_torch(tmp_path / "best.pt", {})
    (tmp_path / "last.pt").write_bytes(b"an earlier epoch")
    with pytest.raises(ReginaError, match="then run again with --resume$"):
        ckpt.save_torch(tmp_path / "best.pt", {})


def test_a_failed_write_for_another_reason_is_not_blamed_on_the_disk(tmp_path, monkeypatch):
    """Only torch's failed-write messages mean a full disk or quota: any other error of torch.save
    (a bug, a tensor that cannot be serialised) must surface as itself, not as advice to free space
    and resume, which would send the user after a problem they do not have."""
    def broken(obj, path, *a, **k):
        raise RuntimeError("cannot pickle 'generator' object")

    monkeypatch.setattr(ckpt.torch, "save", broken)
    with pytest.raises(RuntimeError, match="cannot pickle") as raised:
        ckpt.save_torch(tmp_path / "last.pt", {})
    assert not isinstance(raised.value, ReginaError)


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    """REGINA's .pt files hold tensors and plain containers only, and are loaded with
    weights_only=True: a file holding pickled objects (a whole module, or code from someone else's
    run directory) must be refused, never unpickled, which could run arbitrary code."""
    foreign = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), foreign)  # a pickled Module, not a state_dict
    with pytest.raises(ReginaError, match="cannot read checkpoint"):
        ckpt.load_torch(foreign)


def test_a_missing_checkpoint_says_train_first_not_delete_it(tmp_path):
    """A phase never trained has no .pt file: the error says so ("train this phase first"), not
    "cannot read checkpoint ...; retrain or delete it", which names a file that is not there."""
    with pytest.raises(ReginaError, match="does not exist; train this phase first"):
        ckpt.load_torch(tmp_path / "ae" / "model.pt")


def test_stop_on_signal_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.requested and signals.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
    assert TrainingInterrupted("x", signal.SIGTERM).exit_code == 128 + signal.SIGTERM


def test_a_stop_signal_lost_before_training_stops_it_at_its_first_step():
    """A SIGTERM whose exception was lost while a run was set up (a garbage-collector callback)
    was forgotten: training ran to its end, and a Slurm job got no last.pt before SIGKILL."""
    from regina_cli import io

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10000):
                pass

    with io.exit_cleanly_on_sigterm():
        SignalledWhileCollected()
        with StopOnSignal() as signals:
            assert signals.signum == signal.SIGTERM
        io.raise_pending_stop()  # handed to training: not raised a second time


def test_progress_plain_lines_and_silence(capsys):
    with TrainingProgress("train-ae", max_epochs=2, mode="plain") as bar:
        bar.start_epoch(1, 3)
        for step in (1, 2, 3):
            bar.step(step, lambda: {"mse": 0.5})
        bar.end_epoch({"mse": 0.5, "val_cons": 0.25})
    assert "train-ae epoch 1/2 mse=0.5 val_cons=0.25" in capsys.readouterr().err
    with TrainingProgress("train-ae", max_epochs=2, mode="silent") as bar:
        bar.start_epoch(1, 1)
        bar.end_epoch({"mse": 0.5})
    assert capsys.readouterr().err == ""


def test_process_discovery_from_torchrun_and_slurm(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(var, "")  # recorded, so what discovery writes is undone afterwards
        monkeypatch.delenv(var)
    assert launched_by_scheduler() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launched_by_scheduler() is None  # one task: nothing to join
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launched_by_scheduler() is None  # the batch shell of a 4-task job, not an srun step: no peers will come
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    assert launched_by_scheduler() == (3, 1, 4)
    assert os.environ["RANK"] == "3" and os.environ["MASTER_PORT"] == str(15000 + 1234)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_by_scheduler() == (1, 0, 2)  # torchrun's variables win
    for var in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_by_scheduler() is None  # RANK/WORLD_SIZE of one, not from torchrun: nothing to join
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launched_by_scheduler() == (0, 0, 1)  # `torchrun --nproc-per-node=1` joins a group of one


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_user_error():
    with pytest.raises(ReginaError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_gan_validation_works_with_fewer_genes_than_top_de():
    """A screen of fewer than TOP_DE (20) genes: validation ranks all of its genes (topk used to fail)."""
    import anndata as ad
    import pandas as pd

    from regina_cli.config import build_config
    from regina_cli.data.split import Split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.engine.distributed import DistContext
    from regina_cli.engine.gan_validation import TOP_DE, build_plan
    from regina_cli.engine.gan_phase import CycleGANPhase, encode_all
    from regina_cli.model.autoencoder import Autoencoder
    from regina_cli.model.gan import LatentCycleGAN

    genes = [f"G{i}" for i in range(12)]
    assert len(genes) < TOP_DE
    conditions = ["ctrl"] * 30 + ["G1+ctrl"] * 10 + ["G2+ctrl"] * 10 + ["G3+ctrl"] * 10
    x = np.random.default_rng(0).random((len(conditions), len(genes))).astype(np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame({"condition": conditions}, index=[f"c{i}" for i in range(len(x))]),
                       var=pd.DataFrame(index=genes))
    split = Split(dataset="tiny", mode="custom", seed=0, train_gene_frac=None, train=["ctrl", "G1+ctrl", "G2+ctrl"],
                  val=["G3+ctrl"], test=[], subgroups={})
    config = build_config(preset="demo", overrides=["model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                                                    "model.z_dim=8", "model.ff_mult=2", "model.classifier_hidden=8",
                                                    "model.transition_hidden=16", "model.discriminator_hidden=[16]"])
    cells = CellTensors.from_anndata(adata, split, device_data="always")
    ae = Autoencoder(cells.n_genes, 2, config.model).eval()
    gan = LatentCycleGAN(ae.z_dim, config.model, prompt_genes=cells.prompt_genes)
    plan = build_plan(cells, adata, seed=0)
    assert plan.conditions == ["G3+ctrl"]
    latents = encode_all(ae.encoder, cells, "off")
    phase = CycleGANPhase(ae, gan, cells, config, DistContext(0, 0, 1, torch.device("cpu")), plan, latents)
    values = phase.validate(1)
    assert {"pearson_delta", "pearson_delta_top20_de", "mse_delta", "collapse_index",
            "ceiling_pearson_delta"} <= set(values)
    collapse = {k: values.pop(k) for k in ("collapse_index", "collapse_index_true")}
    assert all(np.isnan(v) for v in collapse.values())  # one validation condition: no pairs to correlate
    assert all(np.isfinite(v) for v in values.values())


@pytest.mark.parametrize("n_val", [1, 3])
def test_too_few_validation_conditions_are_joined_by_a_training_holdout(n_val):
    """One predictable validation condition makes a noisy model selection: with
    gan.validation_min_conditions=3 a share of the training perturbations is held out of phase 2
    and validated on beside it; three are trusted alone, and min 1 keeps the old rule."""
    import anndata as ad
    import pandas as pd

    from regina_cli.data.split import Split
    from regina_cli.data.tensors import CellTensors
    from regina_cli.engine.gan_phase import phase_train_index
    from regina_cli.engine.gan_validation import FROM_VALIDATION, build_plan

    genes = [f"G{i}" for i in range(12)]
    singles = [f"G{i}+ctrl" for i in range(1, 11)]
    conditions = ["ctrl"] * 30 + [c for c in singles for _ in range(8)]
    x = np.random.default_rng(0).random((len(conditions), len(genes))).astype(np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame({"condition": conditions}, index=[f"c{i}" for i in range(len(x))]),
                       var=pd.DataFrame(index=genes))
    val = singles[-n_val:]
    split = Split(dataset="tiny", mode="custom", seed=0, train_gene_frac=None, train=["ctrl", *singles[:-n_val]],
                  val=val, test=[], subgroups={})
    cells = CellTensors.from_anndata(adata, split, device_data="always")
    plan = build_plan(cells, adata, seed=0, holdout=0.2, min_conditions=3)
    if n_val == 3:
        assert sorted(plan.conditions) == sorted(val) and plan.held_out == [] and plan.source == FROM_VALIDATION
        return
    assert len(plan.held_out) == 2 and set(plan.held_out) <= set(split.train)
    assert plan.conditions == val + plan.held_out and "and 1 validation condition" in plan.source
    assert torch.equal(torch.unique(plan.groups), torch.arange(3))  # each condition its own group
    held_codes = [cells.conditions.index(c) for c in plan.held_out]
    trained = cells.condition_codes[phase_train_index(cells, plan.held_out)]
    assert not torch.isin(trained, torch.as_tensor(held_codes)).any()  # phase 2 never trains on them
    assert build_plan(cells, adata, seed=0, holdout=0.2, min_conditions=1).conditions == val


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_training_stops_on_slurms_warning_signals(signum):
    """`#SBATCH --signal=USR1@120` killed training at once, with no checkpoint."""
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signum == signum


def test_phase2_meta_starts_as_training_whatever_phase1_recorded():
    """Phase 2's meta.json starts as a copy of phase 1's: it must read "training" (with no training
    summary) until phase 2 finishes, or a phase 2 killed mid-way would pass for a trained one and
    predict would use its unfinished weights without a word."""
    from regina_cli.engine.run_meta import TRAINED, TRAINING, RunMeta

    phase1 = RunMeta(phase="ae", dataset="d", split="s", labels="l", gene_names=["A"], label_classes=["x", "y"],
                     cell_types=["all"], conditions=["ctrl"], train_conditions=["ctrl"], val_conditions=[],
                     test_conditions=[], perturbed_genes=[], selection="variance_preservation",
                     status=TRAINED, training={"stop_reason": "max_epochs: reached 1 epochs"})
    phase2 = phase1.for_phase("gan", selection="pearson_delta_selectable")
    assert phase2.status == TRAINING and not phase2.is_trained and phase2.training is None
    assert phase2.phase == "gan" and phase2.gene_names == ["A"]


def test_phase1_validation_scores_per_gene_mse_and_variance_preservation():
    """history.csv's val_mse is the mean squared error per cell *and gene*, as train_mse is (a sum
    over genes would read as a model hundreds of times worse on validation than in training), and
    variance_preservation the Pearson correlation of real and reconstructed per-gene spreads."""
    from regina_cli.config import build_config
    from regina_cli.data.tensors import CellTensors
    from regina_cli.engine.distributed import DistContext
    from regina_cli.engine.train_ae import AutoencoderPhase
    from regina_cli.model.autoencoder import Autoencoder
    from test_tensors import tiny_labels, tiny_screen, tiny_split

    adata = tiny_screen()
    cells = CellTensors.from_anndata(adata, tiny_split(), tiny_labels(adata), device_data="always")
    config = build_config(preset="demo", overrides=["model.seq_len=4", "model.d_model=16", "model.n_layers=1",
                                                    "model.n_heads=2", "model.z_dim=8", "model.classifier_hidden=8"])
    torch.manual_seed(0)
    model = Autoencoder(cells.n_genes, len(cells.label_classes), config.model)
    values = AutoencoderPhase(model, cells, config, DistContext(0, 0, 1, torch.device("cpu"))).validate(1)
    model.eval()
    x = cells.x[cells.val_idx].double()
    with torch.no_grad():
        rec = model.decoder(model.encoder(x.float())).double()
    assert values["mse"] == pytest.approx(((rec - x) ** 2).mean().item(), rel=1e-5)
    spread = torch.corrcoef(torch.stack([x.std(0), rec.std(0)]))[0, 1].item()
    assert values["variance_preservation"] == pytest.approx(spread, rel=1e-4, abs=1e-6)
