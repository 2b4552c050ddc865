"""Air-gapped bundles: build one for this machine (and win_amd64, to exercise per-target markers), install it
offline into a fresh venv with the network blocked, encode; tampering and unsafe archives are refused before
anything is installed; a missing wheel names the package and the platform.

"Network blocked" means: every install command runs in a fresh network namespace (`unshare -n`, only a
loopback interface that is down) when this machine allows it (root on Linux, as in CI), and always with
pip's index and proxies pointing at a closed local port; the installer itself passes `--no-index`.
`test_offline_commands_have_no_network` says which of the two is in force.

The build downloads wheels from the package index (pip's cache makes reruns fast); one bundle and one
install are shared by the module.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from bge_edge.bundle import BundleError, build_bundle, installer
from bge_edge.bundle.build import (
    _closure,
    _copy_artifact,
    _pip_error,
    _Pkg,
    _version_spread,
    _Wheel,
    _wheel_meta,
    host_platform,
    parse_target,
)
from bge_edge.cli import main

NAME = "tiny-bundle"
# Any network attempt fails: pip gets no index and a dead proxy; with root, a fresh network namespace too.
BLOCKED_NET = {"PIP_INDEX_URL": "http://127.0.0.1:9/", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


UNSHARE = ["unshare", "-n"] if sys.platform.startswith("linux") and _unshare_works() else []


def _offline(cmd: list, cwd: Path, cache: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(BLOCKED_NET, PYTHON=sys.executable, BGE_EDGE_CACHE_DIR=str(cache))
    return subprocess.run(UNSHARE + [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def built(bert_artifact: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    dist = tmp_path_factory.mktemp("dist")
    res = build_bundle(bert_artifact, dist / NAME, platforms=[host_platform(), "win_amd64"], precisions=["int8"],
                       archive=True, log=None)
    return dist, res


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    dist, _ = built
    site = tmp_path_factory.mktemp("site")
    r = _offline(["sh", dist / f"{NAME}.install.sh", "--venv", site / "env"], cwd=site, cache=site / "cache")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return site, site / NAME, site / "env", r


def test_offline_commands_have_no_network(tmp_path: Path) -> None:
    code = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    r = _offline([sys.executable, "-c", code], cwd=tmp_path, cache=tmp_path)
    assert r.returncode == 0, r.stderr
    if not UNSHARE:
        pytest.skip("no network namespace here (needs root and `unshare`); offline = pip --no-index + dead proxy")
    assert r.stdout.strip() == "['lo']"  # a fresh namespace: loopback only, no route anywhere


@pytest.mark.slow
def test_offline_install_encodes_without_torch(installed) -> None:  # type: ignore[no-untyped-def]
    site, bundle, venv, r = installed
    assert "extracted the archive safely" in r.stdout and "smoke-tested at int8" in r.stdout
    assert "first embedding" in r.stdout
    code = ("import importlib.util as u, json, bge_edge\n"
            "from bge_edge.runtime import Embedder\n"
            f"m = Embedder({str(bundle / 'artifact')!r})\n"
            "v = m.encode(['air-gapped', 'edge box on a ship'])['dense_vecs']\n"
            "print(json.dumps({'shape': list(v.shape), 'precision': m.precision, 'file': bge_edge.__file__,\n"
            "  'found': [n for n in ('torch', 'transformers', 'optimum', 'onnx') if u.find_spec(n)]}))\n")
    out = _offline([venv / "bin" / "python", "-c", code], cwd=site, cache=site / "cache")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["shape"] == [2, 32] and got["precision"] == "int8"
    assert got["found"] == []
    assert got["file"].startswith(str(venv))  # the installed wheel, not the source tree
    freeze = _offline([venv / "bin" / "python", "-m", "pip", "list", "--format=json"], cwd=site, cache=site)
    names = {d["name"].lower() for d in json.loads(freeze.stdout)}
    assert "bge-edge" in names and "onnxruntime" in names
    assert not [n for n in names if installer.is_forbidden(n)] and "colorama" not in names  # win32-only
    # the installed bge-edge carries the bundle code too: it verifies the bundle it came from
    v = _offline([venv / "bin" / "bge-edge", "verify", bundle], cwd=site, cache=site / "cache")
    assert v.returncode == 0 and v.stdout.startswith("ok: bundle"), v.stderr


@pytest.mark.slow
def test_bundle_contents(built, installed, bert_artifact: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    dist, res = built
    _, bundle, _, _ = installed
    assert [p.name for p in res.outputs] == [f"{NAME}.tar.gz", f"{NAME}.install.sh", f"{NAME}.install.ps1"]
    assert not list(dist.glob(".*bundle-tmp*")) and not (dist / NAME).exists()
    data = json.loads((bundle / "bundle.json").read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - {"bundle.json"} == set(data["files"])
    wheels = [n for n in data["files"] if n.startswith("wheels/")]
    assert all(n.endswith(".whl") for n in wheels) and any("bge_edge-" in n for n in wheels)
    assert not [n for n in wheels if installer.is_forbidden(n.split("/")[1].split("-")[0])]
    lock = (bundle / "requirements.lock").read_text()
    for n in wheels:
        assert f"--hash=sha256:{data['files'][n]['sha256']}" in lock, n
    colorama = next(line for line in lock.splitlines() if line.startswith("colorama=="))
    assert 'sys_platform == "win32"' in colorama  # pip's host markers miss it; the target closure adds it
    # only the int8 graph; the manifest is the exported one minus the fp32 graph's entries, nothing else changed
    man = json.loads((bundle / "artifact" / "manifest.json").read_text())
    orig = json.loads((bert_artifact / "manifest.json").read_text())
    assert man == {**orig, "graphs": [g for g in orig["graphs"] if g["precision"] == "int8"],
                   "files": {k: v for k, v in orig["files"].items() if k != "model.fp32.onnx"}}
    assert sorted(p.name for p in (bundle / "artifact").iterdir()) == sorted([*man["files"], "manifest.json"])
    assert data["artifact"]["source_manifest_sha256"] == installer.sha256_file(bert_artifact / "manifest.json")
    assert main(["verify", str(bundle)]) == 0
    assert main(["verify", str(dist / f"{NAME}.tar.gz")]) == 0
    assert capsys.readouterr().out.count("ok: bundle") == 2


def _tampered_copy(bundle: Path, dest: Path, rel: str) -> Path:
    """A copy of the bundle (hard links, cheap) with one byte flipped in ``rel`` (a real copy of that file)."""
    shutil.copytree(bundle, dest, copy_function=os.link)
    f = dest / rel
    data = bytearray(f.read_bytes())
    f.unlink()
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("which", ["wheel", "artifact", "lock"])
def test_tampered_bundle_is_refused_before_installing(installed, tmp_path: Path, which: str, capsys) -> None:  # type: ignore[no-untyped-def]
    _, bundle, _, _ = installed
    rel = {"wheel": next(p.relative_to(bundle).as_posix() for p in (bundle / "wheels").glob("numpy-*manylinux*")),
           "artifact": "artifact/model.int8.onnx", "lock": "requirements.lock"}[which]
    copy = _tampered_copy(bundle, tmp_path / "copy", rel)
    r = _offline(["sh", copy / "install.sh", "--venv", tmp_path / "env"], cwd=tmp_path, cache=tmp_path / "c")
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert rel in err and "refusing to install anything" in err, err
    assert not (tmp_path / "env").exists()  # nothing was installed, not even the venv
    assert "creating a virtual environment" not in r.stdout
    assert main(["verify", str(copy)]) == 2
    assert rel in capsys.readouterr().err


def _evil_tar(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        def add(name: str, data: bytes = b"x", **attrs) -> None:  # type: ignore[no-untyped-def]
            ti = tarfile.TarInfo(name)
            ti.size = len(data) if attrs.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for k, v in attrs.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if ti.size else None)
        add("b", type=tarfile.DIRTYPE)
        add("b/bundle.json", b"{}")
        if kind == "absolute":
            add("/tmp/evil-bge-edge")
        elif kind == "dotdot":
            add("b/../../evil")
        elif kind == "symlink":
            add("b/link", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        elif kind == "hardlink":
            add("b/hard", type=tarfile.LNKTYPE, linkname="b/bundle.json")
        elif kind == "device":
            add("b/dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        elif kind == "two-tops":
            add("c/other")
        elif kind == "duplicate":
            add("b/bundle.json", b"{ }")
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "hardlink", "device", "two-tops", "duplicate"])
def test_unsafe_archive_is_refused_before_writing(tmp_path: Path, kind: str) -> None:
    evil = _evil_tar(tmp_path / "evil.tar.gz", kind)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(installer.BundleInstallError, match="(?i)refusing|one folder|top-level"):
        installer.extract_archive(evil, out / "b")
    assert list(out.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_launcher_refuses_unsafe_archive(tmp_path: Path) -> None:
    script = tmp_path / "x.install.sh"
    from bge_edge.bundle.build import _render

    script.write_text(_render("install.sh", ["3.11"]))
    evil = _evil_tar(tmp_path / "x.tar.gz", "symlink")
    r = subprocess.run(["sh", str(script), "--check"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert r.returncode == 2 and "symbolic link" in r.stderr and evil.name in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.install.sh", "x.tar.gz"]


@pytest.mark.slow
def test_missing_wheel_names_package_and_platform(built, bert_artifact: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dist, _ = built
    with tarfile.open(dist / f"{NAME}.tar.gz") as tf:
        m = next(m for m in tf.getmembers() if "/wheels/bge_edge-" in m.name)
        (tmp_path / Path(m.name).name).write_bytes(tf.extractfile(m).read())  # type: ignore[union-attr]
    own = tmp_path / Path(m.name).name
    with pytest.raises(BundleError) as e:
        build_bundle(bert_artifact, tmp_path / "b", platforms=["manylinux_2_28_fake64"], wheel=own, log=None)
    msg = str(e.value)
    assert "manylinux_2_28_fake64" in msg and "no wheel of" in msg
    assert any(p in msg for p in ("numpy", "onnxruntime", "tokenizers")), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [own.name]  # nothing half-written
    with pytest.raises(BundleError, match=r"requires Python >=3\.9.*Python 3\.8"):
        build_bundle(bert_artifact, tmp_path / "b", pythons=["3.8"], wheel=own, log=None)


def test_cli_refusals_are_one_line(bert_artifact: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cases = [
        (["--precision", "fp16"], "no graph at precision fp16"),
        (["--extras", "export"], "[export] extra pulls torch"),
        (["--platform", "solaris_sparc"], "is not supported"),
        (["--python", "three"], "is not a CPython version"),
    ]
    for extra, text in cases:
        assert main(["bundle", str(bert_artifact), "--out", str(tmp_path / "b"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], err
    (tmp_path / "b").mkdir()
    assert main(["bundle", str(bert_artifact), "--out", str(tmp_path / "b")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2  # neither a bundle nor an artifact


def test_manylinux_targets_expand_like_pip_on_that_machine() -> None:
    t = parse_target("manylinux_2_28_aarch64", "3.11")
    assert t.pip_platforms[0] == "manylinux_2_28_aarch64" and "manylinux2014_aarch64" in t.pip_platforms
    assert "manylinux_2_17_aarch64" in t.pip_platforms and not any("manylinux1" in p for p in t.pip_platforms)
    x = parse_target("manylinux_2_28_x86_64", "3.12")
    assert "manylinux1_x86_64" in x.pip_platforms and "manylinux2010_x86_64" in x.pip_platforms
    w = parse_target("win_amd64", "3.11")
    assert (w.sys_platform, w.machine, w.pip_platforms) == ("win32", "AMD64", ("win_amd64",))
    assert parse_target("macosx_11_0_arm64", "3.11").macos == (11, 0)


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str], extras: tuple[str, ...] = ()) -> _Wheel:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return _Wheel(name, version, path, _wheel_meta(path))


def test_closure_uses_the_target_markers(tmp_path: Path) -> None:
    ws = {w.name: w for w in [
        _fake_wheel(tmp_path, "bge-edge", "1.0", ["numpy>=1", 'colorama; platform_system == "Windows"',
                                                   'starlette; extra == "serve"', 'uvloop; sys_platform != "win32"',
                                                   'httpx[http2]; extra == "serve"'], ("serve",)),
        _fake_wheel(tmp_path, "numpy", "2.0", []),
        _fake_wheel(tmp_path, "starlette", "1.0", []),
        _fake_wheel(tmp_path, "uvloop", "1.0", []),
        _fake_wheel(tmp_path, "httpx", "1.0", ['h2; extra == "http2"']),
        _fake_wheel(tmp_path, "h2", "1.0", []),
    ]}
    linux, win = parse_target("manylinux_2_28_x86_64", "3.11"), parse_target("win_amd64", "3.11")
    pk, missing = _closure("bge-edge", [], ws, linux)
    assert set(pk) == {"bge-edge", "numpy", "uvloop"} and not missing
    pk, missing = _closure("bge-edge", ["serve"], ws, win)
    assert set(pk) == {"bge-edge", "numpy", "starlette", "httpx", "h2"} and missing == {"colorama"}
    assert pk["h2"].required_by == "httpx"
    ws["numpy"] = _fake_wheel(tmp_path, "numpy", "0.9", [])
    assert "numpy>=1" in _closure("bge-edge", [], ws, linux)[1]  # a version the requirement rejects is missing


def test_verify_refuses_unlisted_files_and_wrong_expected_hash(tmp_path: Path) -> None:
    root = tmp_path / "b"
    (root / "wheels").mkdir(parents=True)
    (root / "wheels" / "a-1-py3-none-any.whl").write_bytes(b"wheel")
    h = installer.sha256_file(root / "wheels" / "a-1-py3-none-any.whl")
    (root / "requirements.lock").write_text(f"a==1 \\\n    --hash=sha256:{h}\n")
    files = {rel: {"size": (root / rel).stat().st_size, "sha256": installer.sha256_file(root / rel)}
             for rel in ("wheels/a-1-py3-none-any.whl", "requirements.lock")}
    (root / "bundle.json").write_text(json.dumps({"format": "bge-edge-bundle", "schema_version": 1,
                                                  "files": files}))
    installer.verify_bundle(root)
    with pytest.raises(installer.BundleInstallError, match="expected 0+"):
        installer.verify_bundle(root, expect_sha256="0" * 64)
    (root / "wheels" / "b-1-py3-none-any.whl").write_bytes(b"sneaked in")
    with pytest.raises(installer.BundleInstallError, match="b-1-py3-none-any.whl is not listed"):
        installer.verify_bundle(root)
    (root / "wheels" / "b-1-py3-none-any.whl").unlink()
    os.symlink("/etc/hostname", root / "wheels" / "c.whl")
    with pytest.raises(installer.BundleInstallError, match="c.whl is not listed"):
        installer.verify_bundle(root)


def test_machine_must_match_a_target() -> None:
    data = {"targets": [parse_target("win_amd64", "3.11").to_json(),
                        parse_target("manylinux_2_28_x86_64", "3.12").to_json()]}
    here = {"sys_platform": "linux", "machine": "x86_64", "python": "3.12", "implementation": "cpython",
            "glibc": (2, 36), "macos": ""}
    assert installer.match_target(data, here)["platform"] == "manylinux_2_28_x86_64"
    with pytest.raises(installer.BundleInstallError, match=r"glibc 2\.17 < 2\.28"):
        installer.match_target(data, {**here, "glibc": (2, 17)})
    with pytest.raises(installer.BundleInstallError, match=r"Python 3\.11 != 3\.12"):
        installer.match_target(data, {**here, "python": "3.11"})


def test_all_precisions_keep_the_manifest_byte_for_byte(bert_artifact: Path, tmp_path: Path) -> None:
    info = _copy_artifact(bert_artifact, tmp_path / "a", ["int8", "fp32"], lambda _m: None)
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (bert_artifact / "manifest.json").read_bytes()
    assert info["filtered"] is False and info["precisions"] == ["fp32", "int8"]


# What pip (23 to 26) prints when a dependency two levels down has no wheel for the target: only a conflict.
PIP_CONFLICT = """Collecting tokenizers>=0.15 (from bge-edge==0.1.0)
ERROR: Cannot install bge-edge==0.1.0 and tokenizers because these package versions have conflicting dependencies.

