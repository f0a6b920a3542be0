"""`regina split`: GEARS modes, the JSON contract, user split files, errors, real screens.

The draw-for-draw comparison with cell-gears itself lives in tests/test_split_gears.py.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest

from cli_helpers import assert_user_error, invoke
from regina_cli import keys
from regina_cli.cli import split_cmd
from regina_cli.cli.split_cmd import split_command
from regina_cli.data import split as split_mod
from regina_cli.data.conditions import parse_condition
from regina_cli.data.dataset import write_dataset
from regina_cli.data.split import (
    MODES,
    SUBGROUPS,
    derived_subgroups,
    gears_split,
    load_split,
    make_split,
    split_dataset,
)
from regina_cli.errors import ReginaError


def toy_conditions(n_genes=24, n_combos=40, seed=0, singles_only=False) -> list[str]:
    """GEARS labels in a shuffled order of appearance, with both `A+ctrl` and `ctrl+A` spellings."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    singles = [f"{g}+ctrl" if i % 5 else f"ctrl+{g}" for i, g in enumerate(genes)]
    combos = [] if singles_only else sorted({"+".join(rng.choice(genes, 2, replace=False)) for _ in range(n_combos)})
    return [str(c) for c in dict.fromkeys(rng.permutation(["ctrl"] + singles + combos))]


@pytest.fixture(scope="module")
def demo_files(demo_adata, tmp_path_factory):
    """The demo written once (h5ad + checksum); each test gets a copy in its own data folder."""
    folder = tmp_path_factory.mktemp("demo_data")
    write_dataset(demo_adata, "demo", folder)
    return keys.dataset_dir("demo", folder)


@pytest.fixture
def demo(demo_adata, demo_files):
    shutil.copytree(demo_files, keys.dataset_dir("demo"))
    return demo_adata




def splits_dir():
    return keys.dataset_dir("demo") / keys.SPLITS_DIR


