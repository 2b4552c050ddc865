"""Export: artifact layout and manifest, fusion, self-measured accuracy, and every refusal."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bge_edge.runtime import Embedder, read_manifest
from bge_edge.runtime.integrity import sha256_file


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bge_edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_m3_artifact_lists_every_file_with_size_and_sha256(m3_artifact: Path) -> None:
    m = read_manifest(m3_artifact)
    on_disk = {p.relative_to(m3_artifact).as_posix() for p in m3_artifact.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(m.files)
    for name, entry in m.files.items():
        assert (m3_artifact / name).stat().st_size == entry.size
        assert sha256_file(m3_artifact / name) == entry.sha256
    assert m.kind == "m3" and m.heads == ("dense", "sparse", "colbert") and m.pooling == "cls"
    assert m.special_tokens["cls"] == 0 and m.special_tokens["pad"] == 1 and m.special_tokens["eos"] == 2
    assert m.special_tokens["unk"] == 3 and m.max_length == 8192
    assert {g.precision for g in m.graphs} == {"fp32", "int8", "fp16"}
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in m3_artifact.rglob("*")), "no pickle in artifacts"


def test_fp32_graph_is_fused_with_dynamic_axes(m3_artifact: Path) -> None:
    import onnx

    model = onnx.load(str(m3_artifact / "model.fp32.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "SkipLayerNormalization" in ops
    # each fused Attention sits in the plain branch of an If whose other branch is flash attention (longattn.py)
    branches = [{a.name: [x.op_type for x in a.g.node] for a in n.attribute} for n in model.graph.node
                if n.op_type == "If"]
    assert len(branches) == 2 and all(b == {"then_branch": ["MatMul", "Split", "MultiHeadAttention"],
                                            "else_branch": ["Attention"]} for b in branches), branches
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["dense", "sparse", "colbert"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    assert read_manifest(m3_artifact).graph("fp32").opset == 17


def test_int8_graph_quantises_every_matmul_per_token(m3_artifact: Path) -> None:
    import onnx

    model = onnx.load(str(m3_artifact / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "MatMulIntegerToFloat" in ops and "QuantizeLinear" in ops
    assert not {"DynamicQuantizeMatMul", "DynamicQuantizeLinear", "QAttention", "MatMul"} & set(ops), \
        "no per-batch activation scale and no float MatMul left"
    g = read_manifest(m3_artifact).graph("int8")
    assert g.quantization["method"] == "bge-edge per-token int8 (MatMulIntegerToFloat)"
    assert g.quantization["embeddings"] == "int8 per row (Gather)"
    assert g.quantization["kept_fp32"] == [] and g.quantization["batch_invariant"] is True
    assert max(g.quantization["batch_dependence_max_abs"].values()) <= 1e-5
    assert g.accuracy["dense_cosine_mean"] >= 0.99


def test_dynamic_int8_recipe_is_opt_in_and_its_manifest_says_it_depends_on_the_batch(tiny_m3_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """`--int8-recipe dynamic` writes ONNX Runtime's dynamic graph (QAttention, DynamicQuantizeLinear +
    MatMulInteger; faster on AVX2 without VNNI); its manifest says it is not batch-invariant and records the batch
    dependence export measured; it runs all three M3 heads through the runtime close to fp32."""
    import onnx

    out = tmp_path / "dyn"
    r = _cli("export", str(tiny_m3_dir), "--out", str(out), "--precision", "fp32", "int8", "--int8-recipe", "dynamic")
    assert r.returncode == 0, r.stderr
    g = read_manifest(out).graph("int8")

    def ops(graph: Any) -> set[str]:  # the attention nodes sit inside the flash branch's If (longattn.py)
        return {n.op_type for n in graph.node} | {o for n in graph.node for a in n.attribute if a.g.node
                                                  for o in ops(a.g)}

    found = ops(onnx.load(str(out / g.file)).graph)
    assert {"QAttention", "DynamicQuantizeLinear", "MatMulInteger"} <= found and "QuantizeLinear" not in found
    assert g.quantization["method"].startswith("onnxruntime dynamic int8")
    assert g.quantization["batch_invariant"] is False and "quality_target" not in g.quantization
    assert g.quantization["embeddings"] == "int8 per tensor (Gather)"
    assert max(g.quantization["batch_dependence_max_abs"].values()) > 1e-5  # measured: the reason it is opt-in
    assert [st["kept_fp32"] for st in g.quantization["steps"]] == ["none"] and g.accuracy["dense_cosine_mean"] >= 0.99
    texts = ["a short one", "and a somewhat longer sentence about quantisation " * 4]
    i8 = Embedder(out, precision="int8").encode(texts, return_sparse=True, return_colbert_vecs=True)
    f32 = Embedder(out, precision="fp32").encode(texts, return_sparse=True, return_colbert_vecs=True)
    assert (i8["dense_vecs"] * f32["dense_vecs"]).sum(1).min() > 0.99
    assert Embedder(out, precision="int8").info()["batch_invariant"] is False
    assert Embedder(out, precision="fp32").info()["batch_invariant"] is True
    assert [len(c) for c in i8["colbert_vecs"]] == [len(c) for c in f32["colbert_vecs"]]
    assert all(set(a) == set(b) for a, b in zip(i8["lexical_weights"], f32["lexical_weights"]))


def test_batch_invariance_of_a_graph_without_the_record_follows_the_recipe_of_its_time() -> None:
    """Artifacts exported before the manifest said `batch_invariant`: their ONNX INT8 was the per-batch dynamic
    recipe; OpenVINO INT8 (static scales) and float graphs were batch-invariant."""
    from bge_edge.runtime.manifest import GraphEntry

    old_dynamic = GraphEntry("model.int8.onnx", "onnx", "int8", quantization={"method": "onnxruntime dynamic int8"})
    assert old_dynamic.batch_invariant is False
    assert GraphEntry("openvino/model.int8.xml", "openvino", "int8").batch_invariant is True
    assert GraphEntry("model.fp32.onnx", "onnx", "fp32", quantization={"method": "none"}).batch_invariant is True
    assert GraphEntry("model.int8.onnx", "onnx", "int8", quantization={"batch_invariant": True}).batch_invariant


def test_int8_recipe_is_checked_before_any_work(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    with pytest.raises(ExportError, match=r"unknown int8 recipe 'static'; choose from \['per-token', 'dynamic'\]"):
        export_model(tiny_bert_dir, tmp_path / "out", ["int8"], int8_recipe="static")
    with pytest.raises(ExportError, match="is for the ONNX int8 graph, which this export does not write"):
        export_model(tiny_bert_dir, tmp_path / "out", ["fp32"], int8_recipe="dynamic")
    r = _cli("export", str(tiny_bert_dir), "--out", str(tmp_path / "out"), "--int8-recipe", "static")
    assert r.returncode == 2 and "invalid choice: 'static'" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_dense_model_exports_cls_and_query_instruction(bert_artifact: Path) -> None:
    m = read_manifest(bert_artifact)
    assert m.kind == "dense" and m.heads == ("dense",) and m.pooling == "cls" and m.max_length == 512
    assert m.query_instruction == "Represent this sentence for searching relevant passages: "


@pytest.mark.slow
def test_minilm_export_uses_mean_pooling_and_meets_accuracy_bars(minilm_artifact: Path) -> None:
    m = read_manifest(minilm_artifact)
    assert m.pooling == "mean" and m.max_length == 256 and m.query_instruction == ""
    par = m.graph("fp32").accuracy
    assert par["dense_max_abs_diff"] <= 1e-5
    assert m.graph("int8").accuracy["dense_cosine_mean"] >= 0.99
    assert m.graph("fp16").accuracy["dense_cosine_mean"] >= 0.999


@pytest.mark.slow
def test_minilm_int8_and_fp16_agree_with_fp32_on_real_text(minilm_artifact: Path, scifact_dir: Path) -> None:
    import gzip

    with gzip.open(scifact_dir / "corpus.jsonl.gz", "rt") as f:
        docs = [json.loads(next(f)) for _ in range(200)]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    ref = Embedder(minilm_artifact, precision="fp32", hash_cache=False).encode(texts)["dense_vecs"]
    for precision, bar in (("int8", 0.99), ("fp16", 0.999)):
        got = Embedder(minilm_artifact, precision=precision, hash_cache=False).encode(texts)["dense_vecs"]
        cos = (ref * got).sum(1)
        assert cos.mean() >= bar, (precision, cos.mean())


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    r = _cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "gpt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = _cli("export", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "unknown architecture 'gpt2'" in r.stderr and "Traceback" not in r.stderr


def test_missing_m3_head_file_is_an_error(tiny_m3_dir: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "m3-no-colbert"
    shutil.copytree(tiny_m3_dir, src)
    (src / "colbert_linear.pt").unlink()
    r = _cli("export", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "colbert_linear.pt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_without_force(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _cli("export", str(tiny_bert_dir), "--out", str(out), "--precision", "fp32")
    assert r.returncode != 0 and "already exists" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = _cli("export", str(tiny_bert_dir), "--out", str(out), "--precision", "fp32", "--force")
    assert r.returncode == 2 and "not a bge-edge artifact" in r.stderr and "Traceback" not in r.stderr
    assert (out / "keep.txt").read_text() == "mine"  # --force replaces only an artifact (test_hardening.py)


def test_unwritable_out_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="bge-edge-ro-"))  # under /tmp, so an unprivileged user can enter it
    base.chmod(0o755)
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cmd = [sys.executable, "-m", "bge_edge.cli", "export", str(tiny_bert_dir), "--out", str(ro / "out")]
    if os.geteuid() == 0:  # root writes anywhere: run the export as an unprivileged user
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be tested")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 2, r.stderr
    assert "not a writable folder" in r.stderr and "Traceback" not in r.stderr
    assert not (ro / "out").exists()
    shutil.rmtree(base)


def test_out_under_a_file_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli("export", str(tiny_bert_dir), "--out", str(blocker / "out"))
    assert r.returncode != 0 and "writable folder" in r.stderr and "Traceback" not in r.stderr


def test_export_killed_midway_leaves_no_artifact(tiny_m3_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bge_edge.cli", "export", str(tiny_m3_dir), "--out", str(out),
                             "--precision", "fp32", "int8", "fp16"], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # kill it once tracing is done and quantisation is under way
        if "fusing" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".bge-edge-export-") for p in leftovers)
    # the next export cleans what the killed one left
    r = _cli("export", str(tiny_m3_dir), "--out", str(out), "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_export_removes_its_temporary_folder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export import export_model

    def boom(step: str) -> None:
        if step == "fused":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_bert_dir, tmp_path / "out", ["fp32"], quiet=True, _after_step=boom)
    assert list(tmp_path.iterdir()) == []


def test_int8_below_the_accuracy_bar_is_refused_after_retries_that_say_why(tiny_bert_dir: Path,
                                                                           tmp_path: Path) -> None:
    import io

    from bge_edge.export import ExportError, export_model

    log = io.StringIO()
    with pytest.raises(ExportError, match="under the threshold 1.01"):
        export_model(tiny_bert_dir, tmp_path / "out", ["int8"], min_int8_cosine=1.01, stream=log)
    assert list(tmp_path.iterdir()) == []
    assert re.search(r"int8 quality [01]\.\d+ is under the floor 1\.01: again with the V projections and FFN "
                     r"down-projections kept fp32", log.getvalue()), log.getvalue()


def test_int8_under_the_quality_target_tries_the_v_step_and_keeps_the_better_graph(
        tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All-INT8 under check.INT8_TARGET_COSINE (here unreachable): export builds the graph with the V projections
    fp32 too and keeps the better one (on a tie the all-INT8 one, rewritten); the manifest records both steps and
    describes the graph on disk. Real MiniLM, where the V step wins: tests/test_int8.py."""
    import onnx
    from bge_edge.export import export_model

    monkeypatch.setattr("bge_edge.export.check.INT8_TARGET_COSINE", 1.01)  # the module export_model's pipeline reads
    export_model(tiny_bert_dir, tmp_path / "out", ["fp32", "int8"], quiet=True)
    g = read_manifest(tmp_path / "out").graph("int8")
    steps = g.quantization["steps"]
    assert [st["kept_fp32"] for st in steps] == ["none", "V projections"], steps
    best = steps[0] if steps[0]["quality"] >= steps[1]["quality"] else steps[1]
    assert g.quantization["chosen"] == best["kept_fp32"] and g.accuracy["dense_cosine_mean"] == best["quality"]
    kept = g.quantization["kept_fp32"]
    assert len(kept) == (2 if best is steps[1] else 0) and all(k.endswith("_v") for k in kept), kept
    floats = [n.name for n in onnx.load(str(tmp_path / "out" / g.file)).graph.node if n.op_type == "MatMul"]
    assert sorted(floats) == sorted(kept)  # the file is the chosen graph
    assert max(g.quantization["batch_dependence_max_abs"].values()) <= 1e-5


