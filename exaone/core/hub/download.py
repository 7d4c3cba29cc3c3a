"""`exaone download`: fetch a checkpoint from the hub, clone it with git, or import a local copy;
verify it, and write its manifest.

Hub downloads go through huggingface_hub's `snapshot_download` into a hidden `.NAME.partial`
sibling that survives an interruption (finished files are not fetched again, a cut transfer
resumes with a Range request) and is renamed into place only once verified. Tokens are passed to
the client and git, and never written anywhere: not to the manifest, its command line, or logs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from exaone.core.errors import ExaoneError, OptionError, literal
from exaone.core.io import manifest as mf
from exaone.core.io.verify import Report, check_no_lfs_pointers, verify_checkpoint

HUB_TIMEOUT = 5.0  # seconds per hub request before we call the hub unreachable (offline: < 10 s)
DEFAULT_ROOT = Path("hf_models")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GIT_URL = re.compile(r"^(https?|ssh|git|file)://|^[\w.-]+@[\w.-]+:")


# --- released checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    repo: str
    family: str
    params_b: float  # billions, from the bf16 checkpoint sizes (bytes / 2)
    format: str = "base"  # base (bf16/fp32 safetensors) | awq | gptq | fp8 (pre-quantized) | gguf

    @property
    def name(self) -> str:
        return self.repo.split("/")[1]

    @property
    def short(self) -> str:
        return self.name.lower().replace("-instruct", "")

    def weights_gb(self, bytes_per_param: float) -> float:
        return self.params_b * bytes_per_param


def _releases() -> list[Release]:
    """LG AI Research's own repositories: the base checkpoints and the pre-quantized variants they
    published (found on huggingface.co/LGAI-EXAONE; none is listed without a source)."""
    out = []

    def add(name, family, params, *variants):
        out.append(Release(f"LGAI-EXAONE/{name}", family, params))
        out.extend(Release(f"LGAI-EXAONE/{name}-{v}", family, params, v.lower()) for v in variants)

    add("EXAONE-3.0-7.8B-Instruct", "exaone3", 7.82, "AWQ")
    for size, params in (("2.4B", 2.405), ("7.8B", 7.82), ("32B", 32.0)):
        add(f"EXAONE-3.5-{size}-Instruct", "exaone3", params, "AWQ", "GGUF")
    for size, params in (("2.4B", 2.405), ("7.8B", 7.82), ("32B", 32.0)):
        add(f"EXAONE-Deep-{size}", "exaone3", params, "AWQ", "GGUF")
    add("EXAONE-4.0-1.2B", "exaone4", 1.28, "FP8")
    add("EXAONE-4.0-32B", "exaone4", 32.0, "GPTQ")
    add("K-EXAONE-236B-A23B", "exaone_moe", 237.0)
    return out


RELEASES = _releases()
MEMORY_DTYPES = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}  # bytes per parameter


def find_release(name: str) -> Release | None:
    key = name.lower().removeprefix("lgai-exaone/")
    return next((r for r in RELEASES if key in (r.name.lower(), r.short)), None)


# --- the one entry point ---------------------------------------------------------------------


@dataclass
class Result:
    directory: Path
    source: str
    skipped: bool  # already complete and verified: nothing was done
    manifest: mf.Manifest
    report: Report | None = None


Say = Callable[[str], None]


def _stderr(msg: str):
    print(msg, file=sys.stderr, flush=True)


def download(
    source: str,
    local_dir: str | Path | None = None,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    token: str | None = None,
    force: bool = False,
    say: Say = _stderr,
    progress: bool | None = None,
) -> Result:
    """Fetch or import `source` (hub repo id or short name, git URL, or local directory) into
    local_dir, verify it and write its manifest. `progress`: rich bars (None: when stderr is a TTY)."""
    started = mf.now()
    include, exclude = sorted(include or []), sorted(exclude or [])
    kind, where = classify(source)
    if kind != "hub" and (include or exclude):
        option = "include" if include else "exclude"
        raise OptionError(option, include or exclude, template="{option} filters hub downloads only")
    if kind == "path" and revision:
        problem = "applies to hub downloads and git clones, not to a local directory"
        raise OptionError("revision", revision, problem, "{option} {problem}")
    name = (
        Path(urlsplit(where).path.rstrip("/")).name.removesuffix(".git")
        if kind == "git"
        else Path(where).resolve().name
    )
    final = Path(local_dir) if local_dir is not None else DEFAULT_ROOT / name
    arguments = {"source": _safe(where), "revision": revision, "include": include, "exclude": exclude}
    if kind == "path":
        arguments = {"source": str(Path(where).resolve())}
    if not force and mf.is_up_to_date(final, None, arguments):
        return Result(final, where, skipped=True, manifest=mf.read_manifest(final))
    if final.exists() and not force and not (kind == "path" and _same(final, where)):
        raise OptionError(
            "force",
            force,
            f"{final} exists and is not a verified download of {_safe(where)}",
            "{problem} (use {option} to replace it)",
        )
    if kind == "hub":
        return _from_hub(
            where, final, revision, include, exclude, token, force, say, progress, arguments, started
        )
    if kind == "git":
        return _from_git(where, final, revision, token, force, say, arguments, started)
    return _from_path(Path(where), final, force, say, arguments, started)


def classify(source: str) -> tuple[str, str]:
    """('hub', repo_id) | ('git', url) | ('path', directory)."""
    if GIT_URL.search(source) or source.endswith(".git"):
        return "git", source
    if Path(source).exists():
        if not Path(source).is_dir():
            raise ExaoneError(f"{source}: not a directory (expected a checkpoint directory to import)")
        return "path", source
    release = find_release(source)
    if release is not None:
        if release.format == "gguf":
            base = release.repo.removesuffix("-GGUF")
            raise ExaoneError(
                f"{release.repo} holds GGUF files for llama.cpp; exaone reads Hugging Face safetensors "
                f"checkpoints: download {base} instead"
            )
        return "hub", release.repo
    if REPO_ID.match(source) and not source.startswith((".", "/")):
        return "hub", source
    raise OptionError(
        "source",
        source,
        "not a local directory, git URL, hub repo id (ORG/NAME) or known short name "
        "(see `exaone download --list`)",
        "{value}: {problem}",
    )


# --- hub -------------------------------------------------------------------------------------


def hub_endpoint() -> str:
    # Read at call time: huggingface_hub freezes HF_ENDPOINT when it is first imported.
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


def _offline(endpoint: str, why: str) -> ExaoneError:
    return ExaoneError(
        f"cannot reach the Hugging Face Hub at {endpoint} ({why}); to use a copy you already have, "
        "import it instead: exaone download /path/to/local/copy"
    )


def _from_hub(repo_id, final, revision, include, exclude, token, force, say, progress, arguments, started):
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
        filter_repo_objects,
    )

    endpoint = hub_endpoint()
    if _offline_mode():
        raise _offline(endpoint, "HF_HUB_OFFLINE is set")
    api = HfApi(endpoint=endpoint, token=token or None)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=HUB_TIMEOUT)
    except Exception as e:
        raise _hub_error(e, repo_id, revision, endpoint) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    wanted = list(
        filter_repo_objects(siblings, allow_patterns=include or None, ignore_patterns=exclude or None)
    )
    if not wanted:
        template = f"{literal(repo_id)}: no file matches {{option}} {{value}} / exclude {literal(exclude)}"
        raise OptionError("include", include, template=template)
    sizes = {f: siblings[f].size or 0 for f in wanted}
    staging = final.with_name(f".{final.name}.partial")
    if force:
        shutil.rmtree(staging, ignore_errors=True)
    resumed = staging.is_dir()
    staging.mkdir(parents=True, exist_ok=True)
    say(
        f"downloading {repo_id}@{info.sha[:12]}: {len(wanted)} files, {_size(sum(sizes.values()))}"
        + (" (resuming)" if resumed else "")
    )
    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # we draw our own: one bar on a TTY, one line per file otherwise
    watcher = _Watcher(staging, sizes, say, sys.stderr.isatty() if progress is None else progress)
    try:
        watcher.start()
        snapshot_download(
            repo_id,
            revision=info.sha,  # pin the commit we listed, even if the branch moves meanwhile
            local_dir=staging,
            allow_patterns=include or None,
            ignore_patterns=exclude or None,
            token=token or None,
            endpoint=endpoint,
            force_download=force,
            etag_timeout=HUB_TIMEOUT,
        )
    except Exception as e:
        raise _hub_error(e, repo_id, revision, endpoint) from None
    finally:
        watcher.stop()
        if not quiet:
            enable_progress_bars()
    for entry in mf.list_files(staging, hashes=False):  # left by an earlier run with other patterns
        if entry.path not in sizes:
            (staging / entry.path).unlink()
    files = {e.path: e for e in mf.list_files(staging, hashes=True)}
    _check_against_hub(staging, repo_id, {f: siblings[f] for f in wanted}, files)
    report = _verify(staging, final, f"{repo_id} (partial download kept in {staging}; rerun to resume)")
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's resume metadata
    extra = {"revision": revision or "main", "commit": info.sha, "endpoint": endpoint}
    m = _manifest(staging, report, repo_id, arguments, started, extra, files=list(files.values()))
    with mf.atomic_output_dir(final, force=force) as tmp:
        os.replace(staging, tmp)  # tmp is an empty directory: rename replaces it
    return Result(final, repo_id, skipped=False, manifest=m, report=report)


def _check_against_hub(staging: Path, repo_id: str, expected: dict, files: dict):
    """Sizes and hashes the hub lists for each file: sha256 for LFS files, the git blob id otherwise.
    A bad file is deleted so that the next run fetches it again."""
    for path, sibling in expected.items():
        entry, local = files.get(path), staging / path
        if entry is None:
            raise ExaoneError(f"{repo_id}: {path} was not downloaded")
        problem = None
        if sibling.size is not None and entry.size != sibling.size:
            problem = f"{entry.size} bytes, the hub lists {sibling.size}"
        elif sibling.lfs is not None and entry.sha256 != sibling.lfs.sha256:
            problem = "sha256 differs from the hub's"
        elif sibling.lfs is None and sibling.blob_id and _git_blob_id(local) != sibling.blob_id:
            problem = "git blob id differs from the hub's"
        if problem:
            local.unlink(missing_ok=True)
            raise ExaoneError(
                f"{repo_id}: {path}: {problem} (corrupt transfer; removed, rerun to fetch it again)"
            )


def _git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hub_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> ExaoneError:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, ExaoneError):
        return e
    if isinstance(e, GatedRepoError):
        return OptionError(
            "token",
            None,
            f"{repo_id}: gated repository: accept its license at {endpoint}/{repo_id}",
            "{problem}, then pass {option} (or set HF_TOKEN, or run `hf auth login`)",
        )
    if isinstance(e, RepositoryNotFoundError):
        return OptionError(
            "source",
            repo_id,
            f"repository not found at {endpoint} (check the name, see `exaone download --list`; "
            "a private repository needs a token)",
            f"{literal(repo_id)}: {{problem}}",
        )
    if isinstance(e, RevisionNotFoundError):
        return ExaoneError(f"{repo_id}: revision {revision!r} not found")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            return ExaoneError(
                f"{repo_id}: access denied (HTTP {status}): the token is missing, invalid or lacks access"
            )
        return ExaoneError(f"{repo_id}: hub error: {_first_line(e)}")
    if isinstance(e, OfflineModeIsEnabled):
        return _offline(endpoint, "HF_HUB_OFFLINE is set")
    if isinstance(e, _network_errors()) or isinstance(
        e, (ConnectionError, TimeoutError, LocalEntryNotFoundError)
    ):
        return _offline(endpoint, f"{type(e).__name__}: {_first_line(e)}")
    if isinstance(e, OSError):  # huggingface_hub's "Consistency check failed" and disk errors
        return ExaoneError(f"{repo_id}: download failed: {_first_line(e)} (rerun to resume)")
    return ExaoneError(f"{repo_id}: download failed: {type(e).__name__}: {_first_line(e)}")


def _network_errors() -> tuple[type[BaseException], ...]:
    try:  # huggingface_hub >= 2 talks through httpx2, earlier versions through httpx or requests
        import httpx2 as http
    except ImportError:
        try:
            import httpx as http
        except ImportError:
            return ()
    return (http.TransportError,)


class _Watcher(threading.Thread):
    """Progress from the outside: finished files appear in the staging directory, bytes in flight
    sit in huggingface_hub's `.incomplete` files. Rich bar on a TTY, one plain line per file else."""

    def __init__(self, staging: Path, sizes: dict[str, int], say: Say, rich: bool):
        super().__init__(daemon=True)
        self.staging, self.sizes, self.say, self.rich = staging, sizes, say, rich
        self.done: set[str] = set()
        self.stopping = threading.Event()

    def run(self):
        bar = None
        if self.rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
            bar = Progress("{task.description}", *columns, console=Console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task("download", total=sum(self.sizes.values()))
        try:
            while True:
                stopping = self.stopping.wait(0.25)
                for f in self.sizes:
                    if f not in self.done and (self.staging / f).is_file():
                        self.done.add(f)
                        if bar is None:
                            self.say(f"  [{len(self.done)}/{len(self.sizes)}] {f} ({_size(self.sizes[f])})")
                if bar is not None:
                    files = f"{len(self.done)}/{len(self.sizes)} files"
                    bar.update(task, completed=self._bytes(), description=files)
                if stopping:
                    return
        finally:
            if bar is not None:
                bar.stop()

    def _bytes(self) -> int:
        partial = self.staging / ".cache" / "huggingface" / "download"
        flying = sum(p.stat().st_size for p in partial.rglob("*.incomplete")) if partial.is_dir() else 0
        return sum(self.sizes[f] for f in self.done) + flying

    def stop(self):
        self.stopping.set()
        if self.is_alive():
            self.join()


# --- git -------------------------------------------------------------------------------------


def _from_git(url, final, revision, token, force, say, arguments, started):
    if shutil.which("git") is None:
        raise ExaoneError(
            "git is not installed (needed to clone a git URL); or download with `exaone download ORG/NAME`"
        )
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    token = token or _hub_token()
    if token and urlsplit(url).hostname and urlsplit(url).hostname == urlsplit(hub_endpoint()).hostname:
        # Through the environment, not argv or .git/config: neither is ever written to disk or shown by ps.
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="http.extraHeader")
        env["GIT_CONFIG_VALUE_0"] = f"Authorization: Bearer {token}"
    pinned = revision and re.fullmatch(r"[0-9a-fA-F]{7,40}", revision)
    with mf.atomic_output_dir(final, force=force) as tmp:
        say(f"cloning {_safe(url)}" + (f" at {revision}" if revision else "") + f" into {final}")
        args = ["clone", "--quiet"] + ([] if pinned else ["--depth", "1"])
        args += ["--branch", revision] if revision and not pinned else []
        _git(args + ["--", url, str(tmp)], env, url)
        if pinned:
            _git(["-C", str(tmp), "checkout", "--quiet", revision], env, url)
        commit = _git(["-C", str(tmp), "rev-parse", "HEAD"], env, url).strip()
        shutil.rmtree(tmp / ".git")  # a plain checkout: git-lfs would otherwise keep every weight twice
        report = _verify(tmp, final, _safe(url))
        m = _manifest(tmp, report, _safe(url), arguments, started, {"revision": revision, "commit": commit})
    return Result(final, _safe(url), skipped=False, manifest=m, report=report)


