"""Gene knowledge: what is known about a gene without measuring it in this screen.

Why: screens measure a few hundred genes but target many they do not measure, and a model can
give such a target a prompt only if something outside the screen says what the gene is like.
Two kinds of prior knowledge are read, both keyed by gene symbol:

* embedding: one vector per gene (GenePT, scGPT, ESM, co-expression loadings...), used as is;
* annotation: a set of terms per gene (GO), turned into similarities to anchor genes, the GO-graph
  weighting GEARS uses (Jaccard index of term sets, the 20 most similar anchors kept per gene,
  each row summing to 1), so a map learned on the anchors transfers by similarity.

Readers: CSV/TSV (first column gene, then numbers; or two columns gene, term), GAF 2.x, Parquet,
NPZ (`genes` + `vectors`/`embeddings`), and pickled dicts (GEARS' gene2go: gene -> GO terms;
GenePT: gene -> vector), unpickled without running code (`regina_cli.data.safe_pickle`). Text
files may be gzipped. Symbols match exactly, else case-insensitively. `predictability` says which
conditions a model can predict at all.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from regina_cli import keys
from regina_cli.data.conditions import condition_genes, parse_condition
from regina_cli.data.safe_pickle import is_pickle, safe_loads
from regina_cli.errors import ReginaError

EMBEDDING, ANNOTATION = "embedding", "annotation"
TOP_K = 20  # anchors kept per gene: GEARS' num_similar_genes_go_graph
GO_SPEC = "go"  # `--gene-knowledge go`: the file `regina fetch go` wrote
HEADER_NAMES = {"", "gene", "genes", "symbol", "gene_symbol", "gene_name", "gene_id", "name", "id"}
_GZIP, _ZIP, _PARQUET = b"\x1f\x8b", b"PK\x03\x04", b"PAR1"


@dataclass
class GeneKnowledge:
    """Vectors (embedding) or term sets (annotation) for `genes`; see the module docstring."""

    source: str  # what was read (path), for provenance
    kind: str  # EMBEDDING or ANNOTATION
    genes: list[str]
    table: np.ndarray | None = field(default=None, repr=False)  # embedding: [genes, d] float32
    terms: list[frozenset] | None = field(default=None, repr=False)  # annotation: one set per gene
    digest: str = field(default="", repr=False)  # SHA-256 of the bytes read

    def __post_init__(self):
        self._index = {g: i for i, g in enumerate(self.genes)}
        folded = Counter(g.lower() for g in self.genes)
        self._folded = {g.lower(): i for i, g in enumerate(self.genes) if folded[g.lower()] == 1}

    def _row(self, gene: str) -> int | None:
        row = self._index.get(gene)
        return self._folded.get(str(gene).lower()) if row is None else row

    def knows(self, gene: str) -> bool:
        return self._row(gene) is not None

    def sha256(self) -> str:
        return self.digest

    def vectors(self, genes: Sequence[str], anchors: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """([len(genes), d] float32, bool mask of genes with a usable vector; other rows are 0).

        embedding: the table's rows (d = table width), anchors ignored. annotation: d =
        len(anchors); row g holds the Jaccard similarity of g's terms to each anchor's, the top
        TOP_K kept and the row normalised to sum 1; a known gene that shares no term with any
        anchor has nothing to mix, so its mask is False.
        """
        rows = [self._row(g) for g in genes]
        known = np.array([r is not None for r in rows], dtype=bool)
        if self.kind == EMBEDDING:
            out = np.zeros((len(genes), self.table.shape[1]), dtype=np.float32)
            out[known] = self.table[[r for r in rows if r is not None]]
            return out, known
        out = _top_k_rows(self._jaccard(rows, [self._row(a) for a in anchors]))
        return out, known & (out.sum(axis=1) > 0)

    def neighbours(self, genes: Sequence[str], anchors: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """([len(genes), len(anchors)] weights, bool mask): each gene's TOP_K most similar anchors,
        weights summing to 1 (annotation: Jaccard of term sets, as `vectors`; embedding: cosine
        similarity, positive ones only). A gene is never its own neighbour."""
        if self.kind == ANNOTATION:
            similarity = self._jaccard([self._row(g) for g in genes], [self._row(a) for a in anchors])
        else:
            x, known = self.vectors(genes)
            a, anchor_known = self.vectors(anchors)
            unit = lambda m: m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
            cosine = unit(x) @ unit(a).T
            similarity = np.where(cosine > 1e-6, cosine, 0.0) * known[:, None] * anchor_known[None, :]
        position = {a: j for j, a in enumerate(anchors)}
        for i, g in enumerate(genes):
            if g in position:
                similarity[i, position[g]] = 0.0
        weights = _top_k_rows(similarity)
        return weights, weights.sum(axis=1) > 0

    def _jaccard(self, rows: list[int | None], anchor_rows: list[int | None]) -> np.ndarray:
        """[len(rows), len(anchor_rows)] Jaccard index of the term sets (0 for unknown genes)."""
        import scipy.sparse as sp

        vocabulary: dict[str, int] = {}

        def incidence(indices):
            coords = [(i, vocabulary.setdefault(t, len(vocabulary)))
                      for i, r in enumerate(indices) if r is not None for t in self.terms[r]]
            i, j = np.array(coords, dtype=np.int64).reshape(-1, 2).T
            return i, j

        gi, gj = incidence(rows)
        ai, aj = incidence(anchor_rows)
        shape_g, shape_a = (len(rows), len(vocabulary)), (len(anchor_rows), len(vocabulary))
        G = sp.csr_matrix((np.ones(len(gi), np.float32), (gi, gj)), shape=shape_g)
        A = sp.csr_matrix((np.ones(len(ai), np.float32), (ai, aj)), shape=shape_a)
        shared = (G @ A.T).toarray()
        union = np.asarray(G.sum(1)) + np.asarray(A.sum(1)).T - shared
        return np.divide(shared, union, out=np.zeros_like(shared), where=union > 0)


def _top_k_rows(similarity: np.ndarray) -> np.ndarray:
    """Each row's TOP_K largest similarities, normalised to sum 1 (rows of zeros stay zero), float32."""
    similarity = np.array(similarity, dtype=np.float32)
    if similarity.shape[1] > TOP_K:
        dropped = np.argpartition(-similarity, TOP_K, axis=1)[:, TOP_K:]
        np.put_along_axis(similarity, dropped, 0.0, axis=1)
    totals = similarity.sum(axis=1, keepdims=True)
    return np.divide(similarity, totals, out=np.zeros_like(similarity), where=totals > 0)


