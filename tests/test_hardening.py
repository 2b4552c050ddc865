"""Hardening (issue 17): what a hostile or careless user can do to export, the runtime, the server and the
installer, each written as the behaviour it must have. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bge_edge.runtime.errors import ArtifactError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _copy_source(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    (dest / "my-notes.txt").write_text("the user's own file")
    return dest


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. --force never deletes what export did not write ------------------------------------------------


def test_force_refuses_to_replace_the_source_model(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    src = _copy_source(tiny_bert_dir, tmp_path / "src")
    before = _snapshot(src)
    with pytest.raises(ExportError, match="not a bge-edge artifact|source model"):
        export_model(src, src, ["fp32"], force=True, quiet=True)
    assert _snapshot(src) == before


def test_force_refuses_to_replace_the_folder_holding_the_models(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    models = tmp_path / "models"
    src = _copy_source(tiny_bert_dir, models / "src")
    _copy_source(tiny_bert_dir, models / "sibling")
    before = _snapshot(models)
    with pytest.raises(ExportError, match="contains the source model folder"):
        export_model(src, models, ["fp32"], force=True, quiet=True)
    assert _snapshot(models) == before


def test_force_refuses_an_artifact_that_contains_the_source(tiny_bert_dir: Path, bert_artifact: Path,
                                                           tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    src = _copy_source(tiny_bert_dir, art / "src")
    with pytest.raises(ExportError, match="contains the source model folder"):
        export_model(src, art, ["fp32"], force=True, quiet=True)
    assert (src / "my-notes.txt").is_file() and (art / "manifest.json").is_file()


def test_force_refuses_an_artifact_holding_files_its_manifest_does_not_list(tiny_bert_dir: Path,
                                                                            bert_artifact: Path,
                                                                            tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    (art / "results.csv").write_text("mine")
    with pytest.raises(ExportError, match=r"does not list \(results.csv\)"):
        export_model(tiny_bert_dir, art, ["fp32"], force=True, quiet=True)
    assert (art / "results.csv").read_text() == "mine"


# ---- 2. the final rename never clobbers what appeared during the export ----------------------------------


def test_a_folder_created_at_out_during_the_export_is_left_alone(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    out = tmp_path / "out"

    def someone_writes_out(step: str) -> None:
        if step == "fused":
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")

    with pytest.raises(ExportError, match="appeared while exporting"):
        export_model(tiny_bert_dir, out, ["fp32"], quiet=True, _after_step=someone_writes_out)
    assert (out / "theirs.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing half-written left


def test_force_replaces_only_the_artifact_it_checked(tiny_bert_dir: Path, bert_artifact: Path,
                                                     tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    out = tmp_path / "out"
    shutil.copytree(bert_artifact, out)

    def swap(step: str) -> None:  # the checked artifact goes, a user folder takes its place
        if step == "fused":
            shutil.rmtree(out)
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")

    with pytest.raises(ExportError, match="appeared while exporting"):
        export_model(tiny_bert_dir, out, ["fp32"], force=True, quiet=True, _after_step=swap)
    assert (out / "theirs.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_kill_between_the_two_renames_of_force_keeps_the_old_artifact(bert_artifact: Path,
                                                                        tmp_path: Path) -> None:
    from bge_edge.export import ExportError, export_model

    pid = _dead_pid()  # the killed export: its old artifact moved aside, its new one not yet in place
    shutil.copytree(bert_artifact, tmp_path / f".bge-edge-export-old-out-{pid}")
    shutil.copytree(bert_artifact, tmp_path / f".bge-edge-export-out-{pid}")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="already exists"):  # the next export finds the old artifact back
        export_model("/nonexistent-model", out, ["fp32"], quiet=True)
    assert _snapshot(out) == _snapshot(bert_artifact)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces_an_artifact(tiny_bert_dir: Path, bert_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.export import export_model
    from bge_edge.runtime import read_manifest

    out = tmp_path / "out"
    shutil.copytree(bert_artifact, out)
    (out / "model.int8.onnx").write_bytes(b"stale")  # a listed file: part of the artifact, so replaceable
    export_model(tiny_bert_dir, out, ["fp32"], force=True, quiet=True)
    assert {g.precision for g in read_manifest(out).graphs} == {"fp32"} and not (out / "model.int8.onnx").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ---- 6. every malformed manifest value is refused with its field's path -----------------------------------


def _mutated(manifest: dict, path: str, value: object) -> dict:
    d = json.loads(json.dumps(manifest))
    *parents, last = path.split("/")
    node = d
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


MALFORMED = [  # (field path in the manifest, bad value, what the error must name)
    ("graphs", [None], "graphs[0] must be an object, got null"),
    ("files/tokenizer.json", None, "files['tokenizer.json'] must be an object"),
    ("special_tokens/pad", "abc", "special_tokens.pad must be an integer"),
    ("special_tokens/pad", [1], "special_tokens.pad must be an integer"),
    ("special_tokens/pad", 10**30, "special_tokens.pad must be an integer"),
    ("graphs/0/external_data", 5, "graphs[0].external_data must be an array"),
    ("graphs/0/external_data", ["../../etc/passwd"], "graphs[0].external_data[0]"),
    ("graphs/0/quantization", 5, "graphs[0].quantization must be an object"),
    ("graphs/0/accuracy", [1, 2], "graphs[0].accuracy must be an object"),
    ("graphs/0/opset", "17", "graphs[0].opset must be an integer"),
    ("graphs/0/fused", "yes", "graphs[0].fused must be true or false"),
    ("exporter", "x", "exporter must be an object"),
    ("source", None, "source must be an object"),
    ("hidden_size", 10**12, "hidden_size must be an integer from 1 to 65,536"),
    ("hidden_size", -5, "hidden_size must be an integer"),
    ("hidden_size", 0, "hidden_size must be an integer"),
    ("hidden_size", 32.0, "hidden_size must be an integer"),
    ("attention_heads", True, "attention_heads must be an integer"),
    ("max_length", 0, "max_length must be an integer from 2"),
    ("max_length", -1, "max_length must be an integer from 2"),
    ("heads", ["dense", "dense"], "heads[1] repeats 'dense'"),
    ("tokenizer", 5, "tokenizer must be a file path"),
    ("created", 5, "created must be a string"),
]


@pytest.mark.parametrize(("field", "value", "message"), MALFORMED, ids=[f"{f}={v!r:.20}" for f, v, _ in MALFORMED])
def test_malformed_manifest_value_is_refused_with_its_field(bert_artifact: Path, tmp_path: Path, field: str,
                                                            value: object, message: str) -> None:
    from bge_edge.runtime import read_manifest

    good = json.loads((bert_artifact / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(_mutated(good, field, value)))
    with pytest.raises(ArtifactError) as e:
        read_manifest(tmp_path)
    assert message in str(e.value) and "Re-export" in str(e.value)


def test_every_malformed_field_is_listed_at_once(bert_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.runtime import read_manifest

    d = json.loads((bert_artifact / "manifest.json").read_text())
    for field, value in (("hidden_size", 0), ("max_length", -1), ("exporter", "x")):
        d = _mutated(d, field, value)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="hidden_size .*max_length .*exporter"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("raw", ["[" * 100_000 + "]" * 100_000,
                                 '{"schema_version": 1, "hidden_size": ' + "9" * 5000 + "}"],
                         ids=["100k-deep", "5000-digit-integer"])
def test_manifest_json_that_python_cannot_decode_is_refused(tmp_path: Path, raw: str) -> None:
    from bge_edge.runtime import read_manifest

    (tmp_path / "manifest.json").write_text(raw)
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("command", ["info", "verify", "encode"])
def test_cli_says_one_line_for_a_malformed_manifest(bert_artifact: Path, tmp_path: Path, command: str,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from bge_edge.cli import main

    art = tmp_path / "art"
    shutil.copytree(bert_artifact, art)
    d = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(_mutated(d, "special_tokens/pad", "abc")))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main([command, str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bge-edge: error: manifest.json is malformed: special_tokens.pad") and err.count("\n") == 1


# ---- 4. cache problems cost a re-hash; an unreadable artifact file is named ------------------------------


def _as_other_user(tmp_root: Path) -> list[str]:
    """The command prefix that runs Python as an unprivileged user (root ignores permission bits)."""
    if os.geteuid() != 0:
        return [sys.executable]
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot be tested")
    for p in [tmp_root, *tmp_root.rglob("*")]:
        os.chown(p, 65534, 65534, follow_symlinks=False)
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]


@pytest.fixture()
def world_tmp() -> Path:
    """A folder under /tmp that an unprivileged user can enter (pytest's tmp_path is private to root)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="bge-edge-hardening-"))
    base.chmod(0o755)
    yield base  # type: ignore[misc]
    shutil.rmtree(base, ignore_errors=True)


LOAD = ("import sys\nfrom bge_edge.runtime import Embedder\nfrom bge_edge.runtime.errors import BgeEdgeError\n"
        "try:\n    m = Embedder(sys.argv[1], precision='fp32', hash_cache=sys.argv[2])\n"
        "    print('loaded', m.encode('hello')['dense_vecs'].shape)\n"
        "except BgeEdgeError as e:\n    print(type(e).__name__, e)\n")


def test_an_unreadable_hash_cache_folder_only_costs_a_rehash(bert_artifact: Path, world_tmp: Path) -> None:
    art, cache = world_tmp / "art", world_tmp / "cache"
    shutil.copytree(bert_artifact, art)
    (cache / "verified").mkdir(parents=True)
    cmd = _as_other_user(world_tmp)
    cache.chmod(0o700)
    (cache / "verified").chmod(0o000)
    r = subprocess.run([*cmd, "-c", LOAD, str(art), str(cache)], capture_output=True, text=True, timeout=120,
                       cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("loaded (32,)"), r.stdout + r.stderr


def test_an_unreadable_artifact_file_is_an_artifact_error_naming_it(bert_artifact: Path, world_tmp: Path) -> None:
    art = world_tmp / "art"
    shutil.copytree(bert_artifact, art)
    cmd = _as_other_user(world_tmp)
    (art / "model.fp32.onnx").chmod(0o000)
    r = subprocess.run([*cmd, "-c", LOAD, str(art), str(world_tmp / "cache")], capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ArtifactError cannot read 'model.fp32.onnx'") and "permission" in r.stdout.lower()


# ---- 10. the hash cache is per user and tied to the manifest ---------------------------------------------


def _tamper_and_forge(art: Path, cache: Path, manifest_sha256: str | None) -> None:
    """Alter the fp32 graph (same size), then write a cache entry claiming it matches the manifest."""
    from bge_edge.runtime import read_manifest
    from bge_edge.runtime.integrity import _cache_file, _manifest_digest, _stamp

    m = read_manifest(art)
    graph = art / "model.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    forged = {name: {"stamp": _stamp((art / name).stat()), "sha256": e.sha256} for name, e in m.files.items()}
    cpath = _cache_file(cache, art)
    cpath.parent.mkdir(parents=True, exist_ok=True)
    cpath.write_text(json.dumps({"manifest_sha256": manifest_sha256 or _manifest_digest(m), "files": forged}))


def test_a_cache_folder_other_users_can_write_is_not_trusted(bert_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.runtime import Embedder
    from bge_edge.runtime.errors import IntegrityError

    art, cache = tmp_path / "art", tmp_path / "cache"
    shutil.copytree(bert_artifact, art)
    _tamper_and_forge(art, cache, None)
    (cache / "verified").chmod(0o777)
    with pytest.warns(RuntimeWarning, match="can be written by other users"), \
            pytest.raises(IntegrityError, match="model.fp32.onnx' has SHA-256"):
        Embedder(art, precision="fp32", hash_cache=cache)


def test_cache_entries_made_for_another_manifest_are_not_trusted(bert_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.runtime import Embedder
    from bge_edge.runtime.errors import IntegrityError

    art, cache = tmp_path / "art", tmp_path / "cache"
    shutil.copytree(bert_artifact, art)
    _tamper_and_forge(art, cache, "0" * 64)
    with pytest.raises(IntegrityError, match="model.fp32.onnx' has SHA-256"):
        Embedder(art, precision="fp32", hash_cache=cache)


def test_the_cache_is_created_private_and_used(bert_artifact: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import stat

    from bge_edge.runtime import Embedder, integrity

    cache = tmp_path / "cache"
    Embedder(bert_artifact, precision="fp32", hash_cache=cache)
    assert stat.S_IMODE((cache / "verified").stat().st_mode) == 0o700
    monkeypatch.setattr(integrity, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    Embedder(bert_artifact, precision="fp32", hash_cache=cache)


# ---- 9. small API edges are clear InputErrors --------------------------------------------------------------


@pytest.fixture(scope="module")
def m3_embedder(m3_artifact: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from bge_edge.runtime import Embedder

    return Embedder(m3_artifact, precision="fp32", hash_cache=tmp_path_factory.mktemp("hc"))


def test_count_tokens_of_one_string_counts_the_string_not_its_characters(m3_embedder) -> None:  # type: ignore[no-untyped-def]
    n = m3_embedder.count_tokens("abc")
    assert isinstance(n, int) and n == m3_embedder.count_tokens(["abc"])[0]


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m.count_tokens(None), "texts must be a string or a list of strings"),
    (lambda m: m.convert_id_to_token({"abc": 1}), "key 'abc' is not a token id"),
    (lambda m: m.convert_id_to_token({"-1": 1}), "key '-1' is not a token id"),
    (lambda m: m.convert_id_to_token({"99999999999999999999": 1}), "is not a token id"),
    (lambda m: m.convert_id_to_token([None]), r"lexical_weights\[0\] must be a dict"),
    (lambda m: m.convert_id_to_token("abc"), "lexical_weights must be a dict or a list of dicts"),
    (lambda m: m.compute_score(("q", "p"), max_query_length="long"), "max_query_length must be an integer"),
    (lambda m: m.encode("x", return_dense="no"), "return_dense must be True or False"),
    (lambda m: m.encode("x", return_sparse=1), "return_sparse must be True or False"),
    (lambda m: m.encode("x", max_batch_tokens=True), "max_batch_tokens must be a positive integer"),
], ids=["count_tokens(None)", "id-abc", "id-minus-1", "id-huge", "list-of-None", "str", "max_query_length-str",
        "return_dense-no", "return_sparse-1", "max_batch_tokens-True"])
def test_bad_arguments_are_input_errors(m3_embedder, call, message: str) -> None:  # type: ignore[no-untyped-def]
    from bge_edge.runtime.errors import InputError

    with pytest.raises(InputError, match=message):
        call(m3_embedder)


def test_compute_score_max_length_none_means_the_models_own(m3_embedder) -> None:  # type: ignore[no-untyped-def]
    a = m3_embedder.compute_score(("query", "passage"), max_query_length=None, max_passage_length=None)
    b = m3_embedder.compute_score(("query", "passage"))
    assert a == pytest.approx(b)


# ---- 7, 11. graphs that do not match their manifest ----------------------------------------------------------


def _graph(width: int, nan: bool = False, external: str | None = None, path: Path | None = None):  # type: ignore[no-untyped-def]
    """A dense-only ONNX graph: every text -> a constant row of ``width`` ones (NaN with ``nan``)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["m", "axis"], ["s"], keepdims=1),
             helper.make_node("Sub", ["s", "s"], ["z"]),
             helper.make_node("Div", ["z", "z"], ["v"]) if nan else helper.make_node("Add", ["z", "one"], ["v"]),
             helper.make_node("Mul", ["v", "row"], ["dense"])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axis"),
             numpy_helper.from_array(np.ones((1, 1), np.float32), "one"),
             numpy_helper.from_array(np.ones((1, width), np.float32), "row")]
    io = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
          for n in ("input_ids", "attention_mask")]
    g = helper.make_graph(nodes, "g", io, [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["batch", None])],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert path is not None
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=64)  # the (1, width) row; shape inputs stay inline
    else:
        onnx.save_model(model, str(path))
    return path


def _artifact_with_graph(base: Path, dest: Path, **graph_args: object) -> Path:
    """``base`` (a dense artifact) with its fp32 graph replaced by ``_graph(**graph_args)``, manifest re-hashed."""
    from bge_edge.runtime.integrity import sha256_file

    shutil.copytree(base, dest)
    _graph(path=dest / "model.fp32.onnx", **graph_args)  # type: ignore[arg-type]
    m = json.loads((dest / "manifest.json").read_text())
    m["graphs"] = [dict(g, external_data=[]) for g in m["graphs"] if g["precision"] == "fp32" and g["format"] == "onnx"]
    m["files"] = {name: {"size": (dest / name).stat().st_size, "sha256": sha256_file(dest / name)}
                  for name in ("tokenizer.json", "model.fp32.onnx")}
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def test_a_graph_whose_output_width_is_not_the_hidden_size_is_refused(bert_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.runtime import Embedder

    hidden = json.loads((bert_artifact / "manifest.json").read_text())["hidden_size"]
    art = _artifact_with_graph(bert_artifact, tmp_path / "art", width=hidden + 3)
    with pytest.raises(ArtifactError, match=rf"'dense' output of shape \('batch', {hidden + 3}\), but its manifest "
                                            rf"says \('\?', {hidden}\)"):
        Embedder(art, precision="fp32", hash_cache=False)  # refused at load: no broadcast error at encode


def test_output_shapes_are_checked_on_every_batch(bert_artifact: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from bge_edge.runtime import Embedder

    hidden = json.loads((bert_artifact / "manifest.json").read_text())["hidden_size"]
    m = Embedder(bert_artifact, precision="fp32", hash_cache=False)
    monkeypatch.setattr(m, "_session", type("Wide", (), {"run": lambda self, names, feeds: [
        np.zeros((len(feeds["input_ids"]), hidden + 1), np.float32)]})())
    with pytest.raises(ArtifactError, match=rf"'dense' output of shape \(2, {hidden + 1}\), but its manifest says "
                                            rf"\(2, {hidden}\)"):
        m.encode(["a", "b"])


def test_a_graph_emitting_nan_is_refused_in_the_library_and_the_cli(bert_artifact: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from bge_edge.runtime import Embedder
    from bge_edge.runtime.errors import BackendError

    from bge_edge.cli import main

    hidden = json.loads((bert_artifact / "manifest.json").read_text())["hidden_size"]
    art = _artifact_with_graph(bert_artifact, tmp_path / "art", width=hidden, nan=True)
    with pytest.raises(BackendError, match=r"NaN or infinite values in its 'dense' output for texts\[0\], texts\[1\]"):
        Embedder(art, precision="fp32", hash_cache=False).encode(["a", "b"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    assert main(["encode", str(art), "--precision", "fp32"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "NaN or infinite" in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize("location", ["weights.bin", "../data1.bin"])
def test_a_graph_reading_external_data_the_manifest_does_not_list_is_refused(bert_artifact: Path, tmp_path: Path,
                                                                             location: str) -> None:
    from bge_edge.runtime import Embedder
    from bge_edge.runtime.errors import IntegrityError
    from bge_edge.runtime.integrity import sha256_file

    from bge_edge.cli import main

    hidden = json.loads((bert_artifact / "manifest.json").read_text())["hidden_size"]
    saved = "x" * (len(location) - len("data1.bin")) + "data1.bin" if location.startswith("..") else location
    art = _artifact_with_graph(bert_artifact, tmp_path / "art", width=hidden, external=saved)
    if saved != location:  # onnx refuses to write '..': point the saved graph there byte for byte
        (art / saved).rename(art / location)
        graph = art / "model.fp32.onnx"
        graph.write_bytes(graph.read_bytes().replace(saved.encode(), location.encode()))
        m = json.loads((art / "manifest.json").read_text())
        m["files"]["model.fp32.onnx"]["sha256"] = sha256_file(graph)
        (art / "manifest.json").write_text(json.dumps(m))
    assert (art / location).is_file()  # the file is there: only the manifest's word keeps it out
    with pytest.raises(IntegrityError, match=f"refers to the external-data file '{location}', which its manifest"):
        Embedder(art, precision="fp32", hash_cache=False)
    assert main(["verify", str(art)]) == 2


def test_external_data_the_manifest_lists_loads(bert_artifact: Path, tmp_path: Path) -> None:
    from bge_edge.runtime import Embedder
    from bge_edge.runtime.integrity import sha256_file

    hidden = json.loads((bert_artifact / "manifest.json").read_text())["hidden_size"]
    art = _artifact_with_graph(bert_artifact, tmp_path / "art", width=hidden, external="model.fp32.onnx.data")
    m = json.loads((art / "manifest.json").read_text())
    m["graphs"][0]["external_data"] = ["model.fp32.onnx.data"]
    data = art / "model.fp32.onnx.data"
    m["files"]["model.fp32.onnx.data"] = {"size": data.stat().st_size, "sha256": sha256_file(data)}
    (art / "manifest.json").write_text(json.dumps(m))
    assert Embedder(art, precision="fp32", hash_cache=False).encode("a")["dense_vecs"].shape == (hidden,)


# ---- 12. the installer holds artifact.path to the rules of every bundle path -------------------------------


def _tiny_bundle(root: Path, artifact: object) -> Path:
    from bge_edge.bundle import installer

    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "a-1-py3-none-any.whl").write_bytes(b"wheel")
    h = installer.sha256_file(root / "wheels" / "a-1-py3-none-any.whl")
    (root / "requirements.lock").write_text(f"a==1 \\\n    --hash=sha256:{h}\n")
    (root / "artifact").mkdir()
    (root / "artifact" / "manifest.json").write_text("{}")
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": installer.sha256_file(root / rel)}
             for rel in ("wheels/a-1-py3-none-any.whl", "requirements.lock", "artifact/manifest.json")}
    (root / "bundle.json").write_text(json.dumps({"format": "bge-edge-bundle", "schema_version": 1,
                                                  "files": files, "artifact": artifact}))
    return root


@pytest.mark.parametrize(("artifact", "message"), [
    ({"path": "../elsewhere"}, "artifact.path '../elsewhere' is not a plain relative path"),
    ({"path": "/opt/models/m3"}, "artifact.path '/opt/models/m3' is not a plain relative path"),
    ({"path": "wheels"}, "not an artifact folder of this bundle"),
    ({"path": 5}, "artifact.path is not a string"),
    ({"path": "artifact", "smoke_precision": "--help"}, "smoke_precision"),
    ("artifact", "'artifact' is not an object"),
], ids=["dotdot", "absolute", "unlisted", "not-a-string", "smoke-precision", "not-an-object"])
def test_the_installer_refuses_an_artifact_path_outside_the_bundle(tmp_path: Path, artifact: object,
                                                                   message: str) -> None:
    from bge_edge.bundle import installer

    root = _tiny_bundle(tmp_path / "b", artifact)
    with pytest.raises(installer.BundleInstallError, match=message):
        installer.verify_bundle(root)
    with pytest.raises(installer.BundleInstallError, match=message):  # install re-checks what it is given
        installer.install(root, tmp_path / "venv", json.loads((root / "bundle.json").read_text()))
    assert not (tmp_path / "venv").exists()


def test_a_bundle_with_its_artifact_inside_is_accepted(tmp_path: Path) -> None:
    from bge_edge.bundle import installer

    installer.verify_bundle(_tiny_bundle(tmp_path / "b", {"path": "artifact", "smoke_precision": "int8"}))


# ---- 3. a long text costs memory in proportion to the max length, not to its size ----------------------------


def _english(chars: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = "science protein cell gene study results patients effect treatment data model passage".split()
    out, n = [], 0
    while n < chars:
        w = rng.choice(words)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


@pytest.mark.parametrize("kind", ["english", "no-spaces", "cjk"])
def test_truncating_tokenisation_keeps_the_tokens_of_the_whole_text(m3_embedder, kind: str) -> None:  # type: ignore[no-untyped-def]
    text = {"english": _english(200_000), "no-spaces": "ab" * 100_000,
            "cjk": "模型将每个段落编码为稠密稀疏和多向量表示以便检索" * 8_000}[kind]
    full = m3_embedder._tokenizer.encode(text).ids
    for max_length in (64, 512, 8192):
        got = m3_embedder._tokenize([text], max_length)[0]
        want = full[: max_length - 1] + full[-1:]
        assert list(got) == want and got.truncated, (kind, max_length)


def test_counting_a_huge_text_reads_only_what_the_limit_needs(m3_embedder,  # type: ignore[no-untyped-def]
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from bge_edge.runtime.embedder import MAX_CHARS_PER_TOKEN

    read: list[int] = []
    real = m3_embedder._encode_all
    monkeypatch.setattr(m3_embedder, "_encode_all", lambda items: read.extend(map(len, items)) or real(items))
    text = _english(1_950_000)
    n = m3_embedder.count_tokens(text, limit=512)
    assert n > 512 and sum(read) < 512 * MAX_CHARS_PER_TOKEN  # the text: 1.95 M characters, not read
    read.clear()
    assert m3_embedder.count_tokens("x" * 1_950_000, limit=512) == 513  # no tokens to be found: cut unread
    assert sum(read) <= 2 * 512 * MAX_CHARS_PER_TOKEN
    short = _english(3_000)
    assert m3_embedder.count_tokens(short, limit=8192) == m3_embedder.count_tokens(short)  # exact under the limit
    res = m3_embedder.encode(text, max_length=64)
    assert res["dense_vecs"].shape == (32,) and m3_embedder.last_stats.truncated == 1


# ---- 3, 8. the server: oversize bodies, disconnects, settings --------------------------------------------------


def test_a_body_over_the_byte_limit_gets_its_413_not_a_connection_reset(bert_artifact: Path) -> None:
    import http.client

    from test_serve_process import serve  # type: ignore[import-not-found]

    with serve(bert_artifact, "--max-request-bytes", "100000") as s:
        host, port = s.url.rsplit("/", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = b'{"input": "' + b"a" * 50_000_000 + b'"}'  # 50 MB, sent while the server has already refused it
        conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413 and r.getheader("Connection") == "close"
        assert json.loads(r.read())["error"]["code"] == "payload_too_large"
        conn.close()
        assert httpx_get(s.url + "/health") == 200  # and the server goes on


def httpx_get(url: str) -> int:
    import httpx

    return httpx.get(url, timeout=10).status_code


def test_a_client_that_disconnects_mid_body_is_counted_as_a_disconnect_not_a_500(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio
    import logging

    from test_serve import make, running  # type: ignore[import-not-found]

    app, _ = make()

    async def main() -> str:
        async with running(app) as c:
            incoming = [{"type": "http.request", "body": b'{"inputs": "half a bo', "more_body": True},
                        {"type": "http.disconnect"}]
            sent: list[dict] = []

            async def receive() -> dict:
                return incoming.pop(0) if incoming else {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/embed", "raw_path": b"/embed", "query_string": b"", "root_path": "",
                     "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")],
                     "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
            await app(scope, receive, send)
            return (await c.get("/metrics")).text

    with caplog.at_level(logging.INFO, logger="bge_edge.serve"):
        metrics = asyncio.run(main())
    assert 'bge_edge_requests_total{endpoint="/embed",code="499"} 1' in metrics
    assert 'bge_edge_client_disconnects_total{endpoint="/embed"} 1' in metrics
    assert 'code="500"' not in metrics and 'status="500"' not in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 1e9])
def test_shutdown_timeout_must_be_a_finite_number_of_seconds(value: float) -> None:
    from bge_edge.serve import ConfigError, ServeConfig

    with pytest.raises(ConfigError, match="--shutdown-timeout must be a finite number of seconds from 0 to 86,400"):
        ServeConfig(shutdown_timeout=value).check()


def test_serve_cli_refuses_an_infinite_shutdown_timeout_in_one_line(bert_artifact: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from bge_edge.cli import main

    assert main(["serve", str(bert_artifact), "--shutdown-timeout", "inf"]) == 2
    err = capsys.readouterr().err
    assert "--shutdown-timeout must be a finite number" in err and err.count("\n") == 1


# ---- 5. a full disk or a file-size limit: one clear message, refused early when it clearly cannot fit -----------


def test_export_refuses_early_when_the_disk_clearly_cannot_hold_it(tiny_bert_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    from bge_edge.export import ExportError, export_model, pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(ExportError, match=r"needs about .* free at .* and 1.0 MB is free"):
        export_model(tiny_bert_dir, tmp_path / "out", ["fp32", "int8"], quiet=True,
                     _after_step=lambda step: pytest.fail("started exporting"))
    assert list(tmp_path.iterdir()) == []


def test_export_under_a_small_ulimit_f_is_refused_in_one_line(tiny_bert_dir: Path, tmp_path: Path) -> None:
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    r = subprocess.run([sys.executable, "-m", "bge_edge.cli", "export", str(tiny_bert_dir), "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 2 and "ulimit -f" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("failure", "free", "message"), [
    (OSError(28, "No space left on device"), 10**9, "the disk filled up during the export"),
    (OSError(27, "File too large"), 10**9, "the export hit the file size limit"),
    (RuntimeError("onnx: [ONNXRuntimeError] ... No space left on device"), 10**9, "the disk filled up"),
    (ValueError("Error parsing message (protobuf DecodeError)"), 10**6, "the disk filled up"),
], ids=["ENOSPC", "EFBIG", "wrapped", "decode-error-at-low-space"])
def test_a_disk_filling_during_the_export_is_one_clear_error(tiny_bert_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, failure: Exception,
                                                             free: int, message: str) -> None:
    from collections import namedtuple

    from bge_edge.export import ExportError, export_model, pipeline

    usage = namedtuple("usage", "total used free")

    def fill(step: str) -> None:
        if step == "traced":
            monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(10**10, 10**10 - free, free))
            raise failure

    with pytest.raises(ExportError, match=message):
        export_model(tiny_bert_dir, tmp_path / "out", ["fp32"], quiet=True, _after_step=fill)
    assert list(tmp_path.iterdir()) == []


def test_an_ordinary_failure_with_room_on_the_disk_is_not_called_a_full_disk(tiny_bert_dir: Path,
                                                                              tmp_path: Path) -> None:
    from bge_edge.export import export_model

    def fail(step: str) -> None:
        if step == "traced":
            raise ValueError("some bug")

    with pytest.raises(ValueError, match="some bug"):
        export_model(tiny_bert_dir, tmp_path / "out", ["fp32"], quiet=True, _after_step=fail)