# --- the splitter -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [m for m in MODES if m != "simulation_single"])
def test_every_mode_partitions_the_conditions(mode):
    conditions = toy_conditions()
    split = make_split("toy", conditions, mode=mode, seed=2)
    sets = [set(split.train), set(split.val), set(split.test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) <= set(conditions)
    assert "ctrl" in split.train
    for set_name in ("val", "test"):
        grouped = [c for g in SUBGROUPS for c in split.subgroups[f"{set_name}_subgroup"][g]]
        assert len(grouped) == len(set(grouped)) and set(grouped) <= set(getattr(split, set_name))
    if mode == "combo_seen2":
        assert all(len(parse_condition(c)) == 2 for c in split.test)
    if mode == "no_test":
        assert split.test == []


def test_simulation_holds_out_whole_genes_and_matches_derived_subgroups():
    conditions = toy_conditions()
    sets, gears_groups = gears_split(conditions, "simulation", seed=1)
    genes = {g for c in conditions for g in parse_condition(c)}
    # test genes are held out of train+val; val genes are then held out of train (at 0.9)
    seen_genes = {g for c in sets["train"] + sets["val"] for g in parse_condition(c)}
    assert len(seen_genes) == int(len(genes) * 0.75)
    assert len({g for c in sets["train"] for g in parse_condition(c)}) == int(int(len(genes) * 0.75) * 0.9)
    for c in gears_groups["test_subgroup"]["unseen_single"]:
        assert not set(parse_condition(c)) & seen_genes
    # every gene has a single here, so GEARS' subgroups are exactly "how many genes were seen"
    derived = derived_subgroups(sets["train"] + sets["val"], sets["test"])
    assert {g: sorted(v) for g, v in derived.items()} == {g: sorted(v) for g, v in gears_groups["test_subgroup"].items()}


@pytest.mark.parametrize("mode", ["simulation", "combo_seen1", "single"])
def test_gears_modes_refuse_conditions_of_three_genes(mode):
    """GEARS' splits know singles and pairs only: a triple would be dropped or misfiled without a
    word, so every generated mode refuses it and points to --split-file."""
    with pytest.raises(ReginaError, match="at most two genes per condition.*--split-file"):
        gears_split(["ctrl", "A+ctrl", "B+ctrl", "A+B", "A+B+C"], mode, seed=1)


def test_derived_subgroups_leave_out_a_single_whose_gene_trains_inside_a_combination():
    """A held-out single "A+ctrl" whose gene A is trained on inside "A+B" is not an unseen gene: a
    user reading unseen_single scores must not get it counted there (nor in any combo group)."""
    groups = derived_subgroups(["ctrl", "A+B", "C+ctrl"], ["A+ctrl", "D+ctrl", "A+D", "A+C", "D+E"])
    assert groups == {"combo_seen0": ["D+E"], "combo_seen1": ["A+D"], "combo_seen2": ["A+C"],
                      "unseen_single": ["D+ctrl"]}


def test_train_gene_frac_sets_the_number_of_training_genes():
    conditions = toy_conditions(n_genes=40, singles_only=True)
    for frac in (0.5, 0.75, 0.9):
        split = make_split("toy", conditions, mode="simulation_single", seed=3, train_gene_frac=frac)
        assert len(split.train) - 1 + len(split.val) == int(40 * frac)  # minus ctrl
        assert split.train_gene_frac == frac


@pytest.mark.parametrize("frac", [0.0, 1.0])
def test_train_gene_frac_of_none_or_all_genes_is_refused(frac):
    """A share of 1 puts every gene in training (nothing unseen is left to test), 0 none: both are
    refused by the option's own message, not by whatever later step an empty set breaks."""
    with pytest.raises(ReginaError, match="--train-gene-frac must lie strictly between 0 and 1"):
        make_split("toy", toy_conditions(), mode="simulation", seed=1, train_gene_frac=frac)


def test_simulation_single_refuses_combinations():
    with pytest.raises(ReginaError, match="simulation_single needs a screen without combinations"):
        make_split("toy", toy_conditions(), mode="simulation_single")


def test_seed_changes_the_split_and_the_same_seed_repeats_it():
    conditions = toy_conditions()
    first, again, other = (make_split("toy", conditions, seed=s) for s in (1, 1, 2))
    assert first == again
    assert first.test != other.test


def test_json_round_trip_and_lookup(tmp_path):
    split = make_split("toy", toy_conditions(), mode="simulation", seed=1)
    assert split_mod.save_split(split, tmp_path) and not split_mod.save_split(split, tmp_path)  # the second: as saved
    path = keys.split_file("toy", "simulation_1", tmp_path)
    obj = json.loads(path.read_text())
    assert set(obj) == {"dataset", "mode", "seed", "train_gene_frac", "train", "val", "test", "subgroup",
                        "name", "dataset_sha256"}
    assert obj["dataset_sha256"] is None  # no dataset "toy" was fetched: nothing to record
    assert set(obj["subgroup"]) == {"test_subgroup", "val_subgroup"}
    assert obj["train"] == sorted(obj["train"])
    loaded = load_split("toy", "simulation_1", tmp_path)
    assert loaded == split and loaded.name == "simulation_1"
    some_test = split.subgroups["test_subgroup"]["unseen_single"][0]
    assert loaded.subgroup_of(some_test) == "unseen_single" and loaded.set_of(some_test) == "test"
    assert loaded.subgroup_of("ctrl") is None and loaded.set_of("ctrl") == "train"


def test_load_split_missing_says_how_to_make_it(tmp_path):
    with pytest.raises(ReginaError, match=r"regina split toy --mode combo_seen2 --seed 4"):
        load_split("toy", "combo_seen2_4", tmp_path)


def test_cli_defaults_equal_the_engine_defaults():
    params = inspect.signature(split_command).parameters
    assert params["mode"].default.default == inspect.signature(make_split).parameters["mode"].default
    assert params["seed"].default.default == split_mod.DEFAULT_SEED
    assert params["train_gene_frac"].default.default == split_mod.DEFAULT_TRAIN_GENE_FRAC
    assert split_cmd._MODES == ", ".join(MODES)  # a new mode would be missing from `split --help`


# --- the command ------------------------------------------------------------------------------


def test_cli_writes_the_split_with_a_summary_and_same_seed_same_bytes(demo):
    result = invoke("split", "demo", "--seed", "1")
    assert result.exit_code == 0, result.output
    for word in ("train", "val", "test", "unseen_single", "conditions", "cells"):
        assert word in result.output
    path = splits_dir() / "simulation_1.json"
    first = path.read_bytes()
    split = load_split("demo", "simulation_1")
    cells = demo.obs[keys.OBS_CONDITION].astype(str).value_counts()
    train_cells = int(cells[split.train].sum())
    assert f"{train_cells}" in result.output
    assert invoke("split", "demo", "--seed", "1").exit_code == 0
    assert path.read_bytes() == first
    assert [p.name for p in splits_dir().iterdir()] == ["simulation_1.json"]  # no temporary left


def test_cli_json_output_for_scripts(demo):
    result = invoke("--json", "split", "demo", "--mode", "combo_seen1", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["split"] == "combo_seen1_3"
    assert sum(r["conditions"] for r in out["summary"] if r["subgroup"] == "all") <= demo.obs["condition"].nunique()


def test_a_dataset_fetched_again_while_splitting_leaves_no_split(demo, refetched_after_read):
    """The split file recorded the dataset's hash when it was saved, not when its conditions were read."""
    assert_user_error(invoke("split", "demo", "--seed", "1"), "dataset demo changed while splitting",
                      "run the command again")
    assert not splits_dir().exists() or list(splits_dir().iterdir()) == []


def test_two_train_gene_fracs_are_two_splits_and_the_default_keeps_its_name(demo):
    """Splits differing only in --train-gene-frac were both named simulation_1: the second was
    refused, or replaced the first with --force."""
    default = invoke("--json", "split", "demo", "--seed", "1")
    half = invoke("split", "demo", "--seed", "1", "--train-gene-frac", "0.5")
    assert default.exit_code == 0 and half.exit_code == 0, half.output
    assert json.loads(default.stdout)["split"] == "simulation_1"
    assert "later steps take it as --split simulation_1_0.5" in " ".join(half.output.split())
    assert sorted(p.name for p in splits_dir().iterdir()) == ["simulation_1.json", "simulation_1_0.5.json"]
    first, second = load_split("demo", "simulation_1"), load_split("demo", "simulation_1_0.5")
    assert (first.train_gene_frac, second.train_gene_frac) == (0.75, 0.5) and first.test != second.test
    assert second == make_split("demo", split_mod.conditions_in_order(demo.obs), seed=1, train_gene_frac=0.5)
    assert invoke("split", "demo", "--seed", "1", "--train-gene-frac", "0.5").exit_code == 0  # the same again
    assert invoke("label", "demo", "--method", "stress", "--split", "simulation_1_0.5").exit_code == 0
    assert (keys.dataset_dir("demo") / keys.LABELS_DIR / "stress@simulation_1_0.5.csv").is_file()
    with pytest.raises(ReginaError, match=r"split demo --mode simulation_single --seed 2 --train-gene-frac 0.5`"):
        load_split("demo", "simulation_single_2_0.5")
    with pytest.raises(ReginaError, match=r"plus _<train-gene-frac> when that is not 0.75"):
        load_split("demo", "simulation_1_0.75")  # the default share is never spelled out
    # this version's file copied by hand under the default's name names itself: refused as a copy
    half_file = json.loads((splits_dir() / "simulation_1_0.5.json").read_text())
    assert half_file[keys.SPLIT_NAME] == "simulation_1_0.5"
    (splits_dir() / "simulation_1.json").write_text(json.dumps(half_file))
    with pytest.raises(ReginaError, match=r"holds split simulation_1_0.5, not simulation_1 \(copied"):
        load_split("demo", "simulation_1")
    # an older version's file (no name) at 0.5 under the default's name, its dataset changed since:
    # remake what it holds
    old = {k: v for k, v in half_file.items() if k != keys.SPLIT_NAME}
    (splits_dir() / "simulation_1.json").write_text(json.dumps({**old, keys.DATASET_SHA256: "0" * 64}))
    with pytest.raises(ReginaError, match=r"seed 1 --force` \(it holds what is now split simulation_1_0.5.*"
                                          r"--train-gene-frac 0.5` and pass --split simulation_1_0.5\)"):
        load_split("demo", "simulation_1")
    assert invoke("split", "demo", "--seed", "1", "--force").exit_code == 0  # the advice clears it
    assert load_split("demo", "simulation_1").train_gene_frac == 0.75


def test_the_result_table_goes_to_stdout_and_status_lines_to_stderr(demo):
    """Result tables were on stderr, so `regina split demo > split.txt` kept nothing."""
    result = invoke("split", "demo", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert "unpredictable" in result.stdout and "later steps take it as" not in result.stdout
    assert "later steps take it as" in result.stderr and "unpredictable" not in result.stderr


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["split", "missing"], ["regina fetch missing"]),
        (["split", "demo", "--mode", "random"], ["unknown split mode", "simulation_single"]),
        (["split", "demo", "--train-gene-frac", "1.5"], ["--train-gene-frac"]),
        (["split", "demo", "--split-file", "nowhere.json"], ["not found"]),
    ],
)
def test_cli_bad_inputs_give_one_line_and_no_file(demo, args, fragments):
    assert_user_error(invoke(*args), *fragments)
    assert not splits_dir().exists()