def test_a_package_folder_points_at_the_model_folder_inside_it(minilm_dir: Path) -> None:
    from bge_edge.export import SourceError
    from bge_edge.export.source import inspect_model

    with pytest.raises(SourceError, match=f"no config.json.*Did you mean {re.escape(str(minilm_dir))}\\?"):
        inspect_model(minilm_dir.parent, "x")


def test_model_id_comes_from_the_source_never_the_bare_folder_name(minilm_dir: Path, minilm_artifact: Path,
                                                                   tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export.source import local_model_id, resolve_model

    # the model card's own hub id, not the folder name "model" nor config.json's base model (nreimers/...)
    assert local_model_id(minilm_dir) == ("sentence-transformers/all-MiniLM-L6-v2", None)
    assert read_manifest(minilm_artifact).source["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    # a Hugging Face cache folder names its repository and revision
    rev = "a" * 40
    snap = tmp_path / "models--BAAI--bge-m3" / "snapshots" / rev
    shutil.copytree(tiny_bert_dir, snap)
    assert local_model_id(snap) == ("BAAI/bge-m3", rev)
    # config.json _name_or_path when it is a hub id; a generic folder name falls back to its parent's
    named = tmp_path / "named" / "model"
    shutil.copytree(tiny_bert_dir, named)
    cfg = json.loads((named / "config.json").read_text())
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "BAAI/bge-small-en-v1.5"}))
    assert local_model_id(named) == ("BAAI/bge-small-en-v1.5", None)
    (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "/home/me/checkpoints/run3"}))
    assert local_model_id(named) == ("named", None)
    # --model-id overrides all of it
    assert resolve_model(str(named), "acme/bge-small-finetuned")[1] == "acme/bge-small-finetuned"


