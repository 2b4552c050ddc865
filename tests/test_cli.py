"""The bge-edge command: encode (JSON lines), info, verify, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime import Embedder


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bge_edge.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_encode_reads_stdin_and_writes_json_lines_in_flagembedding_vocabulary(m3_artifact: Path) -> None:
    r = _cli("encode", str(m3_artifact), "--precision", "fp32", "--sparse", "--colbert", stdin="hello world\n \n模型\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    assert all(set(row) == {"index", "dense_vecs", "lexical_weights", "colbert_vecs"} for row in rows)
    ref = Embedder(m3_artifact, precision="fp32", hash_cache=False).encode(
        ["hello world", " ", "模型"], return_sparse=True, return_colbert_vecs=True)
    for k, row in enumerate(rows):
        assert np.abs(np.array(row["dense_vecs"]) - ref["dense_vecs"][k]).max() < 1e-6
        assert set(row["lexical_weights"]) == set(ref["lexical_weights"][k])
        assert np.array(row["colbert_vecs"]).shape == ref["colbert_vecs"][k].shape


def test_encode_refuses_empty_lines_as_the_server_does(bert_artifact: Path, tmp_path: Path) -> None:
    r = _cli("encode", str(bert_artifact), stdin="first\n\nthird\n\n")
    assert r.returncode == 2 and r.stdout == ""
    assert "line(s) 2, 4 hold an empty text" in r.stderr and "Traceback" not in r.stderr
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": ""}\n')
    r = _cli("encode", str(bert_artifact), "--input", str(f), "--jsonl")
    assert r.returncode == 2 and "line(s) 3 hold an empty text" in r.stderr


def test_encode_errors_name_the_cli_flags_not_python_arguments(bert_artifact: Path) -> None:
    for args, flag in ((["--sparse"], "--sparse"), (["--colbert"], "--colbert"),
                       (["--max-length", "1"], "--max-length"), (["--batch-size", "0"], "--batch-size"),
                       (["--no-dense"], "--no-dense")):
        r = _cli("encode", str(bert_artifact), *args, stdin="x\n")
        assert r.returncode == 2 and flag in r.stderr, (args, r.stderr)
        assert "return_" not in r.stderr and "max_length" not in r.stderr and "batch_size" not in r.stderr


def test_encode_reads_jsonl_files_and_reports_progress(bert_artifact: Path, tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"text number {i}"}) for i in range(1500)))
    r = _cli("encode", str(bert_artifact), "--input", str(f), "--jsonl")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1500
    assert "encoded 1024/1500" in r.stderr and "encoded 1500/1500" in r.stderr


def test_encode_errors_are_one_line(bert_artifact: Path, tmp_path: Path) -> None:
    r = _cli("encode", str(bert_artifact), "--sparse", stdin="x\n")
    assert r.returncode == 2 and r.stderr.startswith("bge-edge: error:") and "Traceback" not in r.stderr
    r = _cli("encode", str(tmp_path / "missing"), stdin="x\n")
    assert r.returncode == 2 and "does not exist" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    r = _cli("encode", str(bert_artifact), "--input", str(bad), "--jsonl")
    assert r.returncode == 2 and "line 1 is not JSON" in r.stderr


def test_info_describes_graphs_and_backend(m3_artifact: Path) -> None:
    r = _cli("info", str(m3_artifact))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "m3" and info["providers"] == ["CPUExecutionProvider"]
    assert {g["precision"] for g in info["graphs"]} == {"fp32", "int8", "fp16"}
    assert "dense_cosine_mean" in next(g for g in info["graphs"] if g["precision"] == "int8")["accuracy"]


def test_verify_passes_then_names_a_corrupt_file(bert_artifact: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    r = _cli("verify", str(art))
    assert r.returncode == 0 and r.stdout.startswith("ok:")
    data = bytearray((art / "model.fp32.onnx").read_bytes())
    data[100] ^= 0xFF
    (art / "model.fp32.onnx").write_bytes(bytes(data))
    r = _cli("verify", str(art))
    assert r.returncode == 2 and "model.fp32.onnx" in r.stderr and "SHA-256" in r.stderr


@pytest.mark.slow
def test_base_install_in_a_fresh_venv_encodes_without_torch(m3_artifact: Path, tmp_path: Path) -> None:
    """The runtime installs with numpy + tokenizers + onnxruntime alone and encodes an exported artifact."""
    repo = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", str(repo)], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    code = ("import importlib.util, json, sys\n"
            "from bge_edge.runtime import Embedder, MissingExtraError\n"
            f"m = Embedder({str(m3_artifact)!r}, hash_cache=False)\n"
            "o = m.encode(['hello'], return_sparse=True, return_colbert_vecs=True)\n"
            "try:\n"
            f"    Embedder({str(m3_artifact)!r}, backend='openvino', hash_cache=False)\n"
            "    ov_error = ''\n"
            "except MissingExtraError as e:\n"
            "    ov_error = str(e)\n"
            "print(json.dumps({'dim': o['dense_vecs'].shape[1], 'backend': m.backend, 'ov_error': ov_error, "
            "'absent': [n for n in ('torch', 'transformers', 'onnx', 'optimum', 'openvino') "
            "if importlib.util.find_spec(n) is None]}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "pip install 'bge-edge[openvino]'" in out.pop("ov_error")
    assert out == {"dim": 32, "backend": "onnxruntime",
                   "absent": ["torch", "transformers", "onnx", "optimum", "openvino"]}
    r = subprocess.run([str(venv / "bin" / "bge-edge"), "export", "x", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "pip install 'bge-edge[export]'" in r.stderr
