"""Standalone installer for a bge-edge air-gapped bundle: standard library only, Python >= 3.8.

``install.sh`` and ``install.ps1`` embed this file verbatim and run it with the target machine's Python
(nothing else is installed there yet); ``bge-edge verify BUNDLE`` imports it. The order is fixed:

1. (archive) validate every tar member (relative path, no ``..``, no links, no devices) before writing
   anything, extract into a temporary folder beside the destination, rename it into place;
2. verify every file of the bundle against ``bundle.json`` (size + SHA-256; no unlisted files, no links)
   and the lock file against the wheelhouse -- before anything is installed;
3. ``python -m venv``;
4. ``pip install --no-index --find-links wheels --require-hashes -r requirements.lock`` (pip in isolated
   mode: no user config, no index, no network);
5. ``bge-edge verify ARTIFACT`` and one ``bge-edge encode`` as a smoke test, then print what was installed.

A failure after the venv was created removes the venv. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

BUNDLE_MANIFEST = "bundle.json"
BUNDLE_FORMAT = "bge-edge-bundle"
BUNDLE_SCHEMA = 1
LOCK_NAME = "requirements.lock"
WHEELS_DIR = "wheels"
ARTIFACT_DIR = "artifact"
SMOKE_TEXT = "bge-edge air-gapped install smoke test: one sentence in, one vector out."
MAX_ARCHIVE_MEMBERS = 100000  # a bundle has tens of files; anything near this is not one of ours
_CHUNK = 1 << 20  # 1 MiB reads keep hashing at disk speed with flat memory
_HASH_RE = re.compile(r"--hash=sha256:([0-9a-f]{64})")


class BundleInstallError(Exception):
    """A user-facing failure: the message says what is wrong and what to do."""


def is_forbidden(name: str) -> bool:
    """Packages a bundle never holds: the training/export stack (the runtime needs none of it)."""
    n = re.sub(r"[-_.]+", "-", name).lower()
    return n.startswith("torch") or n == "transformers" or n == "optimum" or n.startswith("optimum-") \
        or n.startswith("tensorflow")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_rel(rel: str, what: str) -> PurePosixPath:
    """A plain relative POSIX path: no absolute path, drive, backslash, ``..``, ``.`` or empty part."""
    p = PurePosixPath(rel)
    if (not rel or rel.startswith("/") or "\\" in rel or ":" in rel or "\x00" in rel
            or any(part in ("", ".", "..") for part in rel.split("/"))):
        raise BundleInstallError(f"{what} {rel!r} is not a plain relative path inside the bundle; refusing it "
                                 f"(nothing was extracted or installed).")
    return p


# ---- archive ----------------------------------------------------------------------------------------------

def _member_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "a symbolic link"
    if m.islnk():
        return "a hard link"
    if m.ischr() or m.isblk():
        return "a device file"
    if m.isfifo():
        return "a FIFO"
    return "a special file"


def check_archive(archive: Path) -> tuple[str, list[tarfile.TarInfo]]:
    """Validate every member of ``archive``; return (top-level folder name, members). Writes nothing."""
    try:
        tf = tarfile.open(archive, "r:*")
    except (OSError, tarfile.TarError) as e:
        raise BundleInstallError(f"cannot read the archive {archive}: {e}") from None
    with tf:
        try:
            members = tf.getmembers()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise BundleInstallError(f"the archive {archive} is damaged ({e}); copy it again.") from None
    if not members or len(members) > MAX_ARCHIVE_MEMBERS:
        raise BundleInstallError(f"the archive {archive} has {len(members)} members; it is not a bge-edge bundle.")
    tops, seen = set(), set()
    for m in members:
        name = m.name
        _check_rel(name, f"archive member of {archive.name}:")
        if not (m.isreg() or m.isdir()):
            raise BundleInstallError(f"archive member {name!r} is {_member_kind(m)}; a bundle holds only plain files "
                                     f"and folders. Refusing to extract {archive} (nothing was written).")
        if name in seen:
            raise BundleInstallError(f"archive member {name!r} appears twice in {archive}; refusing to extract it.")
        seen.add(name)
        tops.add(name.split("/")[0])
    if len(tops) != 1:
        raise BundleInstallError(f"the archive {archive} has {len(tops)} top-level entries; a bundle archive holds "
                                 f"exactly one folder.")
    top = tops.pop()
    if any(m.name == top and not m.isdir() for m in members):
        raise BundleInstallError(f"the archive {archive} does not hold one folder; it is not a bge-edge bundle.")
    return top, members


def extract_archive(archive: Path, dest: Path | None = None) -> Path:
    """Validate, then extract ``archive`` into ``dest`` (default: ./<top folder>) via a temporary folder."""
    archive = Path(archive)
    top, members = check_archive(archive)
    dest = Path(dest) if dest is not None else Path.cwd() / top
    if dest.exists():
        raise BundleInstallError(f"{dest} already exists; remove it, or pass --dest NEW_FOLDER, or run the "
                                 f"install script inside that folder.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=str(dest.parent)))
    try:
        with tarfile.open(archive, "r:*") as tf:
            if hasattr(tarfile, "data_filter"):  # 3.12+, and 3.8.17+/3.9.17+/3.10.12+/3.11.4+ backports
                tf.extractall(tmp, members=members, filter="data")
            else:  # members are already checked: plain files and folders with clean relative names
                for m in members:
                    target = tmp.joinpath(*m.name.split("/"))
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(m)
                    assert src is not None
                    with src, open(target, "xb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                    os.chmod(target, 0o755 if m.mode & 0o100 else 0o644)
        os.replace(tmp / top, dest)
    except (OSError, tarfile.TarError, EOFError) as e:
        raise BundleInstallError(f"extracting {archive} failed ({e}); nothing was kept. Copy the archive again.") \
            from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---- verification ---------------------------------------------------------------------------------------

def read_bundle_manifest(root: Path) -> dict:
    path = Path(root) / BUNDLE_MANIFEST
    if not path.is_file():
        raise BundleInstallError(f"{root} has no {BUNDLE_MANIFEST}: it is not a bge-edge bundle folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleInstallError(f"{path} is not valid JSON ({e}); copy the bundle again.") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleInstallError(f"{path} is not a bge-edge bundle manifest (format != {BUNDLE_FORMAT!r}).")
    if data.get("schema_version") != BUNDLE_SCHEMA:
        raise BundleInstallError(f"{path} has schema_version {data.get('schema_version')!r}; this installer reads "
                                 f"{BUNDLE_SCHEMA}. Use the install script that came with the bundle.")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleInstallError(f"{path} lists no files; copy the bundle again.")
    for rel, entry in files.items():
        _check_rel(rel, f"{BUNDLE_MANIFEST} lists the path")
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int)
                or not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise BundleInstallError(f"{BUNDLE_MANIFEST} entry for {rel!r} lacks a size and a SHA-256.")
    _artifact_rel(data)
    return data


def _artifact_rel(data: dict) -> str:
    """The bundle's artifact folder, held to the rules of every other bundle path: a plain relative path
    inside the bundle whose manifest.json is one of the files bundle.json lists (so it is verified)."""
    art = data.get("artifact", {})
    if not isinstance(art, dict):
        raise BundleInstallError(f"{BUNDLE_MANIFEST} field 'artifact' is not an object; copy the bundle again.")
    rel = art.get("path", ARTIFACT_DIR)
    if not isinstance(rel, str):
        raise BundleInstallError(f"{BUNDLE_MANIFEST} artifact.path is not a string; copy the bundle again.")
    _check_rel(rel, f"{BUNDLE_MANIFEST} artifact.path")
    if "artifact" in data and f"{rel}/manifest.json" not in data["files"]:
        raise BundleInstallError(f"{BUNDLE_MANIFEST} artifact.path {rel!r} is not an artifact folder of this bundle "
                                 f"({rel}/manifest.json is not among the files it lists); refusing to install it.")
    precision = art.get("smoke_precision")
    if precision is not None and precision not in ("fp32", "fp16", "int8"):
        raise BundleInstallError(f"{BUNDLE_MANIFEST} artifact.smoke_precision {str(precision)[:20]!r} is not one of "
                                 f"fp32, fp16, int8; copy the bundle again.")
    return rel


def verify_bundle(root: Path, expect_sha256: str | None = None) -> dict:
    """Check every file against bundle.json, refuse unlisted files and links, check the lock file covers
    exactly the wheelhouse. Returns the manifest. Raises BundleInstallError naming each bad file."""
    root = Path(root)
    if expect_sha256 is not None:
        actual = sha256_file(root / BUNDLE_MANIFEST) if (root / BUNDLE_MANIFEST).is_file() else "(missing)"
        if actual != expect_sha256.lower():
            raise BundleInstallError(f"{BUNDLE_MANIFEST} has SHA-256 {actual}, expected {expect_sha256.lower()}: "
                                     f"this is not the bundle that was built. Refusing to install anything.")
    data = read_bundle_manifest(root)
    files: dict = data["files"]
    problems = []
    for rel in sorted(files):
        entry, path = files[rel], root.joinpath(*rel.split("/"))
        try:
            st = os.lstat(path)
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel} is not a plain file (a link or special file)")
        elif st.st_size != entry["size"]:
            problems.append(f"{rel} is {st.st_size} bytes, {BUNDLE_MANIFEST} says {entry['size']}")
        else:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                problems.append(f"{rel} has SHA-256 {actual}, {BUNDLE_MANIFEST} says {entry['sha256']}")
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):
                rel = Path(dirpath, d).relative_to(root).as_posix()
                problems.append(f"{rel} is a link to a folder")
                dirnames.remove(d)
        for f in filenames:
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if rel != BUNDLE_MANIFEST and rel not in files:
                problems.append(f"{rel} is not listed in {BUNDLE_MANIFEST} (remove it)")
    if problems:
        more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
        raise BundleInstallError("bundle verification failed: " + "; ".join(problems[:4]) + more +
                                 ". The bundle is corrupt or was altered; refusing to install anything. "
                                 "Copy it again from the machine that built it.")
    # The lock file pins exactly the wheels in the bundle (it was just verified byte for byte, so this checks
    # the build, not the copy): a wheel without a hash could never be installed, a hash without a wheel means
    # a missing file.
    if LOCK_NAME not in files:
        raise BundleInstallError(f"{BUNDLE_MANIFEST} does not list {LOCK_NAME}; the bundle is incomplete.")
    lock_hashes = set(_HASH_RE.findall((root / LOCK_NAME).read_text(encoding="utf-8")))
    wheel_hashes = {e["sha256"]: rel for rel, e in files.items()
                    if rel.startswith(WHEELS_DIR + "/") and rel.endswith(".whl")}
    unpinned = sorted(rel for h, rel in wheel_hashes.items() if h not in lock_hashes)
    orphans = sorted(lock_hashes - set(wheel_hashes))
    if unpinned or orphans:
        raise BundleInstallError(f"{LOCK_NAME} does not match the wheelhouse: wheels without a hash in the lock "
                                 f"{unpinned[:3]}, lock hashes without a wheel {[h[:12] for h in orphans[:3]]}. "
                                 f"Rebuild the bundle.")
    return data


def bundle_summary(data: dict) -> str:
    files = data["files"]
    size = sum(e["size"] for e in files.values())
    wheels = sum(1 for r in files if r.startswith(WHEELS_DIR + "/"))
    targets = ", ".join(f"{t['platform']}/cp{t['python'].replace('.', '')}" for t in data.get("targets", []))
    art = data.get("artifact", {})
    return (f"{len(files)} files ({size / 1e6:.1f} MB): bge-edge {data.get('bge_edge', {}).get('version', '?')}, "
            f"{wheels} wheels for {targets}; artifact {art.get('path', ARTIFACT_DIR)}/ "
            f"({art.get('kind', '?')}, precisions {', '.join(art.get('precisions', []))})")


# ---- target matching -------------------------------------------------------------------------------------

def _libc_version() -> tuple[int, ...] | None:
    try:
        s = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    m = re.match(r"glibc (\d+)\.(\d+)", s)
    return (int(m.group(1)), int(m.group(2))) if m else None


def this_machine() -> dict:
    return {"sys_platform": sys.platform, "machine": platform.machine(),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "implementation": sys.implementation.name, "glibc": _libc_version(),
            "macos": platform.mac_ver()[0] if sys.platform == "darwin" else ""}


def match_target(data: dict, here: dict | None = None) -> dict:
    """The bundle target that this interpreter can install, or a BundleInstallError listing both sides."""
    here = here or this_machine()
    reasons = []
    for t in data.get("targets", []):
        why = []
        if here["implementation"] != "cpython":
            why.append(f"interpreter is {here['implementation']}, not CPython")
        if t["python"] != here["python"]:
            why.append(f"Python {here['python']} != {t['python']}")
        if t["sys_platform"] != here["sys_platform"]:
            why.append(f"OS {here['sys_platform']} != {t['sys_platform']}")
        if t.get("machine") and t["machine"].lower() != here["machine"].lower():
            why.append(f"CPU {here['machine']} != {t['machine']}")
        if t.get("glibc") and here["sys_platform"] == "linux":
            if here["glibc"] is None:
                why.append(f"needs glibc >= {t['glibc'][0]}.{t['glibc'][1]}, this system has no glibc")
            elif tuple(here["glibc"]) < tuple(t["glibc"]):
                why.append(f"glibc {here['glibc'][0]}.{here['glibc'][1]} < {t['glibc'][0]}.{t['glibc'][1]}")
        if t.get("macos") and here["sys_platform"] == "darwin" and here["macos"]:
            have = tuple(int(x) for x in here["macos"].split(".")[:2])
            if have < tuple(t["macos"]):
                why.append(f"macOS {here['macos']} < {t['macos'][0]}.{t['macos'][1]}")
        if not why:
            return t
        reasons.append(f"{t['platform']}/cp{t['python'].replace('.', '')}: " + ", ".join(why))
    raise BundleInstallError(
        f"this bundle was built for other machines ({'; '.join(reasons) or 'no targets'}); this is "
        f"{here['sys_platform']} {here['machine']}, Python {here['python']}. Run the installer with a matching "
        f"Python (PYTHON=/path/to/python3.X ./install.sh), or build a bundle with --platform/--python for this "
        f"machine.")


# ---- install ----------------------------------------------------------------------------------------------

def _venv_paths(venv: Path) -> tuple[Path, Path]:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe", venv / "Scripts" / "bge-edge.exe"
    return venv / "bin" / "python", venv / "bin" / "bge-edge"


def _clean_env() -> dict:
    """The environment for child processes: no PYTHONPATH/PYTHONHOME/venv leaking in, no pip settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")
           and not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _run(cmd: list, what: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run([str(c) for c in cmd], input=input_text, capture_output=True, text=True,
                           encoding="utf-8", errors="replace", env=_clean_env())
    except OSError as e:
        raise BundleInstallError(f"{what} could not start ({e}).") from None
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-4000:])
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
        raise BundleInstallError(f"{what} failed (exit {r.returncode}): {last.strip()[:300]}")
    return r