# --- Readers ---------------------------------------------------------------------------------------


def _fail(path: Path, problem: str) -> ReginaError:
    return ReginaError(f"gene knowledge file {path}: {problem}")


def _embedding(path: Path, digest: str, genes: Iterable, matrix) -> GeneKnowledge:
    genes = [str(g).strip() for g in genes]
    matrix = np.asarray(matrix)
    if not genes:
        raise _fail(path, "is empty (no gene rows)")
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.issubdtype(matrix.dtype, np.number):
        raise _fail(path, "has no numeric columns (expected gene, then one number per dimension)")
    if not np.isfinite(matrix).all():
        bad = genes[int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])]
        raise _fail(path, f"has NaN, missing or infinite values (first in gene {bad!r})")
    duplicated = pd.Index(genes).duplicated()
    if duplicated.any():
        raise _fail(path, f"lists gene {genes[int(np.flatnonzero(duplicated)[0])]!r} more than once")
    return GeneKnowledge(str(path), EMBEDDING, genes, table=matrix.astype(np.float32), digest=digest)


def _annotation(path: Path, digest: str, pairs: pd.DataFrame) -> GeneKnowledge:
    pairs = pairs.astype(str).apply(lambda column: column.str.strip())
    pairs = pairs[(pairs.iloc[:, 0] != "") & (pairs.iloc[:, 1] != "")]  # unannotated genes: unknown
    if pairs.empty:
        raise _fail(path, "is empty (no gene, term pairs)")
    grouped = pairs.groupby(pairs.columns[0], sort=True)[pairs.columns[1]].agg(frozenset)
    return GeneKnowledge(str(path), ANNOTATION, list(grouped.index), terms=list(grouped), digest=digest)


