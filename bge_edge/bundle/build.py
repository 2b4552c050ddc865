"""Build an air-gapped bundle on a connected machine (``bge-edge bundle``).

Layout of a bundle folder::

    bundle.json          every other file with size + SHA-256; targets, pinned packages, artifact summary
    requirements.lock    pip --require-hashes format: one pinned line per package (+ markers per target)
    wheels/*.whl         bge-edge itself and every runtime dependency, binary wheels only, all targets
    artifact/            the artifact folder (only the precisions asked for; manifest.json filtered to match)
    install.sh           verify -> venv -> pip install --no-index --require-hashes -> verify + encode smoke test
    install.ps1          the same for Windows
    README.txt

With ``archive=True`` the bundle is written as ``OUT.tar.gz`` (one top-level folder) plus the same install
scripts beside it as ``OUT.install.sh`` / ``OUT.install.ps1``, which extract it safely first.

Dependencies come from ``pip download --only-binary=:all: --platform ... --python-version ...`` per target.
pip evaluates environment markers against *this* machine, not the target (a Windows-only dependency such
as ``colorama`` is missed on Linux), so the closure of every target is recomputed from the wheels'
metadata with the target's marker environment and missing dependencies are downloaded in another round.
Everything is written into a temporary folder beside ``--out`` and renamed at the end.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from bge_edge import __version__
from bge_edge.runtime.integrity import sha256_file, verify_files
from bge_edge.runtime.manifest import MANIFEST_NAME, parse_manifest, read_manifest, safe_member_path

from . import BundleError, installer
from .installer import ARTIFACT_DIR, BUNDLE_FORMAT, BUNDLE_MANIFEST, BUNDLE_SCHEMA, LOCK_NAME, WHEELS_DIR

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pragma: no cover - packaging comes with onnxruntime; pip vendors it too
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore[no-redef,assignment]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef,assignment]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef,assignment]

__all__ = ["build_bundle", "BundleResult", "Target", "parse_target", "host_platform"]

DIST_NAME = "bge-edge"
REFUSED_EXTRAS = {"export": "torch and transformers", "dev": "torch, transformers and test tools"}
MAX_ROUNDS = 4  # download rounds per target; each adds the dependencies pip's host markers hid
MAX_PARALLEL_DOWNLOADS = 4  # targets resolved at once (pip download is network/IO bound)
MAX_CONFLICT_PROBES = 8  # dependencies checked one by one to explain pip's ResolutionImpossible
ARCHIVE_COMPRESSLEVEL = 6  # wheels and int8 graphs barely compress; 9 costs ~2x the time for <1 % less
_TEMPLATES = Path(__file__).resolve().parent / "templates"

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"bge-edge bundle: {msg}", file=sys.stderr, flush=True)


# ---- targets ----------------------------------------------------------------------------------------------

_LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_WINDOWS = {"win_amd64": "AMD64", "win_arm64": "ARM64", "win32": "x86"}
PLATFORM_HELP = ("a wheel platform tag such as manylinux_2_28_x86_64, manylinux_2_28_aarch64, "
                 "musllinux_1_2_x86_64, win_amd64, macosx_11_0_arm64")


@dataclass(frozen=True)
class Target:
    """One platform tag x one CPython version, with the marker environment a real machine would have."""

    platform: str
    python: str  # "3.11"
    sys_platform: str
    platform_system: str
    os_name: str
    machine: str
    glibc: tuple[int, int] | None = None
    macos: tuple[int, int] | None = None
    pip_platforms: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.platform}-cp{self.python.replace('.', '')}"

    def marker_env(self) -> dict[str, str]:
        return {"sys_platform": self.sys_platform, "platform_system": self.platform_system, "os_name": self.os_name,
                "platform_machine": self.machine, "python_version": self.python,
                "python_full_version": self.python + ".0", "implementation_name": "cpython",
                "implementation_version": self.python + ".0", "platform_python_implementation": "CPython",
                "platform_release": "", "platform_version": "", "extra": ""}

    def marker(self) -> str:
        return (f'sys_platform == "{self.sys_platform}" and platform_machine == "{self.machine}" '
                f'and python_version == "{self.python}"')

    def to_json(self) -> dict[str, Any]:
        return {"platform": self.platform, "python": self.python, "sys_platform": self.sys_platform,
                "machine": self.machine, "glibc": list(self.glibc) if self.glibc else None,
                "macos": list(self.macos) if self.macos else None, "marker": self.marker()}


def _manylinux_tags(major: int, minor: int, arch: str) -> tuple[str, ...]:
    """pip takes ``--platform manylinux_2_28_x86_64`` literally (it expands only manylinux2014/2010), but a
    glibc 2.28 machine also installs manylinux_2_17 / manylinux2014 wheels: list them all, newest first."""
    floor = 5 if arch in ("x86_64", "i686") else 17
    tags = []
    for m in range(minor, floor - 1, -1) if major == 2 else [minor]:
        tags.append(f"manylinux_{major}_{m}_{arch}")
        for legacy, (lmaj, lmin) in _LEGACY_MANYLINUX.items():
            if (major, m) == (lmaj, lmin) and (legacy == "manylinux2014" or arch in ("x86_64", "i686")):
                tags.append(f"{legacy}_{arch}")
    return tuple(tags)


def parse_target(tag: str, python: str) -> Target:
    """A Target from a wheel platform tag and "3.X"; BundleError naming what is allowed otherwise."""
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise BundleError(f"--python {python!r} is not a CPython version like 3.11.")
    linux: dict[str, Any] = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix"}
    if m := re.fullmatch(r"manylinux_(\d+)_(\d+)_([a-z0-9_]+)", tag):
        maj, mnr, arch = int(m[1]), int(m[2]), m[3]
        return Target(tag, python, machine=arch, glibc=(maj, mnr), pip_platforms=_manylinux_tags(maj, mnr, arch),
                      **linux)
    if (m := re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_([a-z0-9_]+)", tag)):
        maj, mnr = _LEGACY_MANYLINUX[m[1]]
        return Target(tag, python, machine=m[2], glibc=(maj, mnr), pip_platforms=_manylinux_tags(maj, mnr, m[2]),
                      **linux)
    if m := re.fullmatch(r"musllinux_1_(\d+)_([a-z0-9_]+)", tag):
        tags = tuple(f"musllinux_1_{k}_{m[2]}" for k in range(int(m[1]), -1, -1))
        return Target(tag, python, machine=m[2], pip_platforms=tags, **linux)
    if m := re.fullmatch(r"linux_([a-z0-9_]+)", tag):
        return Target(tag, python, machine=m[1], pip_platforms=(tag,), **linux)
    if m := re.fullmatch(r"macosx_(\d+)_(\d+)_(arm64|x86_64)", tag):
        return Target(tag, python, sys_platform="darwin", platform_system="Darwin", os_name="posix", machine=m[3],
                      macos=(int(m[1]), int(m[2])), pip_platforms=(tag,))  # pip expands macOS versions itself
    if tag in _WINDOWS:
        return Target(tag, python, sys_platform="win32", platform_system="Windows", os_name="nt",
                      machine=_WINDOWS[tag], pip_platforms=(tag,))
    raise BundleError(f"--platform {tag!r} is not supported; use {PLATFORM_HELP}.")


def host_platform() -> str:
    """This machine's platform tag (the default --platform)."""
    import platform

    mach = platform.machine()
    if sys.platform.startswith("linux"):
        g = installer._libc_version()
        if g is None:
            raise BundleError("cannot tell this machine's wheel platform (no glibc); pass --platform, e.g. "
                              f"musllinux_1_2_{mach}.")
        return f"manylinux_{g[0]}_{g[1]}_{mach}"
    if sys.platform == "darwin":
        ver = [int(x) for x in (platform.mac_ver()[0] or "11.0").split(".")[:2]] + [0]
        return f"macosx_{ver[0]}_{ver[1] if ver[0] == 10 else 0}_{mach}"
    if sys.platform == "win32":
        return {"AMD64": "win_amd64", "ARM64": "win_arm64"}.get(mach, "win32")
    raise BundleError(f"cannot tell this machine's wheel platform ({sys.platform}); pass --platform ({PLATFORM_HELP}).")