def test_cli_refuses_an_empty_set(demo_adata):
    conditions = demo_adata.obs["condition"].astype(str)
    singles = [c for c in pd.unique(conditions) if len(parse_condition(c)) == 1][:3]
    write_dataset(demo_adata[conditions.isin(["ctrl", *singles]).to_numpy()].copy(), "demo")
    # mode single holds out int(3 singles * 10 %) = 0 genes: an empty test set is refused
    assert_user_error(invoke("split", "demo", "--mode", "single"), "set of demo empty", "--split-file")
    assert not splits_dir().exists()


# --- user split files ---------------------------------------------------------------------------


def demo_user_split(demo_adata) -> dict:
    perts = [c for c in split_mod.conditions_in_order(demo_adata.obs) if c != "ctrl"]
    return {"train": perts[:-6], "val": perts[-6:-3], "test": perts[-3:]}


@pytest.mark.parametrize("fmt", ["json", "pickle"])
def test_user_split_file_is_validated_and_written(demo, tmp_path, fmt):
    user = demo_user_split(demo)
    source = tmp_path / f"mine.{'json' if fmt == 'json' else 'pkl'}"
    if fmt == "json":
        source.write_text(json.dumps(user))
    else:
        source.write_bytes(pickle.dumps({k: np.array(v) for k, v in user.items()}))
    result = invoke("--json", "split", "demo", "--split-file", str(source))
    assert result.exit_code == 0, result.output
    name = json.loads(result.stdout)["split"]
    assert name.startswith("custom_") and len(name) == len("custom_") + 8  # named by its content
    split = load_split("demo", name)
    assert split.mode == "custom" and split.train_gene_frac is None
    assert split.train == sorted(user["train"] + ["ctrl"])  # controls join train, as in GEARS
    assert split.test == sorted(user["test"])
    assert set(split.subgroups["test_subgroup"]) == set(SUBGROUPS)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda u: u["test"].append("NOTAGENE+ctrl"), "not in the dataset"),
        (lambda u: u["val"].append(u["train"][0]), "in both train and val"),
        (lambda u: u.update(val=[]), "the val set has no perturbed condition"),
        (lambda u: u["test"].append("ctrl"), "must be in train"),
        (lambda u: u.pop("test"), "keys train, val and test"),
    ],
)
def test_user_split_file_errors(demo, tmp_path, change, fragment):
    user = demo_user_split(demo)
    change(user)
    source = tmp_path / "mine.json"
    source.write_text(json.dumps(user))
    assert_user_error(invoke("split", "demo", "--split-file", str(source)), fragment)
    assert not splits_dir().exists()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_split_pickle_that_runs_code_is_refused(demo, tmp_path):
    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps({"train": [_Exploit()], "val": [], "test": []}))
    assert_user_error(invoke("split", "demo", "--split-file", str(source)), "neither JSON nor a GEARS split pickle")