The conflict is caused by:
    tokenizers 0.23.3 depends on huggingface-hub<2.0,>=0.16.4
    huggingface-hub 0.36.0 depends on pyyaml>=5.1
    huggingface-hub 0.35.0 depends on pyyaml>=5.1

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_a_dependency_without_a_wheel_is_named_not_reported_as_a_conflict() -> None:
    target = parse_target("win_arm64", "3.11")
    asked: list[str] = []

    def probe(name: str) -> bool:
        asked.append(name)
        return name != "pyyaml"

    msg = _pip_error(PIP_CONFLICT, target, probe)
    assert msg.startswith("no wheel of pyyaml (required by huggingface-hub <- tokenizers) for platform win_arm64, "
                          "Python 3.11"), msg
    assert asked == ["huggingface-hub", "pyyaml"]
    # every dependency has a wheel: a real version conflict, reported as pip said it
    assert "ResolutionImpossible" in _pip_error(PIP_CONFLICT, target, lambda _n: True)
    direct = "ERROR: Could not find a version that satisfies the requirement onnxruntime>=1.17 (from bge-edge) " \
             "(from versions: none)\nERROR: No matching distribution found for onnxruntime>=1.17\n"
    msg = _pip_error(direct, parse_target("musllinux_1_2_x86_64", "3.11"))
    assert msg.startswith("no wheel of onnxruntime>=1.17 (required by bge-edge) for platform musllinux_1_2_x86_64")


def test_targets_that_get_older_versions_are_noted() -> None:
    mac, linux = parse_target("macosx_11_0_arm64", "3.11"), parse_target("manylinux_2_28_x86_64", "3.11")

    def pkgs(ort: str) -> dict:
        versions = [("numpy", "2.4"), ("onnxruntime", ort)]
        return {n: _Pkg(n, v, Path(f"{n}-{v}.whl"), frozenset(), "") for n, v in versions}

    notes = _version_spread([mac, linux], {mac.id: pkgs("1.19.2"), linux.id: pkgs("1.32.0")})
    assert len(notes) == 1 and "onnxruntime resolves to 1.19.2 for macosx_11_0_arm64-cp311; 1.32.0 for " \
                               "manylinux_2_28_x86_64-cp311" in notes[0]
    assert _version_spread([mac, linux], {mac.id: pkgs("1.32.0"), linux.id: pkgs("1.32.0")}) == []
