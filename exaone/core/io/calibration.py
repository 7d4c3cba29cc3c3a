"""Calibration text: from the hub through `datasets`, from local files, or from the shared samples.

Texts are tokenized with the checkpoint's own tokenizer, joined with the EOS token between them and
cut into `calib_size` rows of exactly `calib_seq` tokens (no padding, so every token calibrates).
The order is shuffled with `seed` before packing, so a seed names one exact calibration set.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import torch

from exaone.core.errors import ExaoneError, OptionError, literal

HUB_DATASETS = {  # name -> (load_dataset args, text field)
    "cnn_dailymail": (("cnn_dailymail", "3.0.0"), "article"),
    "abisee/cnn_dailymail": (("abisee/cnn_dailymail", "3.0.0"), "article"),
    "wikitext": (("wikitext", "wikitext-103-raw-v1"), "text"),
    "pile": (("mit-han-lab/pile-val-backup",), "text"),
}
TEXT_FIELDS = ("article", "text", "document", "content", "input", "prompt")
SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".story", ".raw", ".tokens")
XSUM_WRAPPER = re.compile(r"^###\nArticle: (.*)\n\nSummarize the above article in 1 sentence\.\n$", re.S)


def shared_data_dir() -> Path:
    """$EXAONE_SHARED_DATA, else `shared/data` beside the repository checkout."""
    env = os.environ.get("EXAONE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[4] / "shared" / "data"


def load_texts(dataset: str, limit: int, seed: int) -> list[str]:
    """Texts of a calibration set named by `calib_dataset`."""
    if dataset == "shared":
        root = shared_data_dir()
        if not root.is_dir():
            problem = f"{root} not found (set EXAONE_SHARED_DATA)"
            raise OptionError("calib_dataset", dataset, problem, "{option} shared: {problem}")
        return _from_path(root / "xsum") + _from_path(root / "cnn_dailymail_stories")
    path = Path(dataset).expanduser()
    if path.exists():
        return _from_path(path)
    if dataset in HUB_DATASETS:
        return _from_hub(dataset, limit, seed)
    raise OptionError(
        "calib_dataset",
        dataset,
        "no such file or directory, and not a known hub dataset "
        f"(known: {', '.join(HUB_DATASETS)}, or 'shared' for the offline samples)",
    )


def _from_hub(name: str, limit: int, seed: int) -> list[str]:
    args, field = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError:
        problem = "the `datasets` package is not installed"
        raise OptionError("calib_dataset", name, problem, f"{{option}} {name}: {{problem}}") from None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") and not _hub_reachable():
        raise OptionError(
            "calib_dataset",
            name,
            "the Hugging Face hub is not reachable (offline?); pass a local "
            ".txt/.json/.jsonl/.parquet file or directory, or 'shared'",
            f"{{option}} {name}: {{problem}}",
        )
    try:
        ds = datasets.load_dataset(*args, split="train", streaming=True)
        texts = []
        for row in ds.shuffle(seed=seed, buffer_size=10_000):
            if row.get(field):
                texts.append(row[field])
            if len(texts) >= limit:
                break
    except Exception as e:  # datasets raises many types (network, missing config, cache)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problem = f"could not load it through datasets ({first})"
        raise OptionError("calib_dataset", name, problem, f"{{option}} {name}: {{problem}}") from None
    return texts


def _hub_reachable(timeout: float = 5.0) -> bool:
    import requests

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        requests.head(endpoint, timeout=timeout)
    except requests.RequestException:
        return False
    return True


def _from_path(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise OptionError("calib_dataset", path, f"no {'/'.join(SUFFIXES)} files in the directory")
        return [t for f in files for t in _from_file(f)]
    return _from_file(path)


def _from_file(path: Path) -> list[str]:
    suffix = path.suffix
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            field = next((f for f in TEXT_FIELDS if f in table.column_names), None)
            if field is None:
                raise ExaoneError(f"{path}: no text column (expected one of {', '.join(TEXT_FIELDS)})")
            return [_clean(t) for t in table.column(field).to_pylist() if t]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExaoneError(f"{path}: cannot read ({e})") from None
    except ExaoneError:
        raise
    except Exception as e:  # pyarrow's errors
        raise ExaoneError(f"{path}: not a readable parquet file ({e})") from None
    if suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ExaoneError(f"{path}:{i}: not valid JSON") from None
        return _texts_of(rows, path)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExaoneError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        return _texts_of(data if isinstance(data, list) else [data], path)
    if suffix == ".story":  # CNN/DailyMail: the article, then @highlight lines
        return [text.split("@highlight")[0].strip()] if text.strip() else []
    text = text.replace("\r\n", "\n")
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]  # paragraphs
    if len(parts) == 1:  # no blank lines (e.g. WikiText raw): one text per line
        parts = [line.strip() for line in text.splitlines() if line.strip()]
    return parts


def _texts_of(rows: list, path: Path) -> list[str]:
    texts = []
    for row in rows:
        if isinstance(row, str):
            texts.append(row)
            continue
        field = next((f for f in TEXT_FIELDS if isinstance(row, dict) and row.get(f)), None)
        if field is None:
            raise ExaoneError(
                f"{path}: a record has no text field (expected one of {', '.join(TEXT_FIELDS)})"
            )
        texts.append(_clean(row[field]))
    return texts


def _clean(text: str) -> str:
    m = XSUM_WRAPPER.match(text)  # the shared XSum samples wrap each document in a prompt
    return m.group(1) if m else text


def calibration_batches(
    tokenizer, texts: list[str], calib_size: int, calib_seq: int, seed: int, dataset: str
) -> torch.Tensor:
    """[calib_size, calib_seq] token ids packed from the texts (shuffled with seed)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        template = f"{{option}} {literal(dataset)}: {{problem}}"
        raise OptionError("calib_dataset", dataset, "the calibration set is empty", template)
    random.Random(seed).shuffle(texts)
    need = calib_size * calib_seq
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        have = len(stream) // calib_seq
        raise OptionError(
            "calib_dataset",
            dataset,
            f"too short: {len(stream)} tokens give {have} samples of calib_seq {calib_seq}, calib_size asks "
            f"for {calib_size} (use more text or smaller values)",
            f"{{option}} {literal(dataset)}: {{problem}}",
        )
    return torch.tensor(stream[:need], dtype=torch.long).view(calib_size, calib_seq)
