"""`regina fetch` downloads against a real HTTP server on 127.0.0.1 (GEARS' servers are unreachable
here): good zip, resumed download, truncated transfer, corrupt zip, HTML page, 403, and a data
file changed after it was verified."""

from __future__ import annotations

import hashlib
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli_helpers import invoke
from regina_cli import keys
from regina_cli.data import download as download_module
from regina_cli.data.dataset import checksum_file, read_dataset, write_dataset
from regina_cli.data.demo import simulate_screen
from regina_cli.data.fetch import DOWNLOADS_DIR, fetch
from regina_cli.errors import ReginaError

HTML_PAGE = b"<!DOCTYPE html><html><body>Access denied, please log in</body></html>"


@pytest.fixture(scope="module")
def gears_zip(tmp_path_factory) -> bytes:
    """A zip laid out like GEARS' Dataverse files: `<name>/perturb_processed.h5ad` plus extras."""
    folder = tmp_path_factory.mktemp("gears")
    adata = simulate_screen(n_cells=500, n_genes=200, n_singles=6, n_doubles=3, seed=3)
    h5ad, _ = write_dataset(adata, "norman", folder)
    archive = folder / "norman.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(h5ad, "norman/perturb_processed.h5ad")
        zf.writestr("norman/go.csv", "source,target\n")
    return archive.read_bytes()