def test_not_a_split_file(demo, tmp_path):
    source = tmp_path / "notes.txt"
    source.write_text("train: A")
    assert_user_error(invoke("split", "demo", "--split-file", str(source)), "neither JSON")


# --- real screens -------------------------------------------------------------------------------


def test_papalexi_conditions_split_like_gears_describes(papalexi_path):
    import anndata

    adata = anndata.read_h5ad(papalexi_path, backed="r")
    conditions = split_mod.conditions_in_order(adata.obs)
    adata.file.close()
    split = make_split("papalexi", conditions, mode="simulation", seed=1)
    n_genes = len(conditions) - 1  # 25 single-gene knock-outs + ctrl
    assert len(split.train) - 1 + len(split.val) == int(n_genes * 0.75)
    assert split.test == sorted(split.subgroups["test_subgroup"]["unseen_single"])
    assert make_split("papalexi", conditions, mode="simulation_single", seed=1).test == split.test


def test_mcfaline_imported_then_split_from_the_cli(mcfaline_path):
    from regina_cli.data.fetch import fetch

    fetch("mcfaline", source=str(mcfaline_path), log=lambda message: None)
    result = invoke("split", "mcfaline", "--mode", "simulation", "--seed", "1")
    assert result.exit_code == 0, result.output
    split = load_split("mcfaline", "simulation_1")
    # 9 CRISPRi targets: int(9 * 0.75) = 6 training genes, of which int(6 * 0.9) = 5 stay in train
    assert (len(split.train), len(split.val), len(split.test)) == (6, 1, 3)
    assert all(c.endswith("+ctrl") for c in split.val + split.test)
    # a 10 % validation draw of 9 conditions is empty: refused, not written
    assert_user_error(invoke("split", "mcfaline", "--mode", "no_test"), "val set of mcfaline empty")
    assert not keys.split_file("mcfaline", "no_test_1").exists()