# ---- wheels -----------------------------------------------------------------------------------------------

@dataclass
class _Wheel:
    name: str  # canonical
    version: str
    path: Path
    meta: Message


@dataclass
class _Pkg:
    name: str
    version: str
    path: Path
    extras: frozenset[str]
    required_by: str


def _wheel_meta(path: Path) -> Message:
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise BundleError(f"{path.name} has no single .dist-info/METADATA; it is not a valid wheel.")
            return BytesHeaderParser().parsebytes(z.read(names[0]))
    except (OSError, zipfile.BadZipFile) as e:
        raise BundleError(f"cannot read the wheel {path.name}: {e}") from None


def _index_wheels(folder: Path) -> dict[str, _Wheel]:
    out: dict[str, _Wheel] = {}
    for f in sorted(folder.iterdir()):
        if not f.name.endswith(".whl"):
            raise BundleError(f"pip downloaded {f.name}, which is not a wheel; bundles hold binary wheels only.")
        name, version, _, _ = parse_wheel_filename(f.name)
        if name in out:
            raise BundleError(f"pip downloaded two wheels of {name} ({out[name].path.name}, {f.name}) for one target.")
        out[name] = _Wheel(str(name), str(version), f, _wheel_meta(f))
    return out


def _req_text(req: Requirement) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def _closure(root: str, root_extras: Iterable[str], wheels: dict[str, _Wheel],
             target: Target) -> tuple[dict[str, _Pkg], set[str]]:
    """What ``pip install ROOT[extras]`` needs on ``target`` (markers evaluated for the target), and the
    requirements no downloaded wheel satisfies."""
    env = target.marker_env()
    need: dict[str, set[str]] = {root: {canonicalize_name(e) for e in root_extras}}
    by = {root: ""}
    queue, missing = [root], set()
    while queue:
        name = queue.pop()
        for line in wheels[name].meta.get_all("Requires-Dist") or []:
            try:
                req = Requirement(line)
            except InvalidRequirement as e:
                raise BundleError(f"{wheels[name].path.name} has an invalid requirement {line!r}: {e}") from None
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e})
                                                  for e in {"", *need[name]}):
                continue
            dep = canonicalize_name(req.name)
            if dep not in wheels or not req.specifier.contains(wheels[dep].version, prereleases=True):
                missing.add(_req_text(req))
                continue
            extras = {str(canonicalize_name(e)) for e in req.extras}
            if dep not in need:
                need[dep], by[dep] = extras, name
                queue.append(dep)
            elif not extras <= need[dep]:
                need[dep] |= extras
                queue.append(dep)
    pkgs = {n: _Pkg(n, wheels[n].version, wheels[n].path, frozenset(need[n]), by[n]) for n in need}
    return pkgs, missing