def _read_table(path: Path, digest: str, text: str) -> GeneKnowledge:
    """CSV/TSV: gene then numbers (embedding), or gene and term (annotation); header optional."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        df = pd.read_csv(io.StringIO(text), sep="\t" if "\t" in first else ",", header=None, dtype=str,
                         keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise _fail(path, "is empty") from None
    except pd.errors.ParserError as exc:
        raise _fail(path, f"is not a consistent CSV/TSV table ({str(exc).strip()})") from None
    if df.shape[1] < 2:
        raise _fail(path, "needs at least two columns: gene, then numbers (embedding) or a term (annotation)")
    numeric = df.iloc[:, 1:].apply(lambda column: pd.to_numeric(column.str.strip(), errors="coerce"))
    blank = df.iloc[:, 1:].apply(lambda column: column.str.strip().isin(["", "nan", "NaN", "NA"]))
    text = numeric.isna() & ~blank
    named_header = df.iat[0, 0].strip().lower() in HEADER_NAMES
    body = slice(1, None) if len(df) > 1 else slice(None)
    if df.shape[1] == 2 and numeric.iloc[body, 0].isna().all() and text.iloc[body, 0].any():
        return _annotation(path, digest, df.iloc[int(named_header):])
    start = int(named_header or bool(text.iloc[0].any()))
    if start >= len(df):
        raise _fail(path, "is empty (a header but no gene rows)")
    if text.iloc[start:].all(axis=None):
        raise _fail(path, "has no numeric columns (expected gene, then one number per dimension)")
    if text.iloc[start:].any(axis=None):
        row, col = np.argwhere(text.iloc[start:].to_numpy())[0]
        raise _fail(path, f"holds text {df.iat[row + start, col + 1]!r} where a number belongs")
    return _embedding(path, digest, df.iloc[start:, 0], numeric.iloc[start:].to_numpy(dtype=np.float64))


def _read_gaf(path: Path, digest: str, text: str) -> GeneKnowledge:
    """GAF 2.x: symbol in column 3, qualifier in 4 (NOT lines skipped), GO ID in 5."""
    pairs = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("!"):
            continue
        fields = line.split("\t")
        if len(fields) < 5:
            raise _fail(path, f"is not a GAF file (a line has {len(fields)} tab-separated columns, GAF has 15-17)")
        if "NOT" not in fields[3].split("|"):
            pairs.append((fields[2], fields[4]))
    return _annotation(path, digest, pd.DataFrame(pairs, columns=["gene", "term"]))


def _read_npz(path: Path, digest: str, raw: bytes) -> GeneKnowledge:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except ValueError as exc:
        raise _fail(path, f"cannot be read without unpickling objects ({exc}): store genes as a string array") from None
    except Exception as exc:  # zipfile and numpy raise several types for a damaged archive
        raise _fail(path, f"is not a readable NPZ archive ({exc.__class__.__name__})") from None
    vectors = arrays.get("vectors", arrays.get("embeddings"))
    if "genes" not in arrays or vectors is None:
        raise _fail(path, f"must hold arrays 'genes' and 'vectors' (or 'embeddings'); it has {', '.join(arrays) or 'none'}")
    if len(arrays["genes"]) != len(vectors):
        raise _fail(path, f"has {len(arrays['genes'])} genes but {len(vectors)} vectors")
    return _embedding(path, digest, arrays["genes"], vectors)


def _read_parquet(path: Path, digest: str) -> GeneKnowledge:
    try:
        df = pd.read_parquet(path)
    except ImportError:
        raise ReginaError(f"reading the Parquet file {path} needs pyarrow: pip install pyarrow") from None
    except Exception as exc:  # pyarrow raises its own types for damaged files
        raise _fail(path, f"is not a readable Parquet file ({exc.__class__.__name__})") from None
    if len(df.columns) and not pd.api.types.is_numeric_dtype(df.iloc[:, 0]):
        genes, values = df.iloc[:, 0], df.iloc[:, 1:]
    else:  # genes in the index, as `DataFrame.to_parquet` keeps it
        genes, values = df.index, df
    if not all(pd.api.types.is_numeric_dtype(values[c]) for c in values.columns):
        raise _fail(path, "has non-numeric columns besides the gene column")
    return _embedding(path, digest, genes, values.to_numpy(dtype=np.float64))


def _read_pickle(path: Path, digest: str, raw: bytes) -> GeneKnowledge:
    """A dict gene -> set of GO terms (GEARS' gene2go) or gene -> vector (GenePT's release)."""
    try:
        obj = safe_loads(raw)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise _fail(path, f"is not a plain data pickle, refused unread ({exc})") from None
    values = list(obj.values()) if isinstance(obj, dict) else []
    if values and all(isinstance(v, (set, frozenset, list, tuple)) and all(isinstance(t, str) for t in v)
                      for v in values):
        pairs = pd.DataFrame([(str(g), t) for g, terms in obj.items() for t in terms], columns=["gene", "term"])
        return _annotation(path, digest, pairs)
    try:
        vectors = np.array(values, dtype=np.float64) if values else None
    except (TypeError, ValueError):
        vectors = None
    if vectors is None or vectors.ndim != 2:
        raise _fail(path, "is a pickle but neither a dict gene -> set of GO terms (GEARS' gene2go) "
                          "nor a dict gene -> vector of equal length")
    return _embedding(path, digest, obj.keys(), vectors)


def load_gene_knowledge(path: str | Path) -> GeneKnowledge:
    """Read any supported knowledge file; the format is told by its content, not its name."""
    path = Path(path)
    if not path.is_file():
        raise ReginaError(f"gene knowledge file {path} not found: give a path, or `go` after `regina fetch go`")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if raw.startswith(_GZIP):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise _fail(path, f"is a damaged gzip file ({exc})") from None
    if is_pickle(raw):
        return _read_pickle(path, digest, raw)
    if raw.startswith(_ZIP):
        return _read_npz(path, digest, raw)
    if raw.startswith(_PARQUET):
        return _read_parquet(path, digest)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _fail(path, "has an unknown format (use CSV/TSV, GAF, Parquet, NPZ or a gene2go pickle)") from None
    if not text.strip():
        raise _fail(path, "is empty")
    if text.lstrip().startswith("!gaf-version") or ".gaf" in path.name.lower():
        return _read_gaf(path, digest, text)
    return _read_table(path, digest, text)


def resolve_knowledge(spec: str, data_dir=None) -> GeneKnowledge:
    """`spec` is a file path, or `go` for the GEARS GO annotation that `regina fetch go` stored."""
    if str(spec) == GO_SPEC:
        path = keys.go_file(data_dir)
        if not path.is_file():
            raise ReginaError(
                f"no GO annotation at {path}: run `regina fetch go` (or `regina fetch go --from FILE` offline)"
            )
        return load_gene_knowledge(path)
    return load_gene_knowledge(spec)


# --- Which conditions can be predicted at all -----------------------------------------------------


def predictability(
    conditions: Iterable[str],
    measured_genes: Iterable[str],
    train_conditions: Iterable[str],
    knowledge: GeneKnowledge | None = None,
) -> dict:
    """Count conditions whose targets a model has no prompt for.

    A target has a prompt when it is measured, perturbed in a training condition, or known to
    `knowledge` (for annotation: sharing a term with a measured or trained gene, the anchors).
    Returns {conditions, unmeasured, unpredictable (counts), unmeasured_conditions,
    unpredictable_conditions (sorted lists), unpredictable_genes}.
    """
    conditions = sorted({str(c) for c in conditions if parse_condition(c)})
    measured = set(map(str, measured_genes))
    trained = condition_genes(train_conditions)
    unmeasured = sorted(condition_genes(conditions) - measured)
    missing = [g for g in unmeasured if g not in trained]
    if knowledge is not None and missing:
        _, usable = knowledge.vectors(missing, anchors=sorted(measured | trained))
        missing = [g for g, ok in zip(missing, usable) if not ok]
    missing_set, unmeasured_set = set(missing), set(unmeasured)
    with_unmeasured = [c for c in conditions if unmeasured_set.intersection(parse_condition(c))]
    unpredictable = [c for c in with_unmeasured if missing_set.intersection(parse_condition(c))]
    return {
        "conditions": len(conditions),
        "unmeasured": len(with_unmeasured),
        "unpredictable": len(unpredictable),
        "unmeasured_conditions": with_unmeasured,
        "unpredictable_conditions": unpredictable,
        "unpredictable_genes": missing,
    }