# --- predictable conditions -------------------------------------------------------------------


@pytest.fixture
def dropped_demo():
    """A demo whose half of the targets the screen does not measure, with its gene annotation."""
    from regina_cli.data.demo import simulate_demo

    adata, annotation = simulate_demo(n_cells=800, n_genes=300, n_singles=12, n_doubles=6, seed=2, drop_targets=0.5)
    write_dataset(adata, "demo")
    (keys.dataset_dir("demo") / keys.GENE_KNOWLEDGE_FILE).write_text(annotation)
    return set(adata.uns[keys.UNS_REGINA]["simulation"]["dropped_targets"])


def test_split_counts_unpredictable_conditions_and_warns_with_the_fix(dropped_demo):
    result = invoke("--json", "split", "demo")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    split = load_split("demo", "simulation_1")
    trained = {g for c in split.train for g in parse_condition(c)}
    rows = {(r["set"], r["subgroup"]): r for r in out["summary"]}
    for set_name in ("train", "val", "test"):
        genes = [set(parse_condition(c)) for c in getattr(split, set_name)]
        assert rows[(set_name, "all")]["unmeasured"] == sum(bool(g & dropped_demo) for g in genes)
        assert rows[(set_name, "all")]["unpredictable"] == sum(bool((g & dropped_demo) - trained) for g in genes)
    n_test = rows[("test", "all")]["unpredictable"]
    assert n_test == 7 and rows[("train", "all")]["unpredictable"] == 0
    assert out["warnings"] == [
        f"7 of 8 test conditions are unpredictable: a target is neither measured, nor perturbed in training, nor "
        "known to the gene knowledge; pass --gene-knowledge FILE (gene embeddings or GO terms) at train-ae (the "
        "run keeps it for predict), or run `regina fetch go` and pass --gene-knowledge go"
    ]
    human = invoke("split", "demo")
    assert "warning: 7 of 8 test conditions are unpredictable" in " ".join(human.output.split())


def test_split_with_gene_knowledge_counts_what_it_makes_predictable(dropped_demo, tmp_path):
    knowledge = keys.dataset_dir("demo") / keys.GENE_KNOWLEDGE_FILE
    informed = json.loads(invoke("--json", "split", "demo", "--gene-knowledge", knowledge).stdout)
    assert informed["warnings"] == []
    assert all(r["unpredictable"] == 0 for r in informed["summary"])
    unrelated = tmp_path / "other.tsv"
    unrelated.write_text("gene,x\nNOT_A_GENE,1.0\n")
    still = json.loads(invoke("--json", "split", "demo", "--gene-knowledge", unrelated).stdout)
    assert "pass a gene knowledge file that covers those genes" in still["warnings"][0]
    assert_user_error(invoke("split", "demo", "--gene-knowledge", "go"), "run `regina fetch go`")


def test_a_copied_dataset_folder_keeps_its_splits(demo):
    """`cp -r data/demo data/demo2`: the copy's splits load under the new name (its content and
    hash are the dataset's), while a split copied under another split's name is still refused."""
    split_dataset("demo", mode="simulation", seed=1)
    split_dataset("demo", mode="simulation", seed=2)
    shutil.copytree(keys.dataset_dir("demo"), keys.dataset_dir("demo2"))
    assert load_split("demo2", "simulation_1").test == load_split("demo", "simulation_1").test
    copied = keys.split_file("demo2", "simulation_1")
    copied.write_text(keys.split_file("demo2", "simulation_2").read_text())
    with pytest.raises(ReginaError, match="holds split simulation_2, not simulation_1"):
        load_split("demo2", "simulation_1")