def test_hub_id_offline_says_to_pass_a_local_folder(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "bge_edge.cli", "export", "BAAI/bge-m3-does-not-exist", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "local folder" in r.stderr and "Traceback" not in r.stderr


def test_export_prints_timed_progress(tiny_bert_dir: Path, tmp_path: Path) -> None:
    t = time.perf_counter()
    r = _cli("export", str(tiny_bert_dir), "--out", str(tmp_path / "o"), "--precision", "fp32", "int8")
    assert r.returncode == 0, r.stderr
    for step in ("loading PyTorch model", "tracing to ONNX", "fusing for CPU", "quantising to int8", "hashing"):
        assert f"{step}" in r.stderr and "done in" in r.stderr
    assert time.perf_counter() - t < 120
    assert np.isfinite(read_manifest(tmp_path / "o").graph("int8").accuracy["dense_cosine_mean"])


def test_int8_manifest_says_whether_the_embedding_table_was_quantised(m3_artifact: Path, bert_artifact: Path) -> None:
    import onnx

    for art in (m3_artifact, bert_artifact):
        g = read_manifest(art).graph("int8")
        ops = {n.op_type for n in onnx.load(str(art / g.file), load_external_data=False).graph.node}
        fused = "EmbedLayerNormalization" in ops
        assert g.quantization["embeddings"].startswith("fp32" if fused else "int8"), (art, ops)


def test_int8_rewrite_of_an_unsupported_graph_is_a_clear_export_error(tiny_bert_dir: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph form export/int8.py cannot rewrite (here: every weight shared) gives an ExportError, no artifact."""
    from bge_edge.export import ExportError, export_model
    from bge_edge.export.pipeline import int8  # the module export_model calls

    real = int8.smooth

    def shared_weights(model, absmax, alpha, keep):  # type: ignore[no-untyped-def]
        mm = [n for n in model.graph.node if n.op_type == "MatMul"]
        mm[1].input[1] = mm[0].input[1]  # two MatMuls read one weight: smoothing cannot scale it for one reader
        return real(model, absmax, alpha, keep)

    monkeypatch.setattr(int8, "smooth", shared_weights)
    with pytest.raises(ExportError, match=r"cannot quantise this model to int8: weight .* is shared.*Export fp32"):
        export_model(tiny_bert_dir, tmp_path / "out", ["fp32", "int8"], quiet=True)
    assert not (tmp_path / "out").exists() and not any(tmp_path.iterdir())


def test_tracing_leaves_other_files_in_the_folder_alone(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export.graph import trace_onnx
    from bge_edge.export.source import inspect_model, load_torch_modules

    (tmp_path / "notes.txt").write_text("mine")
    src = inspect_model(tiny_bert_dir, "tiny")
    trace_onnx(src, load_torch_modules(src), tmp_path / "traced.onnx")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "traced.onnx"]
