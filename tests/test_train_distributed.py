"""`--gpus 2 --device cpu`: two data-parallel gloo processes started through torchrun's elastic
launcher train phase 1; the ranks must end with identical weights, and rank 0 alone writes."""

from __future__ import annotations

import json

import torch

from regina_cli.config import build_config
from regina_cli.engine.train_ae import train_autoencoder

TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.z_dim=16", "model.ff_mult=2",
        "model.classifier_hidden=16", "ae.batch_size=32", "ae.max_epochs=2"]


def test_two_gloo_processes_stay_in_sync(tmp_path):
    from regina_cli.data.dataset import write_dataset
    from regina_cli.data.demo import simulate_screen
    from regina_cli.data.label import label_dataset
    from regina_cli.data.split import split_dataset

    data_dir = tmp_path / "data"
    write_dataset(simulate_screen(n_cells=300, n_genes=140, n_singles=6, n_doubles=3, seed=0), "screen", data_dir)
    split_dataset("screen", mode="simulation", seed=1, data_dir=data_dir)
    label_dataset("screen", "stress", split="simulation_1", data_dir=data_dir)

    run_dir = tmp_path / "run"
    summary = train_autoencoder("screen", split="simulation_1", labels="stress", run_dir=run_dir,
                                config=build_config(preset="demo", overrides=TINY), data_dir=data_dir,
                                gpus=2, device="cpu", progress="silent")
    ranks = summary["per_rank"]
    assert len(ranks) == 2
    assert ranks[0]["parameter_checksum"] == ranks[1]["parameter_checksum"]  # weights identical
    assert ranks[0]["last"]["val_cons"] == ranks[1]["last"]["val_cons"]  # same decisions
    assert summary["epochs"] == 2 and summary["stop_reason"].startswith("max_epochs")

    # What rank 0 wrote is the weights both ranks trained.
    saved = torch.load(run_dir / "ae" / "last.pt", weights_only=True)["modules"]["autoencoder"]
    params = {k: v for k, v in saved.items() if "running" not in k and "num_batches" not in k
              and not k.endswith(("_u", "_v"))}
    meta = json.loads((run_dir / "ae" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert len(params) > 0 and abs(sum(float(v.double().sum()) for v in params.values())
                                   - summary["parameter_checksum"]) < 1e-6 * max(1.0, abs(summary["parameter_checksum"]))
    # history.csv has the columns of a one-process run, in the same order.
    header = (run_dir / "ae" / "history.csv").read_text().splitlines()[0].split(",")
    validation = [c for c in header if c.startswith("val_")]
    assert validation == ["val_mse", "val_cons", "val_variance_preservation", "val_clf_acc"]
