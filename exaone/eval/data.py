"""Evaluation data: the Hugging Face data sets summarize.py uses, or local copies in the same shapes.

Every source becomes a list of `Sample(id, text, reference)`: for summarization the article and its
reference summary, for perplexity a text (reference empty). Like the reference summarize.py, the
samples are shuffled with the seed (the permutation `datasets.Dataset.shuffle(seed)` draws), then
read in order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from exaone.core.errors import ExaoneError, OptionError, literal

# Short names -> (hub repo, config, split). cnn_dailymail 3.0.0 test is summarize.py's data set
# (it names the older script-based `ccdv/cnn_dailymail`; `abisee/cnn_dailymail` is the same data as
# parquet files, which current `datasets` versions still load).
HUB = {
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", "test"),
    "xsum": ("EdinburghNLP/xsum", None, "test"),
    "slimpajama": ("DKYoon/SlimPajama-6B", None, "test"),
}
DEFAULT = {"summarize": "cnn_dailymail", "eval_context_ppl": "slimpajama"}

# (text field, reference field) pairs recognised in records, first match wins.
FIELDS = [
    ("article", "highlights"),
    ("document", "summary"),
    ("article", "summary_gt"),
    ("article", "summary"),
]
TEXT_FIELDS = ("text", "article", "document")

# The HELM XSum prompt wrapped around every `article` of the H2O xsum_0shot.jsonl file.
HELM_PREFIX, HELM_SUFFIX = "###\nArticle: ", "\n\nSummarize the above article in 1 sentence.\n"

# CNN/DailyMail sentence ends: a line ending otherwise gets " ." (the HF loader's fix_missing_period).
END_TOKENS = (".", "!", "?", "...", "'", "`", '"', "\u2019", "\u201d", ")")


@dataclass(frozen=True)
class Sample:
    id: str
    text: str
    reference: str = ""


@dataclass
class Dataset:
    source: str  # what was read: a hub "repo:config:split" or a local path
    format: str  # hub | json | jsonl | parquet | stories | text
    samples: list[Sample]


def load(spec: str | None, task: str, seed: int | None = 0, cache_dir: str | None = None) -> Dataset:
    """A short name (cnn_dailymail, xsum, slimpajama), a hub repo id, or a local file/directory."""
    spec = spec or DEFAULT[task]
    path = Path(spec).expanduser()
    if path.exists():
        data = load_local(path, task)
    elif spec in HUB or (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        repo, config, split = HUB.get(spec, (spec, None, "test"))
        data = load_hub(repo, config, split, task, cache_dir)
    else:
        names = ", ".join(HUB)
        problem = f"no such file or directory, and not a known data set ({names}) or hub repo id"
        raise OptionError("dataset", spec, problem, f"{{option}} {literal(spec)}: {{problem}}")
    if not data.samples:
        raise OptionError("dataset", spec, "no samples found", f"{{option}} {literal(spec)}: {{problem}}")
    if seed is not None:
        data.samples = shuffled(data.samples, seed)
    return data


def shuffled(items: list, seed: int) -> list:
    """The order `datasets.Dataset.shuffle(seed=seed)` gives (numpy's default_rng permutation)."""
    import numpy as np

    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def load_local(path: Path, task: str) -> Dataset:
    if path.is_dir():
        stories = sorted(path.glob("*.story"))
        if stories:
            return Dataset(str(path), "stories", [read_story(p) for p in stories])
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet"))
        if not files:
            raise OptionError("dataset", path, "directory holds no .story, .json, .jsonl or .parquet files")
        samples = [s for f in files for s in load_local(f, task).samples]
        return Dataset(str(path), files[0].suffix.lstrip("."), samples)
    suffix = path.suffix.lower()
    if suffix == ".story":
        return Dataset(str(path), "stories", [read_story(path)])
    if suffix in (".json", ".jsonl"):
        return Dataset(str(path), suffix[1:], records_to_samples(read_json_records(path), task, str(path)))
    if suffix == ".parquet":
        return Dataset(str(path), "parquet", records_to_samples(read_parquet(path), task, str(path)))
    if task == "eval_context_ppl":  # plain text (e.g. WikiText-2 raw): one sample, windowed later
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        return Dataset(str(path), "text", [Sample(path.name, text)])
    raise OptionError(
        "dataset",
        path,
        f"unsupported file type {suffix or '(none)'} for summarize "
        "(expected .json, .jsonl, .parquet, .story or a directory of .story files)",
    )


def read_story(path: Path) -> Sample:
    """A CNN/DailyMail .story file as the HF `cnn_dailymail` 3.0.0 loader reads it."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ExaoneError(f"{path}: not UTF-8 text") from None
    article, highlights, in_highlight = [], [], False
    for line in lines:
        if not line:
            continue
        if line.startswith("@highlight"):
            in_highlight = True
            continue
        if not line.endswith(END_TOKENS):
            line += " ."
        (highlights if in_highlight else article).append(line)
    if not article or not highlights:
        raise ExaoneError(f"{path}: expected article text followed by '@highlight' paragraphs")
    return Sample(path.stem, " ".join(article), "\n".join(highlights))


def read_json_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExaoneError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]} or column-oriented {"article": [...], ...}
            if isinstance(data.get("data"), list):
                data = data["data"]
            elif data and all(isinstance(v, list) for v in data.values()):
                keys = list(data)
                data = [dict(zip(keys, row, strict=False)) for row in zip(*data.values(), strict=False)]
        if not isinstance(data, list):
            raise ExaoneError(f"{path}: expected a JSON list of records")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ExaoneError(
                f"{path}:{n}: not valid JSON (a .jsonl file has one JSON object a line)"
            ) from None
    return records


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ExaoneError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise ExaoneError(f"{path}: not a readable parquet file ({e})") from None


def records_to_samples(records: list, task: str, source: str) -> list[Sample]:
    if not records:
        return []
    first = records[0]
    if not isinstance(first, dict):
        raise ExaoneError(f"{source}: expected records (JSON objects), got {type(first).__name__}")
    if task == "eval_context_ppl":
        key = next((k for k in TEXT_FIELDS if isinstance(first.get(k), str)), None)
        if key is None:
            raise ExaoneError(f"{source}: records need a text field (one of {', '.join(TEXT_FIELDS)})")
        return [Sample(str(r.get("id", i)), _helm_unwrap(r[key])) for i, r in enumerate(records)]
    pair = next(((a, b) for a, b in FIELDS if a in first and b in first), None)
    if pair is None:
        wanted = " or ".join(f"{a}/{b}" for a, b in FIELDS[:2])
        raise ExaoneError(f"{source}: records need {wanted} fields; found {', '.join(sorted(first))}")
    text_key, ref_key = pair
    samples = []
    for i, r in enumerate(records):
        text, ref = r.get(text_key), r.get(ref_key)
        if not isinstance(text, str) or not isinstance(ref, str):
            raise ExaoneError(f"{source}: record {i} has no string {text_key!r}/{ref_key!r}")
        samples.append(Sample(str(r.get("id", i)), _helm_unwrap(text), ref))
    return samples


def _helm_unwrap(text: str) -> str:
    if text.startswith(HELM_PREFIX) and text.endswith(HELM_SUFFIX):
        return text[len(HELM_PREFIX) : -len(HELM_SUFFIX)]
    return text


def load_hub(repo: str, config: str | None, split: str, task: str, cache_dir: str | None) -> Dataset:
    """Through `datasets`; offline it fails within seconds, naming the local alternatives."""
    source = ":".join(x for x in (repo, config, split) if x)
    try:
        import datasets
    except ImportError:
        problem = "hub data sets need the `datasets` package (pip install datasets)"
        raise OptionError("dataset", source, problem, "{option}: {problem}") from None
    offline = _offline_mode()
    if not offline:
        _probe_hub(repo, source)
    try:
        ds = datasets.load_dataset(repo, config, split=split, cache_dir=cache_dir)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        template = f"{{option}} {literal(source)}: {{problem}}{_LOCAL_HINT}"
        raise OptionError("dataset", source, f"cannot load ({first})", template) from None
    return Dataset(source, "hub", records_to_samples(list(ds), task, source))


_LOCAL_HINT = (  # the end of an OptionError template
    "; use a local copy instead: {option} path/to/test.parquet|.jsonl|.json, or a directory of .story files"
)


def _offline_mode() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _probe_hub(repo: str, source: str):
    """One short request first: `datasets` itself retries for half a minute before giving up."""
    from huggingface_hub import HfApi

    try:
        # HF_ENDPOINT read now: huggingface_hub freezes it when first imported.
        HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).dataset_info(repo, timeout=5.0)
    except Exception as e:  # network errors come from httpx/requests; hub errors from huggingface_hub
        from huggingface_hub.errors import RepositoryNotFoundError

        if isinstance(e, RepositoryNotFoundError):
            problem = "no such data set on the Hugging Face Hub"
            raise OptionError("dataset", repo, problem, f"{{option}} {literal(repo)}: {{problem}}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OptionError(
            "dataset",
            source,
            f"cannot reach the Hugging Face Hub ({type(e).__name__}: {first}); "
            "set HF_HUB_OFFLINE=1 to use a cached copy",
            f"{{option}} {literal(source)}: {{problem}}{_LOCAL_HINT}",
        ) from None