def _say(msg: str) -> None:
    print(f"bge-edge install: {msg}", flush=True)


def resolve_source(source: str | None, here: str | None, self_name: str | None,
                   dest: str | None) -> tuple[Path, bool]:
    """The bundle folder to install from (extracting an archive first); (folder, extracted?)."""
    if source:
        p = Path(source)
        if p.is_dir():
            return p, False
        if p.is_file():
            return extract_archive(p, Path(dest) if dest else None), True
        raise BundleInstallError(f"{source} is neither a bundle folder nor an archive file.")
    if here and (Path(here) / BUNDLE_MANIFEST).is_file():
        return Path(here), False
    if here and self_name:
        stem = re.sub(r"\.install\.(sh|ps1)$", "", self_name)
        for ext in (".tar.gz", ".tgz"):
            cand = Path(here) / (stem + ext)
            if stem != self_name and cand.is_file():
                return extract_archive(cand, Path(dest) if dest else None), True
    raise BundleInstallError("no bundle found: run the install script that sits inside the bundle folder, or "
                             "pass the archive (BUNDLE.tar.gz) or the bundle folder as an argument.")


def install(root: Path, venv: Path, data: dict) -> dict:
    """Steps 3-5 on an already verified bundle; returns timings and what was installed."""
    art = root.joinpath(*_artifact_rel(data).split("/"))
    precision = data.get("artifact", {}).get("smoke_precision")
    if venv.exists() and (not venv.is_dir() or any(venv.iterdir())):
        raise BundleInstallError(f"{venv} already exists; pass --venv NEW_FOLDER or remove it first.")
    times: dict = {}
    created = not venv.exists()
    try:
        t = time.perf_counter()
        _say(f"creating a virtual environment at {venv} with {sys.executable} (Python {sys.version.split()[0]})")
        _run([sys.executable, "-m", "venv", venv],
             "python -m venv (on Debian/Ubuntu install the python3.X-venv package)")
        times["venv_s"] = time.perf_counter() - t
        vpy, bge = _venv_paths(venv)
        t = time.perf_counter()
        _say("installing the pinned wheels offline (pip --no-index --require-hashes)")
        pip = [vpy, "-m", "pip", "--isolated", "--disable-pip-version-check", "--no-input"]
        r = _run(pip + ["install", "--no-index", "--find-links", root / WHEELS_DIR, "--require-hashes",
                        "--only-binary=:all:", "--no-cache-dir", "-r", root / LOCK_NAME], "pip install")
        done = [ln for ln in r.stdout.splitlines() if ln.startswith("Successfully installed")]
        if done:
            print(done[-1], flush=True)
        times["pip_install_s"] = time.perf_counter() - t
        listed = json.loads(_run(pip + ["list", "--format=json"], "pip list").stdout)
        installed = {d["name"]: d["version"] for d in listed}
        bad = sorted(n for n in installed if is_forbidden(n))
        if bad:
            raise BundleInstallError(f"the venv contains {bad}, which a bge-edge bundle must not install.")
        t = time.perf_counter()
        r = _run([bge, "verify", art], "bge-edge verify")
        print(r.stdout.strip(), flush=True)
        times["artifact_verify_s"] = time.perf_counter() - t
        cmd = [bge, "encode", art] + (["--precision", precision] if precision else [])
        t = time.perf_counter()
        r = _run(cmd, "smoke test (bge-edge encode)", input_text=SMOKE_TEXT + "\n")
        times["first_embedding_s"] = time.perf_counter() - t
        _check_smoke(r.stdout, art)
    except BaseException:
        if created:
            shutil.rmtree(venv, ignore_errors=True)
        raise
    return {"times": times, "installed": installed, "venv": venv, "bge_edge": bge, "artifact": art,
            "precision": precision}