def _pip_error(text: str, target: Target, probe: Callable[[str], bool] | None = None) -> str:
    """One line from pip's output: which package has no wheel for which target, or why pip failed.

    ``probe(name)`` says whether the index has any wheel of ``name`` for the target; it is asked only when pip
    gives up with ResolutionImpossible, which hides the package that lacks a wheel behind a wall of
    "X depends on Y" lines (e.g. PyYAML has no win_arm64 wheel, reported as a conflict of tokenizers)."""
    where = f"platform {target.platform}, Python {target.python}"
    if re.search(r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
                 r"Max retries exceeded|ProxyError|ConnectTimeout", text) and "from versions: none" in text:
        return (f"could not reach the package index while downloading wheels for {where}; bundle on a machine "
                f"that reaches PyPI (or set PIP_INDEX_URL to a mirror).")
    if m := re.search(r"Could not find a version that satisfies the requirement (\S+)"
                      r"(?: \(from ([^)]*)\))?.*?\(from versions: ([^)]*)\)", text, re.S):
        versions = m[3].strip()
        if len(versions) > 80:
            versions = versions[:40] + " ... " + versions[-30:]
        parent = f" (required by {m[2]})" if m[2] else ""
        return (f"no wheel of {m[1]}{parent} for {where} on the package index (versions with a fitting wheel: "
                f"{versions}); bundles hold binary wheels only. Drop that --platform/--python, or pick one the "
                f"package publishes wheels for.")
    if m := re.search(r"Package '([^']+)' requires a different Python: (\S+) not in '([^']+)'", text):
        return f"{m[1]} requires Python {m[3]}; it cannot be bundled for {where}."
    if "ResolutionImpossible" in text and probe is not None:
        parents: dict[str, list[str]] = {}  # dependency -> the packages that require it, in pip's order
        for parent, dep in re.findall(r"^\s*(\S+) \S+ depends on (\S+)", text, re.M):
            name, by_name = str(canonicalize_name(re.split(r"[\[<>=!~;(@ ]", dep, maxsplit=1)[0])), \
                str(canonicalize_name(parent))
            if name and by_name not in parents.setdefault(name, []):
                parents[name].append(by_name)
        for name in list(parents)[:MAX_CONFLICT_PROBES]:
            if not probe(name):
                chain: list[str] = []
                seen = {name}
                up = parents[name][0] if parents[name] else ""
                while up and up not in seen:
                    chain.append(up)
                    seen.add(up)
                    up = (parents.get(up) or [""])[0]
                by = f" (required by {' <- '.join(chain)})" if chain else ""
                return (f"no wheel of {name}{by} for {where} on the package index; bundles hold binary wheels "
                        f"only. Drop that --platform/--python, or pick one the package publishes wheels for.")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")]
    return f"pip download failed for {where}: " + (" ".join(lines[-2:]) or text.strip()[-300:])


