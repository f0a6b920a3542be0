"""Gene knowledge files: every reader on good and bad files, the GO-similarity weighting, the
restricted unpickler, `go` resolution, and which conditions are predictable."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from regina_cli import keys
from regina_cli.data.knowledge import (
    ANNOTATION,
    EMBEDDING,
    TOP_K,
    GeneKnowledge,
    load_gene_knowledge,
    predictability,
    resolve_knowledge,
)
from regina_cli.errors import ReginaError

GENES = ["TP53", "MYC", "KLF1"]
VECTORS = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.5, 0.0]])
TERMS = {"TP53": {"GO:1", "GO:2"}, "MYC": {"GO:2"}, "KLF1": {"GO:3"}}


def _embedding_files(folder) -> dict:
    frame = pd.DataFrame(VECTORS, index=pd.Index(GENES, name="gene"), columns=["d0", "d1", "d2"])
    paths = {name: folder / name for name in ("e.csv", "e.tsv", "e.csv.gz", "e.npz", "e.parquet", "noheader.txt")}
    frame.to_csv(paths["e.csv"])
    frame.to_csv(paths["e.tsv"], sep="\t")
    paths["e.csv.gz"].write_bytes(gzip.compress(paths["e.csv"].read_bytes()))
    np.savez(paths["e.npz"], genes=np.array(GENES), embeddings=VECTORS)
    paths["genept.pkl"] = folder / "genept.pkl"  # GenePT ships a dict gene -> list of floats
    paths["genept.pkl"].write_bytes(pickle.dumps({g: list(v) for g, v in zip(GENES, VECTORS)}))
    frame.reset_index().to_parquet(paths["e.parquet"])
    frame.to_csv(paths["noheader.txt"], sep="\t", header=False)
    return paths


def test_embedding_readers_agree(tmp_path):
    for name, path in _embedding_files(tmp_path).items():
        knowledge = load_gene_knowledge(path)
        assert knowledge.kind == EMBEDDING and knowledge.genes == GENES, name
        vectors, known = knowledge.vectors(["klf1", "TP53", "NOPE"], anchors=["MYC"])
        np.testing.assert_allclose(vectors, [VECTORS[2], VECTORS[0], [0, 0, 0]], err_msg=name)
        assert vectors.dtype == np.float32 and known.tolist() == [True, True, False]
        assert knowledge.sha256() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert knowledge.source == str(path) and knowledge.knows("myc") and not knowledge.knows("NOPE")


def _gaf_line(gene: str, term: str, qualifier: str = "") -> str:
    return "\t".join(["UniProtKB", f"P{gene}", gene, qualifier, term, "PMID:1", "IDA", "", "P", "", "", "protein",
                      "taxon:9606", "20200101", "UniProt"])


def _annotation_files(folder) -> dict:
    pairs = [(g, t) for g, terms in TERMS.items() for t in sorted(terms)]
    paths = {}
    paths["a.tsv"] = folder / "a.tsv"
    paths["a.tsv"].write_text("gene\tterm\n" + "".join(f"{g}\t{t}\n" for g, t in pairs) + "BRCA1\t\n")
    paths["a.csv.gz"] = folder / "a.csv.gz"
    paths["a.csv.gz"].write_bytes(gzip.compress("".join(f"{g},{t}\n" for g, t in pairs).encode()))
    paths["a.gaf"] = folder / "goa_human.gaf"
    lines = ["!gaf-version: 2.2", "!generated-by: test"] + [_gaf_line(g, t) for g, t in pairs]
    paths["a.gaf"].write_text("\n".join(lines + [_gaf_line("KLF1", "GO:9", "NOT|enables")]) + "\n")
    for protocol in (2, 4):
        paths[f"gene2go{protocol}.pkl"] = folder / f"gene2go{protocol}.pkl"
        paths[f"gene2go{protocol}.pkl"].write_bytes(pickle.dumps(TERMS, protocol=protocol))
    return paths


def test_annotation_readers_agree(tmp_path):
    for name, path in _annotation_files(tmp_path).items():
        knowledge = load_gene_knowledge(path)
        assert knowledge.kind == ANNOTATION, name
        assert dict(zip(knowledge.genes, knowledge.terms)) == TERMS, name  # NOT and empty lines skipped


def test_go_similarity_is_jaccard_top_k_rows_sum_to_one(tmp_path):
    knowledge = load_gene_knowledge(_annotation_files(tmp_path)["a.tsv"])
    vectors, usable = knowledge.vectors(["TP53", "MYC", "KLF1", "NOPE"], anchors=["TP53", "MYC"])
    # TP53 vs (TP53, MYC): Jaccard 1 and 1/2 -> 2/3, 1/3; MYC: 1/2 and 1 -> 1/3, 2/3.
    np.testing.assert_allclose(vectors[:2], [[2 / 3, 1 / 3], [1 / 3, 2 / 3]], rtol=1e-6)
    assert usable.tolist() == [True, True, False, False]  # KLF1 is known but shares no term
    assert not vectors[2:].any()

    anchors = [f"A{i}" for i in range(TOP_K + 10)]
    terms = {a: {f"T{j}" for j in range(i + 1)} for i, a in enumerate(anchors)}  # nested term sets
    terms["X"] = {f"T{j}" for j in range(TOP_K + 10)}
    path = tmp_path / "nested.pkl"
    path.write_bytes(pickle.dumps(terms))
    row, _ = load_gene_knowledge(path).vectors(["X"], anchors=anchors)
    jaccard = np.arange(1, TOP_K + 11) / (TOP_K + 10)
    expected = np.where(np.arange(TOP_K + 10) >= 10, jaccard, 0.0)  # the 20 most similar anchors
    np.testing.assert_allclose(row[0], expected / expected.sum(), rtol=1e-6)


def test_neighbours_never_include_the_gene_itself_and_work_for_both_kinds(tmp_path):
    go = load_gene_knowledge(_annotation_files(tmp_path)["a.tsv"])
    weights, usable = go.neighbours(["TP53", "MYC", "KLF1"], anchors=["TP53", "MYC", "KLF1"])
    # TP53's only other neighbour is MYC (GO:2), and MYC's is TP53; KLF1 shares no term
    np.testing.assert_allclose(weights, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert usable.tolist() == [True, True, False]

    embedding = load_gene_knowledge(_embedding_files(tmp_path)["e.csv"])
    weights, usable = embedding.neighbours(["TP53", "KLF1"], anchors=["TP53", "MYC"])
    # TP53: itself excluded, MYC (cosine 0.97) is all that is left; KLF1: negative cosine with MYC,
    # orthogonal to TP53, so no neighbour
    np.testing.assert_allclose(weights[0], [0.0, 1.0], atol=1e-6)
    assert usable.tolist() == [True, False] and not weights[1].any()


def test_an_embedding_header_of_any_names_is_read_as_a_header(tmp_path):
    """`DataFrame.to_csv` of an index without a name writes a header with an empty first cell;
    another tool writes `symbol` or `feature`: a first row holding text is the header, whatever
    it names the gene column."""
    for first in ("", "feature_id"):
        path = tmp_path / f"header_{first or 'empty'}.csv"
        pd.DataFrame(VECTORS, index=pd.Index(GENES, name=first or None), columns=["a", "b", "c"]).to_csv(path)
        knowledge = load_gene_knowledge(path)
        assert knowledge.kind == EMBEDDING and knowledge.genes == GENES
        np.testing.assert_allclose(knowledge.vectors(GENES)[0], VECTORS, rtol=1e-6)


def test_embedding_neighbours_are_the_positively_similar_anchors_only():
    """An anchor pointing away from a gene (negative cosine) is no neighbour: with it the weights
    would hold a negative share and the others more than all of it, and the prior would move the
    gene against that anchor's effect."""
    table = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.2]], dtype=np.float32)
    embedding = GeneKnowledge("test", EMBEDDING, ["X", "A", "B"], table=table)
    weights, usable = embedding.neighbours(["X"], anchors=["A", "B"])
    np.testing.assert_allclose(weights, [[1.0, 0.0]], atol=1e-6)
    assert usable.tolist() == [True]


