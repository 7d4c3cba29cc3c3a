"""`exaone download` against a real huggingface_hub client talking to a small hub served on 127.0.0.1,
plus local and git imports. No traffic leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from conftest import add_tokenizer, exaone3_checkpoint
from safetensors.torch import load_file

from exaone.cli.app import main
from exaone.core.errors import ExaoneError
from exaone.core.hub import download as dl
from exaone.core.io import manifest as mf
from exaone.core.io.verify import check_tensors, verify_checkpoint
from tests.test_exaone_moe import ref, write_fused, write_per_expert  # noqa: F401  (ref: a fixture)

REPO = "LGAI-EXAONE/tiny"
GATED = "LGAI-EXAONE/gated"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_secret_do_not_write_me"


class FakeHub:
    """The endpoints huggingface_hub uses: model info, tree listing, and resolve (HEAD + ranged GET)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)  # what the repo lists and advertises
        self.bodies: dict[str, bytes] = {}  # what a GET actually serves, when it differs
        self.cut_once: set[str] = set()  # first GET: half the bytes, then the connection drops
        self.deny: set[str] = set()  # GET answers 403
        self.log: list[tuple[str, str, dict]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.handle(self, head=True)

            def do_GET(self):
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, name: str) -> list[dict]:
        return [h for m, p, h in self.log if m == "GET" and p.endswith(f"/resolve/{COMMIT}/{name}")]

    def entry(self, name: str) -> dict:
        data = self.files[name]
        e = {"size": len(data), "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(".safetensors"):  # served as an LFS file: its etag is the sha256
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return e

    def handle(self, req: BaseHTTPRequestHandler, head: bool):
        path = unquote(urlsplit(req.path).path)
        self.log.append(("HEAD" if head else "GET", path, {k.lower(): v for k, v in req.headers.items()}))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            if repo == GATED:
                return self.send(req, 401, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"}, head)
            if repo != REPO:
                return self.send(
                    req, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head
                )
            if rest[:1] == ["tree"]:
                listing = [{"type": "file", "path": n, **self.entry(n)} for n in self.files]
                return self.send(req, 200, json.dumps(listing).encode(), {}, head)
            siblings = []
            for n in self.files:
                e = self.entry(n)
                lfs = e.get("lfs") and {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
                siblings.append({"rfilename": n, "size": e["size"], "blobId": e["oid"], "lfs": lfs})
            info = {"id": REPO, "sha": COMMIT, "siblings": siblings}
            return self.send(req, 200, json.dumps(info).encode(), {}, head)
        if "/".join(parts[:2]) != REPO or parts[2:3] != ["resolve"]:
            return self.send(req, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
        name = "/".join(parts[4:])
        if name not in self.files:
            return self.send(req, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
        e = self.entry(name)
        headers = {"ETag": f'"{e["lfs"]["oid"] if "lfs" in e else e["oid"]}"', "X-Repo-Commit": COMMIT}
        headers["Accept-Ranges"] = "bytes"
        if head:  # advertises the listed size, whatever a GET then serves
            return self.send(req, 200, b"", {**headers, "Content-Length": str(e["size"])}, head=True)
        if name in self.deny:
            return self.send(req, 403, b'{"error": "denied"}', {}, head)
        body = self.bodies.get(name, self.files[name])
        start = int(req.headers["Range"].split("=")[1].split("-")[0]) if "Range" in req.headers else 0
        status = 206 if start else 200
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if name in self.cut_once:
            self.cut_once.discard(name)
            req.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body) - start)}.items():
                req.send_header(k, v)
            req.end_headers()
            req.wfile.write(body[start : start + (len(body) - start) // 2])
            req.wfile.flush()
            req.close_connection = True
            req.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send(req, status, body[start:], headers, head)

    @staticmethod
    def send(req, status: int, body: bytes, headers: dict, head: bool):
        req.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            req.send_header(k, v)
        req.end_headers()
        if not head:
            req.wfile.write(body)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tiny tied EXAONE-3 model over the real EXAONE-3.5 tokenizer (vocab sized so `run` works)."""
    directory = tmp_path_factory.mktemp("src") / "tiny"
    exaone3_checkpoint(directory, tie=True, vocab_size=102400)
    add_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """The same with a 256-token vocabulary: for imports and clones, where size costs time."""
    directory = tmp_path_factory.mktemp("small") / "small"
    exaone3_checkpoint(directory, tie=True)
    add_tokenizer(directory)
    return directory


@pytest.fixture
def hub(checkpoint, tmp_path, monkeypatch):
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    files["README.md"] = b"# tiny\n"
    files["original/consolidated.pth"] = b"not for us" * 10
    h = FakeHub(files)
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    yield h
    h.server.shutdown()


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: ")
    return err[-1]


def test_full_download_verifies_writes_manifest_and_second_run_does_nothing(hub, monkeypatch, capsys):
    out = Path("hf_models/tiny")
    argv = ["download", REPO, "--exclude", "original/*", "--token", TOKEN]
    monkeypatch.setattr(sys, "argv", ["exaone", *argv])  # the command line the manifest records
    assert main(argv) == 0
    assert "tensors verified; manifest written" in capsys.readouterr().out
    m = mf.read_manifest(out)
    assert m.kind == "hf" and m.model.family == "exaone3" and m.model.source == REPO
    assert m.extra["commit"] == COMMIT and m.producer.arguments["exclude"] == ["original/*"]
    listed = {f.path: f.sha256 for f in m.files}
    assert listed["model.safetensors"] == hashlib.sha256(hub.files["model.safetensors"]).hexdigest()
    assert set(listed) == set(hub.files) - {"original/consolidated.pth"}
    mf.verify(out, m, deep=True)
    assert not Path("hf_models/.tiny.partial").exists() and not (out / ".cache").exists()
    # the token went to the hub, and nowhere else
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.log)
    for path in Path(".").rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    assert "--token ***" in m.producer.command

    requests = len(hub.log)
    assert main(["download", REPO, "--exclude", "original/*"]) == 0
    assert "nothing to do" in capsys.readouterr().out and len(hub.log) == requests
    # ... and `exaone run` takes the directory, label from the manifest
    assert main(["run", str(out), "--input_text", "Hi", "--max_output_len", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["output_tokens"] == 2


def test_cut_transfer_resumes_with_a_range_request(hub):
    hub.cut_once.add("model.safetensors")
    assert main(["download", "LGAI-EXAONE/tiny", "--local_dir", "out"]) == 0
    first, second = hub.gets("model.safetensors")
    assert "range" not in first and second["range"].startswith("bytes=")
    assert int(second["range"].split("=")[1].rstrip("-")) > 0
    assert Path("out/model.safetensors").read_bytes() == hub.files["model.safetensors"]


def test_interrupted_run_keeps_finished_files_and_resumes(hub, capsys):
    hub.deny.add("vocab.json")
    assert main(["download", REPO, "--exclude", "original/*"]) == 2
    assert "access denied" in error_line(capsys)
    assert not Path("hf_models/tiny").exists()  # nothing that looks complete
    hub.deny.clear()
    assert main(["download", REPO, "--exclude", "original/*"]) == 0
    assert len(hub.gets("config.json")) == 1 and len(hub.gets("vocab.json")) == 2
    assert mf.read_manifest("hf_models/tiny") is not None


def test_missing_repository_is_one_line(hub, capsys):
    assert main(["download", "LGAI-EXAONE/nope"]) == 2
    assert "LGAI-EXAONE/nope: repository not found" in error_line(capsys)
    assert main(["download", GATED]) == 2
    assert "gated repository" in error_line(capsys)


def test_content_that_does_not_match_the_advertised_size(hub, capsys):
    hub.bodies["model.safetensors"] = hub.files["model.safetensors"][:-100]
    assert main(["download", REPO]) == 2
    line = error_line(capsys)
    assert "download failed" in line and "size" in line.lower()
    assert not Path("hf_models/tiny").exists()


def test_content_that_does_not_match_the_advertised_hash(hub, capsys):
    data = bytearray(hub.files["model.safetensors"])
    data[-1] ^= 0xFF
    hub.bodies["model.safetensors"] = bytes(data)
    assert main(["download", REPO]) == 2
    assert "model.safetensors: sha256 differs from the hub's" in error_line(capsys)
    assert not Path("hf_models/.tiny.partial/model.safetensors").exists()  # refetched next time
    del hub.bodies["model.safetensors"]
    assert main(["download", REPO]) == 0


def test_include_and_exclude_patterns(hub, capsys):
    assert main(["download", REPO, "--exclude", "*.md", "--exclude", "original/*"]) == 0
    got = {f.path for f in mf.read_manifest("hf_models/tiny").files}
    assert "README.md" not in got and "original/consolidated.pth" not in got and "config.json" in got
    assert not hub.gets("README.md") and not hub.gets("original/consolidated.pth")
    capsys.readouterr()
    # keeping only the json files leaves no weights: verification says so
    assert main(["download", REPO, "--include", "*.json", "--local-dir", "json_only"]) == 2
    assert "no model.safetensors" in error_line(capsys)
    assert not hub.gets("vocab.txt") and len(hub.gets("model.safetensors")) == 1


def test_offline_fails_fast_with_a_way_out(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "h"))
    env.pop("HF_TOKEN", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "exaone.cli.app", "download", "exaone-4.0-1.2b"],
        env=env, cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert time.monotonic() - start < 10
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot reach the Hugging Face Hub" in proc.stderr
    assert "exaone download /path/to/local/copy" in proc.stderr


def test_silent_hub_times_out_and_offline_mode(hub, monkeypatch, capsys):
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(dl, "HUB_TIMEOUT", 1.0)
        start = time.monotonic()
        assert main(["download", REPO]) == 2
        assert time.monotonic() - start < 10
        assert "cannot reach the Hugging Face Hub" in error_line(capsys)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["download", REPO]) == 2
    assert "HF_HUB_OFFLINE is set" in error_line(capsys)


def test_import_local_copy_and_verify_in_place(small, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "mine"
    shutil.copytree(small, src)
    assert main(["download", str(src)]) == 0
    m = mf.read_manifest("hf_models/mine")
    assert m.model.source == str(src.resolve()) and not (src / mf.MANIFEST_NAME).exists()
    assert main(["download", str(src)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # --local_dir the same path: verified where it is, manifest added there
    assert main(["download", str(src), "--local_dir", str(src)]) == 0
    assert mf.read_manifest(src).files == m.files
    (src / "model.safetensors").write_bytes(b"\0" * 16)
    assert main(["download", str(src), "--local_dir", str(src)]) == 2
    assert "model.safetensors" in error_line(capsys)


def test_import_refuses_wrong_shapes(small, tmp_path, capsys):
    src = tmp_path / "bad"
    shutil.copytree(small, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    assert main(["download", str(src), "--local_dir", str(tmp_path / "out")]) == 2
    assert "has shape [96, 64], expected [128, 64]" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args],
        cwd=cwd, check=True, capture_output=True,
    )  # fmt: skip


def test_git_clone_of_a_local_repository(small, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "EXAONE-tiny"
    shutil.copytree(small, repo)
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "tiny", cwd=repo)
    assert main(["download", f"file://{repo}"]) == 0
    out = Path("hf_models/EXAONE-tiny")
    m = mf.read_manifest(out)
    assert len(m.extra["commit"]) == 40 and not (out / ".git").exists()
    assert {f.path for f in m.files} == {p.name for p in small.iterdir()}
    assert main(["download", f"file://{repo}", "--revision", "no-such-branch", "--local_dir", "x"]) == 2
    assert "git clone" in error_line(capsys)


def test_git_lfs_pointers_are_reported(small, tmp_path, capsys):
    repo = tmp_path / "lfs"
    shutil.copytree(small, repo)
    oid = hashlib.sha256((repo / "model.safetensors").read_bytes()).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize 123\n"
    (repo / "model.safetensors").write_text(pointer)
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-qm", "pointers", cwd=repo)
    assert main(["download", f"file://{repo}", "--local_dir", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert "unresolved git-lfs pointers" in line and "model.safetensors" in line and "git lfs pull" in line
    assert not (tmp_path / "out").exists()


def test_list_shows_releases_with_memory(capsys):
    assert main(["download", "--list", "--json"]) == 0
    rows = {r["repo"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["LGAI-EXAONE/EXAONE-4.0-1.2B"]["weights_gb"] == {"bf16": 2.6, "fp8": 1.3, "int4": 0.6}
    assert rows["LGAI-EXAONE/K-EXAONE-236B-A23B"]["family"] == "exaone_moe"
    assert rows["LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct-AWQ"]["format"] == "awq"
    assert main(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert "exaone-deep-32b" in out and "weights only" in out
    assert dl.find_release("EXAONE-3.5-2.4B-Instruct").repo == "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct"


def test_token_and_url_credentials_are_redacted():
    cmd = "exaone download X --token hf_abc --local_dir d --token=hf_def https://u:pw@host/r.git"
    safe = dl.redact_command(cmd)
    assert "hf_abc" not in safe and "hf_def" not in safe and "pw" not in safe and "--local_dir d" in safe


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_verify_accepts_both_k_exaone_expert_layouts(ref, layout, tmp_path):  # noqa: F811
    if layout == "fused":
        write_fused(ref, tmp_path)
    else:
        write_per_expert(ref, tmp_path, mtp=True)
    count, _ = check_tensors(tmp_path)
    assert count == len(load_file(tmp_path / "model.safetensors"))


def test_check_tensors_counts(checkpoint):
    count, quant = check_tensors(checkpoint)
    assert quant is None and count == verify_checkpoint(checkpoint).tensors > 0
    with pytest.raises(ExaoneError, match="not a directory"):
        verify_checkpoint(checkpoint / "nope")