def _pip_download_cmd(target: Target, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", target.python, "-d", str(dest)]
    for p in target.pip_platforms:
        cmd += ["--platform", p]
    return cmd


def _pip_download(target: Target, reqs: Sequence[str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(_pip_download_cmd(target, dest) + list(reqs), capture_output=True, text=True,
                       errors="replace")
    if r.returncode != 0:
        def probe(name: str) -> bool:  # any wheel of `name` for this target? (only on this error path)
            q = subprocess.run(_pip_download_cmd(target, dest.with_name(dest.name + "-probe")) + ["--no-deps", name],
                               capture_output=True, text=True, errors="replace")
            return q.returncode == 0

        raise BundleError(_pip_error(r.stdout + "\n" + r.stderr, target, probe))


def _resolve(target: Target, root_wheel: Path, root_extras: Sequence[str], work: Path) -> dict[str, _Pkg]:
    """Download rounds until the wheels cover the target's own dependency closure."""
    root_req = f"{root_wheel}[{','.join(root_extras)}]" if root_extras else str(root_wheel)
    added: list[str] = []
    pins: list[str] = []
    for rnd in range(MAX_ROUNDS):
        dest = work / f"{target.id}-round{rnd}"
        _pip_download(target, [root_req, *pins, *added], dest)
        wheels = _index_wheels(dest)
        root = canonicalize_name(DIST_NAME)
        if root not in wheels:  # pip reports a local wheel as "already downloaded" in some versions
            shutil.copy2(root_wheel, dest / root_wheel.name)
            wheels[root] = _Wheel(root, _wheel_version(root_wheel), dest / root_wheel.name, _wheel_meta(root_wheel))
        pkgs, missing = _closure(root, root_extras, wheels, target)
        if not missing:
            return pkgs
        new = sorted(missing - set(added))
        if not new:
            break
        added += new
        pins = [f"{p.name}=={p.version}" for p in pkgs.values() if p.name != root]
    raise BundleError(f"the dependencies of bge-edge for platform {target.platform}, Python {target.python} do not "
                      f"resolve to wheels: still missing {sorted(missing)} after {MAX_ROUNDS} rounds.")


def _version_spread(targets: Sequence[Target], resolved: dict[str, dict[str, _Pkg]]) -> list[str]:
    """Notes for packages that resolved to different versions on different targets. The usual cause is a
    platform tag older than the package's newest wheels (onnxruntime's current macOS wheels need macOS 13+,
    so macosx_11_0_arm64 gets a release from 2024): the bundle is right for that tag, but worth knowing."""
    versions: dict[str, dict[str, list[str]]] = {}
    for t in targets:
        for p in resolved[t.id].values():
            versions.setdefault(p.name, {}).setdefault(p.version, []).append(t.id)
    return [f"note: {name} resolves to " + "; ".join(f"{v} for {', '.join(ids)}" for v, ids in sorted(vs.items())) +
            " (an older version usually means the newer wheels need a newer platform than the --platform tag)"
            for name, vs in sorted(versions.items()) if len(vs) > 1]


def _wheel_version(path: Path) -> str:
    return str(parse_wheel_filename(path.name)[1])


def _project_root() -> Path | None:
    """The source tree bge-edge runs from (an editable/development install), else None."""
    root = Path(__file__).resolve().parents[2]
    pp = root / "pyproject.toml"
    try:
        if pp.is_file() and re.search(r'^name\s*=\s*"bge-edge"', pp.read_text(encoding="utf-8"), re.M):
            return root
    except OSError:
        pass
    return None


def _build_own_wheel(dest: Path, log: Log) -> Path:
    """``pip wheel --no-deps`` of a clean copy of the source tree (a stale ``build/`` would leak into it)."""
    root = _project_root()
    if root is None:
        raise BundleError("bge-edge is not running from its source tree, so its wheel cannot be built here; pass "
                          "--wheel PATH/bge_edge-X.whl (e.g. from `pip download bge-edge --no-deps`).")
    src = dest / "src"
    src.mkdir(parents=True)
    for item in sorted(root.iterdir()):
        if item.is_file() and (item.name in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in")
                               or item.name.startswith(("README", "LICENSE", "COPYING", "NOTICE"))):
            shutil.copy2(item, src / item.name)
        elif item.is_dir() and not item.name.startswith(".") and (item / "__init__.py").is_file():
            shutil.copytree(item, src / item.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Build in this environment when it has the backend pyproject.toml asks for (no index needed), else let pip
    # fetch it. Read the version from the metadata: importing setuptools here can clash with an already
    # imported distutils.
    try:
        isolated = int(importlib.metadata.version("setuptools").split(".")[0]) < 71  # 71+: bdist_wheel built in
    except (importlib.metadata.PackageNotFoundError, ValueError):
        isolated = True
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "--no-input",
           "-w", str(dest / "dist"), str(src)] + ([] if isolated else ["--no-build-isolation"])
    log(f"building the bge-edge wheel from {root}")
    r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    wheels = sorted((dest / "dist").glob("bge_edge-*.whl")) if r.returncode == 0 else []
    if len(wheels) != 1:
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-2:])
        raise BundleError(f"building the bge-edge wheel failed (pip wheel exit {r.returncode}): {tail[-300:]}")
    return wheels[0]


# ---- artifact ---------------------------------------------------------------------------------------------

def _check_precisions(src: Path, precisions: Sequence[str] | None) -> list[str]:
    have = sorted({g.precision for g in read_manifest(src).graphs})
    unknown = [p for p in precisions or () if p not in have]
    if unknown:
        raise BundleError(f"the artifact {src} has no graph at precision {', '.join(unknown)}; it has: "
                          f"{', '.join(have)}. Pick from those, or re-export with --precision.")
    return have


def _copy_artifact(src: Path, dest: Path, precisions: Sequence[str] | None, log: Log) -> dict[str, Any]:
    """Verify the source artifact and copy the files of the kept graphs. The manifest is copied byte for byte;
    only when some precisions are left out is it rewritten, with exactly the entries of the left-out graphs and
    their files removed and every other field as exported (checked by the runtime's strict reader). The source
    manifest's SHA-256 goes into bundle.json either way."""
    m = read_manifest(src)
    log(f"verifying the artifact {src} ({len(m.files)} files)")
    verify_files(src, m, list(m.files), cache_dir=None)
    raw = json.loads((src / MANIFEST_NAME).read_text(encoding="utf-8"))
    have = _check_precisions(src, precisions)
    wanted = set(precisions or have)
    filtered = bool(set(have) - wanted)
    if filtered:
        graph_files = {f for g in m.graphs for f in (g.file, *g.external_data)}
        kept = [g for g in m.graphs if g.precision in wanted]
        keep = {f for g in kept for f in (g.file, *g.external_data)} | (set(m.files) - graph_files)
        raw["graphs"] = [g for g in raw["graphs"] if g["precision"] in wanted]
        raw["files"] = {k: v for k, v in raw["files"].items() if k in keep}
        m = parse_manifest(raw)
    onnx = [g.precision for g in m.graphs if g.format == "onnx"]
    smoke = next((p for p in ("int8", "fp32", "fp16") if p in onnx), None)
    if smoke is None:
        raise BundleError(f"the bundle would hold no ONNX graph (precisions {', '.join(precisions or have)}); the "
                          f"install smoke test and the runtime need one.")
    dest.mkdir(parents=True)
    for name in sorted(m.files):
        out = dest.joinpath(*name.split("/"))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(safe_member_path(src, name), out)
    if filtered:
        (dest / MANIFEST_NAME).write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        shutil.copyfile(src / MANIFEST_NAME, dest / MANIFEST_NAME)  # unchanged, byte for byte
    verify_files(dest, read_manifest(dest), list(m.files), cache_dir=None)  # the copy is what was verified
    return {"path": ARTIFACT_DIR, "source": dict(m.source), "kind": m.kind, "heads": list(m.heads),
            "hidden_size": m.hidden_size, "precisions": sorted({g.precision for g in m.graphs}),
            "graphs": [{"file": g.file, "format": g.format, "precision": g.precision} for g in m.graphs],
            "filtered": bool(filtered), "source_manifest_sha256": sha256_file(src / MANIFEST_NAME),
            "smoke_precision": smoke}


# ---- lock, scripts, manifest, archive ---------------------------------------------------------------------

def _lock_text(targets: Sequence[Target], resolved: dict[str, dict[str, _Pkg]], hashes: dict[str, str],
               root_extras: Sequence[str]) -> str:
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for t in targets:
        for p in resolved[t.id].values():
            g = groups.setdefault((p.name, p.version), {"targets": [], "hashes": set()})
            g["targets"].append(t)
            g["hashes"].add(hashes[p.path.name])
    lines = [
        "# bge-edge air-gapped bundle: every wheel in wheels/, pinned by version and SHA-256 (pip --require-hashes).",
        "# Targets: " + ", ".join(t.id for t in targets),
        "# Installed by install.sh / install.ps1 with:",
        "#   pip install --no-index --find-links wheels --require-hashes --only-binary=:all: -r requirements.lock",
    ]
    root = canonicalize_name(DIST_NAME)
    for (name, version), g in sorted(groups.items()):
        req = name + (f"[{','.join(sorted(root_extras))}]" if name == root and root_extras else "")
        ts = g["targets"]
        marker = "" if len(ts) == len(targets) else " ; " + (
            ts[0].marker() if len(ts) == 1 else " or ".join(f"({t.marker()})" for t in ts))
        lines.append(f"{req}=={version}{marker} \\")
        hs = sorted(g["hashes"])
        lines += [f"    --hash=sha256:{h}" + (" \\" if i < len(hs) - 1 else "") for i, h in enumerate(hs)]
    return "\n".join(lines) + "\n"


def _render(template: str, pythons: Sequence[str]) -> str:
    code = (Path(installer.__file__).read_text(encoding="utf-8"))
    text = (_TEMPLATES / template).read_text(encoding="utf-8")
    return (text.replace("@@VERSION@@", __version__).replace("@@PYTHONS@@", "/".join(pythons))
            .replace("@@PYTHON_CANDIDATES@@", " ".join(f"python{p}" for p in pythons))
            .replace("@@PS_PYTHONS@@", ", ".join(f"'{p}'" for p in pythons))
            .replace("@@INSTALLER_PY@@", code.rstrip("\n")))


def _readme(name: str, data: dict[str, Any]) -> str:
    targets = ", ".join(f"{t['platform']}/Python {t['python']}" for t in data["targets"])
    return f"""bge-edge air-gapped bundle "{name}" (bge-edge {__version__}, built {data['created']})

Targets: {targets}
Artifact: artifact/ ({data['artifact']['kind']}, precisions {', '.join(data['artifact']['precisions'])})

Install (no network needed; every file is verified against bundle.json before anything is installed):
  Linux/macOS:  ./install.sh [--venv DIR]            (default venv: ./bge-edge-env)
  Windows:      powershell -ExecutionPolicy Bypass -File install.ps1 [--venv DIR]
  Check only:   ./install.sh --check
  Pin the manifest you were given out of band: ./install.sh --expect-sha256 <SHA-256 of bundle.json>
Then: bge-edge-env/bin/bge-edge encode artifact < texts.txt > vectors.jsonl
"""


def _list_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise BundleError(f"{p} is a link or special file; a bundle holds only plain files.")
        if p.is_file() and p != root / BUNDLE_MANIFEST:
            files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return files


def _tar_filter(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    if not (ti.isreg() or ti.isdir()):
        raise BundleError(f"{ti.name} is not a plain file or folder; refusing to archive it.")
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mode = 0o755 if ti.isdir() or ti.mode & 0o100 else 0o644
    return ti


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _clean_stale(parent: Path, name: str) -> None:
    """Remove temporary folders of bundle builds that were killed (their process is gone)."""
    if os.name == "nt":
        return
    for d in parent.glob(f".{name}.bundle-tmp-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


# ---- the command ------------------------------------------------------------------------------------------

@dataclass
class BundleResult:
    """What was written, how big, how long it took."""

    outputs: list[Path]
    bundle_sha256: str  # of bundle.json: compare on the target with install.sh --expect-sha256
    targets: list[dict[str, Any]]
    sizes: dict[str, int]
    times: dict[str, float]
    artifact: dict[str, Any]
    packages: dict[str, dict[str, str]] = field(default_factory=dict)  # target id -> {name: version}


def build_bundle(artifact_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                 platforms: Sequence[str] | None = None, pythons: Sequence[str] | None = None,
                 precisions: Sequence[str] | None = None, extras: Sequence[str] = (), archive: bool = False,
                 force: bool = False, wheel: str | os.PathLike[str] | None = None,
                 log: Log | None = _stderr_log) -> BundleResult:
    """Build a bundle of ``artifact_dir`` for every platform x Python into ``out`` (see module docstring)."""
    log = log or (lambda _msg: None)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    src_art = Path(artifact_dir)
    if not (src_art / MANIFEST_NAME).is_file():
        raise BundleError(f"{src_art} is not an artifact folder (no {MANIFEST_NAME}); create one with "
                          f"`bge-edge export MODEL --out DIR`.")
    extras = sorted({canonicalize_name(e) for x in extras for e in str(x).split(",") if e.strip()})
    for e in extras:
        if e in REFUSED_EXTRAS:
            raise BundleError(f"the [{e}] extra pulls {REFUSED_EXTRAS[e]}; a bundle holds the inference runtime "
                              f"only. Export on the connected machine and bundle the artifact.")
    platforms = list(dict.fromkeys(platforms or [host_platform()]))
    pythons = list(dict.fromkeys(pythons or [f"{sys.version_info[0]}.{sys.version_info[1]}"]))
    targets = [parse_target(p, py) for p in platforms for py in pythons]
    precisions = list(dict.fromkeys(precisions)) if precisions else None
    _check_precisions(src_art, precisions)  # fail fast, before any download

    out = Path(out)
    name = re.sub(r"\.(tar\.gz|tgz)$", "", out.name) if archive else out.name
    if not name or name in (".", ".."):
        raise BundleError(f"--out {out} has no usable folder name.")
    out = out.with_name(name)
    finals = [out.with_name(name + s) for s in (".tar.gz", ".install.sh", ".install.ps1")] if archive else [out]
    existing = [p for p in finals if p.exists() or p.is_symlink()]
    if existing and not force:
        raise BundleError(f"{existing[0]} already exists; pass --force to replace it, or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out.parent, name)
    tmp = out.parent / f".{name}.bundle-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stage, work = tmp / name, tmp / "work"
        stage.mkdir()
        work.mkdir()
        # 1. bge-edge's own wheel, checked against what is asked of it
        t = time.perf_counter()
        own = Path(wheel) if wheel else _build_own_wheel(work / "own", log)
        if not own.is_file() or not own.name.endswith(".whl"):
            raise BundleError(f"--wheel {own} is not a wheel file.")
        meta = _wheel_meta(own)
        if canonicalize_name(meta["Name"] or "") != canonicalize_name(DIST_NAME):
            raise BundleError(f"--wheel {own.name} is {meta['Name']!r}, not bge-edge.")
        provided = {canonicalize_name(e) for e in meta.get_all("Provides-Extra") or []}
        for e in extras:
            if e not in provided:
                raise BundleError(f"bge-edge {meta['Version']} has no [{e}] extra; it has: "
                                  f"{', '.join(sorted(provided - set(REFUSED_EXTRAS))) or 'none'}.")
        req_py = SpecifierSet(meta["Requires-Python"] or "")
        for py in pythons:
            if not req_py.contains(py + ".0", prereleases=True):
                raise BundleError(f"bge-edge {meta['Version']} requires Python {req_py}; it cannot be bundled for "
                                  f"Python {py} (no wheel of bge-edge for any platform with Python {py}).")
        times["own_wheel_s"] = time.perf_counter() - t

        # 2. every target's dependency closure, downloaded as binary wheels
        t = time.perf_counter()
        log(f"downloading wheels for {', '.join(x.id for x in targets)}" + (f" with [{','.join(extras)}]"
                                                                             if extras else ""))
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_DOWNLOADS, len(targets))) as ex:
            futures = {x.id: ex.submit(_resolve, x, own, extras, work / "dl") for x in targets}
            resolved = {k: f.result() for k, f in futures.items()}
        for x in targets:
            if bad := [p for p in resolved[x.id].values() if installer.is_forbidden(p.name)]:
                raise BundleError(f"{bad[0].name} would be installed for {x.id} (required by {bad[0].required_by}); "
                                  f"a bundle holds the inference runtime only, never torch/transformers/optimum.")
        for line in _version_spread(targets, resolved):
            log(line)
        times["download_s"] = time.perf_counter() - t

        # 3. the wheelhouse (one folder for all targets; pip picks the compatible wheel by its tags)
        wheels_dir = stage / WHEELS_DIR
        wheels_dir.mkdir()
        hashes: dict[str, str] = {}
        for x in targets:
            for p in resolved[x.id].values():
                digest = sha256_file(p.path)
                if p.path.name in hashes and hashes[p.path.name] != digest:
                    raise BundleError(f"two different files named {p.path.name} were downloaded; rebuild the bundle.")
                if p.path.name not in hashes:
                    shutil.copyfile(p.path, wheels_dir / p.path.name)
                    hashes[p.path.name] = digest

        # 4. the artifact
        t = time.perf_counter()
        art = _copy_artifact(src_art, stage / ARTIFACT_DIR, precisions, log)
        times["artifact_s"] = time.perf_counter() - t

        # 5. lock, scripts, manifest
        (stage / LOCK_NAME).write_text(_lock_text(targets, resolved, hashes, extras), encoding="utf-8")
        for script in ("install.sh", "install.ps1"):
            (stage / script).write_text(_render(script, pythons), encoding="utf-8", newline="\n")
        os.chmod(stage / "install.sh", 0o755)
        tinfo = []
        packages = {}
        for x in targets:
            pk = resolved[x.id]
            packages[x.id] = {p.name: p.version for p in sorted(pk.values(), key=lambda p: p.name)}
            tinfo.append({**x.to_json(), "packages": packages[x.id],
                          "wheels_bytes": sum(p.path.stat().st_size for p in pk.values())})
        data: dict[str, Any] = {
            "format": BUNDLE_FORMAT, "schema_version": BUNDLE_SCHEMA, "name": name,
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "builder": {"bge_edge": __version__, "python": sys.version.split()[0], "platform": host_platform_safe()},
            "bge_edge": {"version": meta["Version"], "wheel": f"{WHEELS_DIR}/{own.name}"},
            "extras": extras, "targets": tinfo, "artifact": art,
            "install": {"posix": "./install.sh [--venv DIR]",
                        "windows": "powershell -ExecutionPolicy Bypass -File install.ps1 [--venv DIR]"},
        }
        (stage / "README.txt").write_text(_readme(name, data), encoding="utf-8")
        t = time.perf_counter()
        data["files"] = _list_files(stage)
        (stage / BUNDLE_MANIFEST).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        installer.verify_bundle(stage)  # what the target will check, checked here first
        times["hash_s"] = time.perf_counter() - t
        bundle_sha = sha256_file(stage / BUNDLE_MANIFEST)
        sizes = {"wheels": _dir_size(wheels_dir), "artifact": _dir_size(stage / ARTIFACT_DIR),
                 "total": _dir_size(stage)}

        # 6. archive (optional), then rename into place
        staged: list[Path]
        if archive:
            t = time.perf_counter()
            tgz = tmp / f"{name}.tar.gz"
            with tarfile.open(tgz, "w:gz", compresslevel=ARCHIVE_COMPRESSLEVEL) as tf:
                tf.add(stage, arcname=name, filter=_tar_filter)
            installer.check_archive(tgz)
            for s in ("sh", "ps1"):
                shutil.copy2(stage / f"install.{s}", tmp / f"{name}.install.{s}")
            staged = [tgz, tmp / f"{name}.install.sh", tmp / f"{name}.install.ps1"]
            sizes["archive"] = tgz.stat().st_size
            times["archive_s"] = time.perf_counter() - t
        else:
            staged = [stage]
        for src, dst in zip(staged, finals):
            if dst.exists() or dst.is_symlink():  # --force: move the old one aside, then drop it
                old = tmp / f"old-{dst.name}"
                os.replace(dst, old)
            os.replace(src, dst)
    except BundleError:
        raise
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as e:
        raise BundleError(f"building the bundle failed: {e}; nothing was written to {out}.") from None
    except installer.BundleInstallError as e:
        raise BundleError(str(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    times["total_s"] = time.perf_counter() - t_start
    res = BundleResult(outputs=finals, bundle_sha256=bundle_sha, targets=tinfo, sizes=sizes, times=times,
                       artifact=art, packages=packages)
    log(f"wrote {', '.join(str(p) for p in finals)} in {times['total_s']:.1f} s")
    return res


def host_platform_safe() -> str:
    try:
        return host_platform()
    except BundleError:
        return sys.platform