def test_genes_are_found_whatever_their_case_unless_two_differ_only_in_case():
    """`myc` finds MYC; `abc` names neither ABC nor Abc when the file holds both, rather than
    whichever came last."""
    table = np.eye(3, dtype=np.float32)
    knowledge = GeneKnowledge("test", EMBEDDING, ["MYC", "ABC", "Abc"], table=table)
    assert knowledge.knows("myc") and knowledge.knows("ABC") and knowledge.knows("Abc")
    assert not knowledge.knows("abc")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_unrun(tmp_path):
    marker = tmp_path / "owned"
    path = tmp_path / "gene2go.pkl"
    path.write_bytes(pickle.dumps({"TP53": {"GO:1"}, "EVIL": _Exploit(marker)}))
    with pytest.raises(ReginaError, match="refused unread"):
        load_gene_knowledge(path)
    assert not marker.exists()


def _write(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("text.csv", "gene,a,b\nTP53,x,y\nMYC,z,w\n", "no numeric columns"),
        ("dup.csv", "gene,a\nTP53,1\nMYC,2\nTP53,3\n", "'TP53' more than once"),
        ("nan.tsv", "gene\ta\tb\nTP53\t1\t\nMYC\t2\t3\n", "NaN, missing or infinite values (first in gene 'TP53')"),
        ("mixed.csv", "gene,a\nTP53,1\nMYC,high\nKLF1,2\n", "holds text 'high'"),
        ("empty.csv", "", "is empty"),
        ("header.csv", "gene,a,b\n", "is empty"),
        ("one.csv", "TP53\nMYC\n", "at least two columns"),
        ("blob.bin", b"\x00\x01\xfe\xff\x10binary", "unknown format"),
        ("bad.gz", b"\x1f\x8b\x08\x00broken", "damaged gzip"),
        ("list.pkl", pickle.dumps(["TP53", "MYC"]), "neither a dict gene -> set of GO terms"),
        ("ragged.pkl", pickle.dumps({"TP53": [1.0, 2.0], "MYC": [1.0]}), "dict gene -> vector of equal length"),
        ("short.gaf", "!gaf-version: 2.2\nUniProtKB\tP1\tTP53\n", "not a GAF file"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(ReginaError, match="gene knowledge file") as error:
        load_gene_knowledge(path)
    assert message in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_npz_files(tmp_path):
    np.savez(tmp_path / "keys.npz", names=np.array(GENES), vectors=VECTORS)
    np.savez(tmp_path / "objects.npz", genes=np.array(GENES, dtype=object), vectors=VECTORS)
    np.savez(tmp_path / "lengths.npz", genes=np.array(GENES[:2]), vectors=VECTORS)
    for name, message in [("keys", "must hold arrays 'genes' and 'vectors'"), ("objects", "without unpickling"),
                          ("lengths", "2 genes but 3 vectors")]:
        with pytest.raises(ReginaError, match=message):
            load_gene_knowledge(tmp_path / f"{name}.npz")


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    path = _embedding_files(tmp_path)["e.parquet"]

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    with pytest.raises(ReginaError, match="needs pyarrow: pip install pyarrow"):
        load_gene_knowledge(path)


def test_resolve_go_and_paths(tmp_path):
    with pytest.raises(ReginaError, match="run `regina fetch go`"):
        resolve_knowledge("go")
    with pytest.raises(ReginaError, match="not found"):
        resolve_knowledge(str(tmp_path / "absent.tsv"))
    keys.go_file().parent.mkdir(parents=True)
    keys.go_file().write_bytes(pickle.dumps(TERMS))
    assert resolve_knowledge("go").genes == sorted(TERMS)
    assert resolve_knowledge(str(keys.go_file())).kind == ANNOTATION


def test_predictability_counts_what_has_no_prompt(tmp_path):
    conditions = ["ctrl", "A+ctrl", "U+ctrl", "T+ctrl", "K+ctrl", "A+U", "T+K"]
    train = ["ctrl", "A+ctrl", "T+ctrl"]
    measured = ["A", "B", "C"]
    plain = predictability(conditions, measured, train)
    assert plain["conditions"] == 6  # ctrl is no condition to predict
    assert plain["unmeasured_conditions"] == ["A+U", "K+ctrl", "T+K", "T+ctrl", "U+ctrl"]
    assert plain["unpredictable_conditions"] == ["A+U", "K+ctrl", "T+K", "U+ctrl"]  # T is trained
    assert plain["unpredictable_genes"] == ["K", "U"]
    path = tmp_path / "terms.tsv"
    path.write_text("U\tGO:1\nB\tGO:1\nK\tGO:7\n")  # U shares a term with measured B; K with nobody
    informed = predictability(conditions, measured, train, load_gene_knowledge(path))
    assert informed["unpredictable_conditions"] == ["K+ctrl", "T+K"] and informed["unpredictable"] == 2
    path.write_text("gene,x\nK,1.0\nU,2.0\n")
    assert predictability(conditions, measured, train, load_gene_knowledge(path))["unpredictable"] == 0


def test_training_warns_when_the_knowledge_names_no_gene_of_the_screen(tmp_path):
    """Ensembl IDs against symbols: the file reads fine and helps nothing; train-ae says so."""
    from regina_cli.config import build_config
    from regina_cli.data.split import Split
    from regina_cli.engine.train_ae import predictability_notes

    genes = ["A", "B", "C"]
    split = Split(dataset="tiny", mode="custom", seed=1, train_gene_frac=None, train=["ctrl", "A+ctrl"],
                  val=["B+ctrl"], test=["C+ctrl", "D+ctrl"], subgroups={})
    (tmp_path / "ensembl.tsv").write_text("ENSG0001\tGO:1\nENSG0002\tGO:1\n")
    (tmp_path / "symbols.tsv").write_text("D\tGO:1\nA\tGO:1\n")
    notes = {name: predictability_notes(split, genes, build_config(overrides=[f"model.gene_knowledge={tmp_path / name}"]),
                                        tmp_path) for name in ("ensembl.tsv", "symbols.tsv")}
    assert any("names none of the dataset's 3 genes nor its targets" in n for n in notes["ensembl.tsv"])
    assert not any("names none" in n for n in notes["symbols.tsv"])