class Server:
    """Serves fixed routes; records the Range header of every request."""

    def __init__(self, routes: dict):
        self.routes, self.ranges = routes, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                kind, body = server.routes.get(self.path, ("missing", b""))
                if kind == "forbidden":
                    self.send_error(403)
                elif kind == "missing":
                    self.send_error(404)
                elif kind == "html":
                    self._send(200, body, "text/html; charset=utf-8")
                elif kind == "no_ranges":  # a server that ignores Range: always the whole file
                    self._send(200, body)
                elif kind == "truncated":  # announces the full length, sends half, hangs up
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                else:
                    self._send_ranged(body)

            def _send(self, status, body, content_type="application/octet-stream", extra=()):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in extra:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _send_ranged(self, body):
                requested = self.headers.get("Range")
                if requested:
                    start = int(requested.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    content_range = ("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    self._send(206, body[start:], extra=[content_range])
                else:
                    self._send(200, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(gears_zip):
    corrupt = bytearray(gears_zip)
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 64] = b"\0" * 64  # damaged inside, same length
    srv = Server(
        {
            "/norman.zip": ("file", gears_zip),
            "/truncated.zip": ("truncated", gears_zip),
            "/corrupt.zip": ("file", bytes(corrupt)),
            "/error.html": ("html", HTML_PAGE),
            "/busy": ("html", b"Service unavailable: please try again later"),  # no markup to sniff
            "/page.bin": ("file", HTML_PAGE),
            "/forbidden.zip": ("forbidden", b""),
            "/no_ranges.zip": ("no_ranges", gears_zip),
        }
    )
    yield srv
    srv.close()


def nothing_complete(name: str) -> bool:
    """Neither the data file nor its checksum exist (a .part may stay behind for resuming)."""
    data_file = keys.dataset_file(name)
    return not data_file.exists() and not checksum_file(data_file).exists()


def test_named_dataset_downloads_from_gears_address(server, monkeypatch):
    monkeypatch.setitem(download_module.GEARS_URLS, "norman", f"{server.url}/norman.zip")
    lines = []
    result = fetch("norman", log=lines.append, progress=False)
    assert result.action == "downloaded" and result.n_singles == 6 and result.n_doubles == 3
    assert any("100%" in line for line in lines)  # plain progress lines off a terminal
    data_file = keys.dataset_file("norman")
    recorded = checksum_file(data_file).read_text().split()[0]
    assert recorded == hashlib.sha256(data_file.read_bytes()).hexdigest() == result.sha256
    adata = read_dataset("norman")
    assert adata.uns[keys.UNS_REGINA]["kept_gears_fields"]
    backed = read_dataset("norman", backed=True)
    assert backed.isbacked and backed.shape == adata.shape
    backed.file.close()
    assert not (keys.data_root() / DOWNLOADS_DIR).exists()  # archive removed after import
    # Re-running is a no-op (no request), --force fetches again.
    before = len(server.ranges)
    assert fetch("norman", log=lines.append, progress=False).action == "already present"
    assert len(server.ranges) == before
    assert fetch("norman", force=True, log=lines.append, progress=False).action == "downloaded"


def test_resumes_from_partial_file(server, gears_zip):
    part = keys.data_root() / DOWNLOADS_DIR / "resumed.download.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(gears_zip[:1000])
    lines = []
    fetch("resumed", source=f"{server.url}/norman.zip", log=lines.append, progress=False)
    assert server.ranges[-1] == "bytes=1000-"
    assert any("resuming" in line for line in lines)
    assert read_dataset("resumed").n_obs == 500
    assert not part.exists()


def test_a_server_that_ignores_the_resume_request_gives_the_whole_file_once(server, gears_zip, tmp_path):
    """A server answering a Range request with 200 and the whole file: the download starts again
    from the first byte, not with the whole file appended to the part already there (a file
    of the announced length that is not the file)."""
    dest = tmp_path / "whole.zip"
    part = tmp_path / "whole.zip.part"
    part.write_bytes(gears_zip[:1000])
    lines = []
    download_module.download(f"{server.url}/no_ranges.zip", dest, log=lines.append, progress=False)
    assert server.ranges[-1] == "bytes=1000-"
    assert any("ignored the resume request" in line for line in lines)
    assert dest.read_bytes() == gears_zip and not part.exists()


def test_a_part_longer_than_the_servers_file_is_started_again(server, gears_zip, tmp_path):
    """A `.part` left by another file under the same name, longer than the server's: its resume
    request is refused with 416, and the download starts again from the first byte."""
    dest = tmp_path / "other.zip"
    part = tmp_path / "other.zip.part"
    part.write_bytes(b"x" * (len(gears_zip) + 10))
    download_module.download(f"{server.url}/norman.zip", dest, log=lambda _: None, progress=False)
    assert server.ranges[-2:] == [f"bytes={len(gears_zip) + 10}-", None]
    assert dest.read_bytes() == gears_zip and not part.exists()


def test_truncated_transfer_keeps_only_the_part_and_resumes(server):
    url = f"{server.url}/truncated.zip"
    with pytest.raises(ReginaError, match="incomplete|broke off"):
        fetch("cut", source=url, progress=False)
    assert nothing_complete("cut")
    assert (keys.data_root() / DOWNLOADS_DIR / "cut.download.part").stat().st_size > 0
    # The same command resumes (the server now honours Range for this path).
    server.routes["/truncated.zip"] = ("file", server.routes["/norman.zip"][1])
    fetch("cut", source=url, progress=False)
    assert server.ranges[-1].startswith("bytes=")
    assert read_dataset("cut").n_obs == 500


@pytest.mark.parametrize(
    "path, message",
    [
        ("/corrupt.zip", "not a valid zip|corrupt"),
        ("/error.html", "web page"),
        ("/busy", "web page"),
        ("/page.bin", "web page"),
        ("/forbidden.zip", "HTTP 403"),
        ("/nowhere.zip", "HTTP 404"),
    ],
)
def test_bad_downloads_are_refused_and_leave_nothing(server, path, message):
    with pytest.raises(ReginaError, match=message):
        fetch("bad", source=f"{server.url}{path}", progress=False)
    assert nothing_complete("bad")
    downloads = keys.data_root() / DOWNLOADS_DIR
    assert not downloads.exists() or not any(downloads.iterdir())


def test_unreachable_server_is_one_line_error():
    result = invoke("fetch", "x", "--from", "http://127.0.0.1:9/none.zip")
    assert result.exit_code != 0
    assert "cannot reach" in result.output and "Traceback" not in result.output
    assert nothing_complete("x")


def test_file_changed_after_verification_is_refused(server):
    fetch("changed", source=f"{server.url}/norman.zip", progress=False)
    data_file = keys.dataset_file("changed")
    raw = bytearray(data_file.read_bytes())
    raw[-100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ReginaError, match="changed after it was verified"):
        read_dataset("changed")
    result = invoke("fetch", "changed")  # the no-op re-check catches it too
    assert result.exit_code != 0 and "--force" in result.output
    checksum_file(data_file).unlink()
    with pytest.raises(ReginaError, match="no recorded checksum"):
        read_dataset("changed")


# --- `regina fetch go`: GEARS' gene2go pickle -----------------------------------------------------

GENE2GO = {"TP53": {"GO:0006915", "GO:0006977"}, "MYC": {"GO:0006915"}, "KLF1": {"GO:0030218"}}


@pytest.fixture
def go_server(monkeypatch):
    import pickle

    body = pickle.dumps(GENE2GO, protocol=3)
    srv = Server({"/gene2go": ("file", body), "/cut": ("truncated", body), "/page": ("html", HTML_PAGE),
                  "/plain": ("file", HTML_PAGE)})
    monkeypatch.setattr(download_module, "GO_URL", f"{srv.url}/gene2go")
    monkeypatch.setattr("regina_cli.data.fetch.GO_URL", f"{srv.url}/gene2go")
    yield srv
    srv.close()


def test_fetch_go_downloads_verifies_and_is_a_no_op_after(go_server):
    from regina_cli.data.knowledge import resolve_knowledge

    result = invoke("--json", "fetch", "go")
    assert result.exit_code == 0, result.output
    assert '"action": "downloaded"' in result.output and '"n_genes": 3' in result.output
    path = keys.go_file()
    assert path.parent == keys.data_root() / keys.GO_DIR
    assert checksum_file(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    knowledge = resolve_knowledge("go")
    assert dict(zip(knowledge.genes, knowledge.terms)) == GENE2GO
    assert not (keys.data_root() / DOWNLOADS_DIR).exists()
    before = len(go_server.ranges)
    again = invoke("--json", "fetch", "go")
    assert '"action": "already present"' in again.output and len(go_server.ranges) == before
    path.write_bytes(path.read_bytes() + b"x")
    assert "changed after it was verified" in invoke("fetch", "go").output
    assert invoke("fetch", "go", "--force").exit_code == 0


def test_fetch_go_truncated_keeps_part_then_resumes(go_server):
    url = f"{go_server.url}/cut"
    result = invoke("fetch", "go", "--from", url)
    assert result.exit_code == 2 and ("incomplete" in result.output or "broke off" in result.output)
    assert not keys.go_file().exists()
    assert (keys.data_root() / DOWNLOADS_DIR / "go.download.part").stat().st_size > 0
    go_server.routes["/cut"] = go_server.routes["/gene2go"]
    assert invoke("fetch", "go", "--from", url).exit_code == 0
    assert go_server.ranges[-1].startswith("bytes=") and keys.go_file().is_file()


@pytest.mark.parametrize("route, message", [("/page", "web page"), ("/plain", "web page")])
def test_fetch_go_refuses_html(go_server, route, message):
    result = invoke("fetch", "go", "--from", f"{go_server.url}{route}")
    assert result.exit_code == 2 and message in result.output
    assert not keys.go_file().exists() and not (keys.data_root() / DOWNLOADS_DIR).exists()


def test_fetch_go_offline_copy_and_refusals(tmp_path):
    import os
    import pickle

    folder = tmp_path / "gears_data"
    folder.mkdir()
    (folder / "gene2go.pkl").write_bytes(pickle.dumps(GENE2GO))
    result = invoke("--json", "fetch", "go", "--from", folder)
    assert result.exit_code == 0 and '"action": "imported"' in result.output
    assert keys.go_file().read_bytes() == (folder / "gene2go.pkl").read_bytes()
    terms = tmp_path / "terms.tsv"
    terms.write_text("TP53\tGO:1\n")
    refused = invoke("fetch", "go", "--force", "--from", terms)
    assert refused.exit_code == 2 and "not GEARS' gene2go pickle" in refused.output

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'owned'}",))

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"TP53": Exploit()}))
    assert "refused unread" in invoke("fetch", "go", "--force", "--from", evil).output
    assert not (tmp_path / "owned").exists()
    assert keys.go_file().read_bytes() == (folder / "gene2go.pkl").read_bytes()  # old copy kept
    assert "takes only --from" in invoke("fetch", "go", "--cells", "10").output


def test_download_refuses_a_disk_too_small_before_writing(server, monkeypatch):
    from types import SimpleNamespace

    import regina_cli.io as io_mod

    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda path: SimpleNamespace(total=1, used=1, free=1000))
    with pytest.raises(ReginaError, match=r"cannot write .*norman\.download\.part: it needs about"):
        fetch("norman", source=f"{server.url}/norman.zip", log=lambda line: None, progress=False)
    assert nothing_complete("norman") and not list(keys.data_root().rglob("*.part"))