def _check_smoke(stdout: str, art: Path) -> None:
    try:
        hidden = json.loads((art / "manifest.json").read_text(encoding="utf-8"))["hidden_size"]
        recs = [json.loads(ln) for ln in stdout.splitlines() if ln.strip()]
        vec = recs[0]["dense_vecs"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BundleInstallError(f"smoke test: bge-edge encode printed no dense vector ({e}).") from None
    norm = math.sqrt(sum(x * x for x in vec))
    if len(recs) != 1 or len(vec) != hidden or not all(math.isfinite(x) for x in vec) or abs(norm - 1) > 1e-3:
        raise BundleInstallError(f"smoke test: expected one L2-normalised {hidden}-dim vector, got {len(recs)} "
                                 f"record(s), {len(vec)} dims, norm {norm:.4f}.")


def _main_install(a: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    root, extracted = resolve_source(a.source, a.here, a.self_name, a.dest)
    root = root.absolute()
    if extracted:
        _say(f"extracted the archive safely into {root}")
    t = time.perf_counter()
    data = verify_bundle(root, a.expect_sha256)
    verify_s = time.perf_counter() - t
    _say(f"verified {bundle_summary(data)} against {BUNDLE_MANIFEST} (SHA-256 "
         f"{sha256_file(root / BUNDLE_MANIFEST)}) in {verify_s:.1f} s")
    target = match_target(data)
    _say(f"this machine matches target {target['platform']}/cp{target['python'].replace('.', '')}")
    if a.check:
        _say("check only: nothing installed")
        return 0
    res = install(root, Path(a.venv).absolute(), data)
    tm = res["times"]
    print("", flush=True)
    _say(f"installed {len(res['installed'])} packages into {res['venv']}:")
    for name, ver in sorted(res["installed"].items(), key=lambda kv: kv[0].lower()):
        print(f"  {name}=={ver}")
    _say(f"artifact: {res['artifact']} (smoke-tested at {res['precision']})")
    _say(f"times: verify {verify_s:.1f} s, venv {tm['venv_s']:.1f} s, pip install {tm['pip_install_s']:.1f} s, "
         f"bge-edge verify {tm['artifact_verify_s']:.1f} s, first embedding (cold process: import + load + "
         f"encode) {tm['first_embedding_s']:.2f} s; total {time.perf_counter() - t0:.1f} s")
    _say(f"use it: {res['bge_edge']} encode {res['artifact']} < texts.txt > vectors.jsonl")
    return 0


def _main_verify(a: argparse.Namespace) -> int:
    root = Path(a.bundle)
    data = verify_bundle(root, a.expect_sha256)
    print(f"ok: {bundle_summary(data)} match {BUNDLE_MANIFEST}")
    return 0


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser(prog="install", description="Install a bge-edge air-gapped bundle offline.")
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install", help="verify, then install into a new venv and smoke-test")
    i.add_argument("source", nargs="?", help="bundle folder or BUNDLE.tar.gz (default: the one beside the script)")
    i.add_argument("--venv", default="bge-edge-env", help="virtual environment to create (default: ./bge-edge-env)")
    i.add_argument("--dest", default=None, help="where an archive is extracted (default: ./<bundle name>)")
    i.add_argument("--check", action="store_true", help="extract and verify only; install nothing")
    i.add_argument("--expect-sha256", default=None, help="SHA-256 of bundle.json printed by `bge-edge bundle`")
    i.add_argument("--here", default=None, help=argparse.SUPPRESS)
    i.add_argument("--self", dest="self_name", default=None, help=argparse.SUPPRESS)
    i.set_defaults(func=_main_install)
    v = sub.add_parser("verify", help="check a bundle folder against bundle.json")
    v.add_argument("bundle")
    v.add_argument("--expect-sha256", default=None)
    v.set_defaults(func=_main_verify)
    a = p.parse_args(argv)
    try:
        return int(a.func(a))
    except BundleInstallError as e:
        print(f"bge-edge install: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bge-edge install: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
