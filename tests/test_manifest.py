"""The checkpoint manifest: round trip, hashes, verification, atomic output directories, the schema doc."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exaone.core.errors import ExaoneError
from exaone.core.io import manifest as mf

DOCS_SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "manifest.schema.json"
EXAONE4_CONFIG = {
    "model_type": "exaone4",
    "architectures": ["Exaone4ForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "torch_dtype": "bfloat16",
}


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(EXAONE4_CONFIG))
    (path / "model.safetensors").write_bytes(b"\0" * 1000)
    (path / "sub").mkdir()
    (path / "sub" / "tokenizer.json").write_text("{}")
    return path


def full_manifest(directory: Path) -> mf.Manifest:
    return mf.Manifest(
        kind="quantized",
        model=mf.ModelInfo(family="exaone4", model_type="exaone4", architecture="Exaone4ForCausalLM"),
        dtype="bfloat16",
        quantization=mf.Quantization(
            algorithm="fp8",
            kv_cache_dtype="fp8",
            calibration=mf.Calibration(dataset="cnn_dailymail", size=16, seq=128, seed=0),
        ),
        files=mf.list_files(directory),
        parent="ab" * 32,
        producer=mf.make_producer({"qformat": "fp8", "out": Path("x")}, mf.now()),
    )


def test_round_trip(tmp_path):
    d = hf_dir(tmp_path / "m")
    m = full_manifest(d)
    mf.write_manifest(d, m)
    assert mf.read_manifest(d) == m
    assert json.loads((d / mf.MANIFEST_NAME).read_text())["schema_version"] == mf.SCHEMA_VERSION
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert m.producer.arguments == {"qformat": "fp8", "out": "x"}
    assert "torch" in m.producer.libraries and "python" in m.producer.libraries


def test_list_files_skips_manifest_and_hidden(tmp_path):
    d = hf_dir(tmp_path / "m")
    (d / mf.MANIFEST_NAME).write_text("{}")
    (d / ".cache").mkdir()
    (d / ".cache" / "x").write_text("x")
    (d / ".tmp-1").write_text("x")
    files = mf.list_files(d)
    assert [f.path for f in files] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert files[1].size == 1000 and files[1].sha256 == mf.hash_file(d / "model.safetensors")
    assert all(f.sha256 is None for f in mf.list_files(d, hashes=False))


def test_hash_stability(tmp_path):
    d = hf_dir(tmp_path / "m")
    m = mf.derive_manifest(d, hashes=True)
    same = mf.Manifest.model_validate_json(m.model_dump_json(indent=2))
    assert mf.manifest_hash(m) == mf.manifest_hash(same)
    assert len(mf.manifest_hash(m)) == 64
    assert mf.hash_file(d / "sub" / "tokenizer.json") == (
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # sha256 of "{}"
    )
    other = m.model_copy(update={"dtype": "float16"})
    assert mf.manifest_hash(other) != mf.manifest_hash(m)


def test_read_rejects_bad_manifests(tmp_path):
    d = hf_dir(tmp_path / "m")
    assert mf.read_manifest(d) is None
    path = d / mf.MANIFEST_NAME
    path.write_text("{not json")
    with pytest.raises(ExaoneError, match="not valid JSON"):
        mf.read_manifest(d)
    raw = json.loads(full_manifest(d).model_dump_json())
    for change, expected in [
        ({"kind": "gguf"}, "field 'kind'"),
        ({"schema_version": 2}, "schema_version 2 is not supported"),
        ({"surprise": 1}, "field 'surprise'"),
    ]:
        path.write_text(json.dumps({**raw, **change}))
        with pytest.raises(ExaoneError, match=expected) as e:
            mf.read_manifest(d)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_verify_catches_missing_size_and_hash(tmp_path):
    d = hf_dir(tmp_path / "m")
    m = mf.derive_manifest(d, hashes=True)
    mf.verify(d, m, deep=True)
    (d / "model.safetensors").write_bytes(b"\1" * 1000)  # same size, other content
    mf.verify(d, m)
    with pytest.raises(ExaoneError, match="model.safetensors: sha256 differs"):
        mf.verify(d, m, deep=True)
    (d / "model.safetensors").write_bytes(b"\0" * 999)
    with pytest.raises(ExaoneError, match="999 bytes, the manifest records 1000"):
        mf.verify(d, m)
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    mf.verify(d, m, deep=True)
    (d / "sub" / "tokenizer.json").unlink()
    with pytest.raises(ExaoneError, match="tokenizer.json: missing"):
        mf.verify(d, m)


def test_atomic_output_dir(tmp_path):
    final = tmp_path / "out"
    with mf.atomic_output_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a").write_text("new")
    assert (final / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    for exc in (RuntimeError, KeyboardInterrupt):  # a failed or interrupted run leaves nothing behind
        with pytest.raises(exc), mf.atomic_output_dir(tmp_path / "other"):
            raise exc()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(ExaoneError, match="exists \\(use --force"), mf.atomic_output_dir(final) as tmp:
        pytest.fail("must refuse before the work starts")
    assert (final / "a").read_text() == "new"

    with mf.atomic_output_dir(final, force=True) as tmp:
        (tmp / "b").write_text("newer")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(RuntimeError), mf.atomic_output_dir(final, force=True) as tmp:
        raise RuntimeError  # a failed --force run keeps the old output
    assert sorted(p.name for p in final.iterdir()) == ["b"]


def test_is_up_to_date(tmp_path):
    out, args, parent = tmp_path / "out", {"qformat": "fp8", "seed": 0}, "cd" * 32
    assert not mf.is_up_to_date(out, parent, args)
    with mf.atomic_output_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"x" * 10)
        m = full_manifest(tmp).model_copy(
            update={
                "parent": parent,
                "producer": mf.make_producer(args, mf.now()),
                "files": mf.list_files(tmp),
            }
        )
        mf.write_manifest(tmp, m)
    assert mf.is_up_to_date(out, parent, dict(args))
    assert not mf.is_up_to_date(out, "ef" * 32, args)
    assert not mf.is_up_to_date(out, parent, {**args, "seed": 1})
    (out / "w.bin").write_bytes(b"x")
    assert not mf.is_up_to_date(out, parent, args)
    (out / mf.MANIFEST_NAME).write_text("{")
    assert not mf.is_up_to_date(out, parent, args)


def test_derive_plain_hf_dir(tmp_path):
    d = hf_dir(tmp_path / "m")
    m = mf.load_or_derive(d)
    assert (m.kind, m.model.family, m.model.architecture, m.dtype) == (
        "hf",
        "exaone4",
        "Exaone4ForCausalLM",
        "bfloat16",
    )
    assert m.producer is None and m.parent is None and m.quantization is None
    assert [f.path for f in m.files] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert not (d / mf.MANIFEST_NAME).exists()  # deriving writes nothing
    with pytest.raises(ExaoneError, match="neither exaone-manifest.json nor config.json"):
        mf.load_or_derive(d / "sub")
    with pytest.raises(ExaoneError, match="not a directory"):
        mf.load_or_derive(d / "config.json")


def test_schema_doc_in_sync():
    expected = json.dumps(mf.json_schema(), indent=2) + "\n"
    assert DOCS_SCHEMA.read_text() == expected, (
        "docs/manifest.schema.json is stale: python -m exaone.core.io.manifest > docs/manifest.schema.json"
    )
    assert mf.json_schema()["$schema"].startswith("https://json-schema.org/")