def _git(args: list[str], env: dict, url: str) -> str:
    proc = subprocess.run(["git", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise ExaoneError(
            f"git {args[0]} {_safe(url)} failed: {lines[-1] if lines else f'exit {proc.returncode}'}"
        )
    return proc.stdout


def _hub_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


# --- local directory -------------------------------------------------------------------------


def _from_path(src: Path, final: Path, force: bool, say: Say, arguments: dict, started: str):
    if _same(final, src):
        existing = mf.read_manifest(src)
        if existing is not None and existing.kind != "hf":
            raise ExaoneError(f"{src}: holds a {existing.kind} manifest, not a Hugging Face checkpoint")
        say(f"verifying {src} in place")
        report = _verify(src, src, str(src))
        m = _manifest(src, report, str(src.resolve()), arguments, started)
        return Result(final, str(src), skipped=False, manifest=m, report=report)
    check_no_lfs_pointers(src)  # before copying gigabytes
    with mf.atomic_output_dir(final, force=force) as tmp:
        say(f"copying {src} into {final}")
        shutil.copytree(
            src, tmp, dirs_exist_ok=True, ignore=lambda d, names: [n for n in names if n.startswith(".")]
        )
        (tmp / mf.MANIFEST_NAME).unlink(missing_ok=True)  # ours is written below
        report = _verify(tmp, final, str(src))
        m = _manifest(tmp, report, str(src.resolve()), arguments, started)
    return Result(final, str(src), skipped=False, manifest=m, report=report)


# --- shared ----------------------------------------------------------------------------------


def _verify(directory: Path, final: Path, label: str) -> Report:
    """verify_checkpoint, with errors naming the final directory rather than a temporary one."""
    try:
        return verify_checkpoint(directory)
    except ExaoneError as e:
        raise ExaoneError(f"{str(e).replace(str(directory), str(final))} [from {label}]") from None


def _manifest(directory, report, source, arguments, started, extra=None, files=None) -> mf.Manifest:
    cfg = report.cfg
    quant = None
    if report.quantization is not None:
        method = str(report.quantization.get("quant_method", "unknown"))
        quant = mf.Quantization(algorithm=method, extra=report.quantization)
    producer = mf.make_producer(arguments, started)
    producer = producer.model_copy(update={"command": redact_command(producer.command)})
    m = mf.Manifest(
        kind="hf",
        model=mf.ModelInfo(
            family=cfg.family,
            model_type=cfg.model_type,
            architecture=cfg.architecture,
            source=source,
            label=source,
        ),
        dtype=cfg.torch_dtype,
        quantization=quant,
        files=files if files is not None else mf.list_files(directory, hashes=True),
        producer=producer,
        extra={"tensors": report.tensors, "shards": report.shards, **(extra or {})},
    )
    mf.write_manifest(directory, m)
    return m


def redact_command(command: str) -> str:
    """The command line with any --token value replaced: it is recorded in every manifest."""
    command = re.sub(r"(--token[= ])('[^']*'|\"[^\"]*\"|\S+)", r"\1***", command)
    return _safe(command)


def _safe(text: str) -> str:
    """Credentials in URLs (https://user:secret@host/...) replaced."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def _same(a: Path, b: str | Path) -> bool:
    return Path(a).exists() and Path(a).resolve() == Path(b).resolve()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def releases_table() -> list[dict]:
    """Rows for `exaone download --list`: GPU memory is for the weights only (no KV cache or activations)."""
    return [
        {
            "name": r.short,
            "repo": r.repo,
            "family": r.family,
            "params_b": r.params_b,
            "format": r.format,
            "weights_gb": {k: round(r.weights_gb(v), 1) for k, v in MEMORY_DTYPES.items()},
        }
        for r in RELEASES
    ]
