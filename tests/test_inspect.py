"""`exaone inspect`: the table, --json, --verify and its errors, through the real CLI entry point."""

from __future__ import annotations

import json

from exaone.cli.app import main
from exaone.core.io import manifest as mf
from tests.test_manifest import full_manifest, hf_dir


def test_table_of_derived_hf_dir(tmp_path, capsys):
    d = hf_dir(tmp_path / "m")
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "derived (no manifest file)" in out
    assert "exaone4" in out and "Exaone4ForCausalLM" in out and "bfloat16" in out
    assert "model.safetensors" in out and "3 files" in out


def test_table_of_written_manifest(tmp_path, capsys):
    d = hf_dir(tmp_path / "m")
    mf.write_manifest(d, full_manifest(d))
    assert main(["inspect", str(d), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "quantized" in out and "fp8" in out and "cnn_dailymail" in out and "exaone 0.1.0" in out
    assert "derived" not in out and "verify: OK" in out


def test_json(tmp_path, capsys):
    d = hf_dir(tmp_path / "m")
    mf.write_manifest(d, full_manifest(d))
    assert main(["inspect", str(d), "--json"]) == 0
    assert mf.Manifest.model_validate(json.loads(capsys.readouterr().out)) == mf.read_manifest(d)


def test_verify_detects_corruption(tmp_path, capsys):
    d = hf_dir(tmp_path / "m")
    mf.write_manifest(d, full_manifest(d))
    (d / "model.safetensors").write_bytes(b"\1" * 1000)
    assert main(["inspect", str(d), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "model.safetensors: sha256 differs" in err and "\n" not in err


def test_bad_directories(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "neither exaone-manifest.json nor config.json" in err and err.count("\n") == 1
