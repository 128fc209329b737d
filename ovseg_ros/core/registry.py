"""Model registry: `models/manifest.yaml` entries or local paths -> verified, built models.

Nothing here touches the network except `ovseg-models fetch`, which a user runs on purpose on a machine with
internet. Loading verifies the sha256 named in the manifest and refuses a mismatch with a clear message.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

LOG = logging.getLogger("ovseg_ros.registry")
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class ModelError(RuntimeError):
    """A model that cannot be used: missing, unreadable, wrong checksum, wrong architecture."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str  # "clip", "sam" or "sed"
    arch: str  # open_clip architecture, SAM registry key (vit_b, vit_l, vit_h, vit_t, demo) or SED architecture
    file: str  # file name, looked up in the model directories
    url: str = ""
    sha256: str = ""  # empty: not published; recorded on the first fetch (FILE.sha256) and verified after that
    license: str = ""
    description: str = ""
    size: str = ""  # download size, as the publisher states it


def models_dirs() -> list[Path]:
    """Where model files are looked up, first match wins."""
    dirs = []
    if os.environ.get("OVSEG_MODELS_DIR"):
        dirs.append(Path(os.environ["OVSEG_MODELS_DIR"]).expanduser())
    dirs.append(PACKAGE_DIR.parent / "models")  # a source checkout / editable install
    try:  # an installed ROS package: share/ovseg_ros/models
        from ament_index_python.packages import get_package_share_directory

        dirs.append(Path(get_package_share_directory("ovseg_ros")) / "models")
    except Exception:
        pass
    dirs.append(Path.home() / ".cache" / "ovseg_ros" / "models")
    return dirs


def manifest_path() -> Path:
    for folder in models_dirs():
        if (folder / "manifest.yaml").is_file():
            return folder / "manifest.yaml"
    raise ModelError("models/manifest.yaml not found in " + ", ".join(str(d) for d in models_dirs()))


def load_manifest(path: Path | None = None) -> dict[str, ModelEntry]:
    path = path or manifest_path()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read model manifest {path}: {exc}") from exc
    entries = {}
    for name, fields in (data or {}).get("models", {}).items():
        entries[name] = ModelEntry(name=name, **fields)
    return entries


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def locate(entry: ModelEntry) -> Path:
    for folder in models_dirs():
        candidate = folder / entry.file
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"model '{entry.name}' ({entry.file}) is not installed; looked in "
        + ", ".join(str(d) for d in models_dirs())
        + (f". On a machine with internet: ros2 run ovseg_ros ovseg-models fetch {entry.name} (installed with pip: "
           f"ovseg-models fetch {entry.name})" if entry.url else "")
    )


def recorded_sha256(path: Path) -> Path:
    """Where the sha256 of a file whose publisher gives none is recorded on its first fetch."""
    return path.with_name(path.name + ".sha256")


def verify_entry(path: Path, entry: ModelEntry) -> None:
    """The manifest's sha256, or the one recorded on the first fetch; a file with neither (copied in by hand)
    gets its sha256 recorded now, so a later change is caught."""
    if entry.sha256:
        verify(path, entry.sha256, entry.name)
        return
    record = recorded_sha256(path)
    if record.is_file():
        verify(path, record.read_text().split()[0], entry.name)
        return
    verify(path, "", entry.name)
    try:
        _write_atomic(record, f"{sha256_of(path)}  {path.name}\n")
        LOG.warning("'%s' has no published sha256: recorded %s now; later loads verify against it", entry.name,
                    record)
    except OSError as exc:
        LOG.warning("'%s' has no published sha256 and %s cannot be written (%s): not verified", entry.name,
                    record, exc)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".part")
    partial.write_text(text)
    partial.replace(path)


def verify(path: Path, expected_sha256: str, name: str) -> None:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ModelError(f"model file {path} is not readable")
    if expected_sha256:
        actual = sha256_of(path)
        if actual != expected_sha256.lower():
            raise ModelError(
                f"checksum mismatch for '{name}' at {path}: manifest says {expected_sha256}, file has {actual}. "
                "The file is corrupt or not the one the manifest names; fetch it again."
            )


def resolve(name_or_path: str, kind: str) -> tuple[str, Path | None, ModelEntry | None]:
    """Name in the manifest, or 'ARCH' (random init) or 'ARCH:/path/to/file', -> (arch, file, entry)."""
    if not name_or_path:
        raise ModelError(f"no {kind} model given")
    manifest = {}
    try:
        manifest = load_manifest()
    except ModelError:
        LOG.warning("no model manifest found; only architecture names and explicit paths work")
    if name_or_path in manifest:
        entry = manifest[name_or_path]
        if entry.kind != kind:
            raise ModelError(f"'{name_or_path}' is a {entry.kind} model, not a {kind} model")
        path = locate(entry)
        verify_entry(path, entry)
        return entry.arch, path, entry
    arch, _, file = name_or_path.partition(":")
    if file:
        path = Path(file).expanduser()
        verify(path, "", name_or_path)
        return arch, path, None
    return arch, None, None


def load_clip(name_or_path: str, device: str = "cpu", seed: int = 0):
    """Build a ClipDenseEncoder from a manifest name, 'ARCH', or 'ARCH:/path/to/weights'."""
    import open_clip
    import torch

    from .clip_builders import build_clip, register_open_clip_configs
    from .clip_dense import ClipDenseEncoder

    register_open_clip_configs()
    arch, path, _ = resolve(name_or_path, "clip")
    if arch not in open_clip.list_models():
        raise ModelError(f"unknown open_clip architecture '{arch}'")
    if path is None:
        LOG.warning("CLIP '%s' has no weights: seeded random init (seed %d); outputs are meaningless", arch, seed)
        torch.manual_seed(seed)
    try:
        model = build_clip(arch, path)
    except Exception as exc:  # a wrong or truncated checkpoint surfaces here
        raise ModelError(f"cannot load CLIP '{name_or_path}' ({arch}) from {path}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(arch)
    model_id = f"{arch}@{sha256_of(path)[:12]}" if path else f"{arch}@random{seed}"
    return ClipDenseEncoder(model, tokenizer, model_id, device=device)


def load_sed(name_or_path: str, device: str = "cpu", seed: int = 0):
    """Build an SedEncoder (SED's network and its CLIP) from a manifest name, 'ARCH' or 'ARCH:/path/to/ckpt'."""
    from .modeling.sed import sed_config_names
    from .sed import build_sed_encoder

    arch, path, _ = resolve(name_or_path, "sed")
    if arch not in sed_config_names():
        raise ModelError(f"unknown SED architecture '{arch}'; choose one of {', '.join(sed_config_names())}")
    if path is None:
        LOG.warning("SED '%s' has no weights: seeded random init (seed %d); outputs are meaningless", arch, seed)
    try:
        return build_sed_encoder(arch, path, device=device, seed=seed)
    except Exception as exc:  # a wrong or truncated checkpoint surfaces here
        raise ModelError(f"cannot load SED '{name_or_path}' ({arch}) from {path}: {exc}") from exc


# Open-Vocabulary SAM models a user names (`prompt_model`): each is an architecture whose released parts are
# manifest entries (model_configs/ovsam/*.json `parts`). `ovseg-models fetch ovsam-coco` fetches all of them.
OVSAM_MODELS = {"ovsam-coco": "ovsam-rn50x16-coco", "ovsam-lvis": "ovsam-rn50x16-lvis"}


def ovsam_parts(name: str) -> list[str]:
    """The manifest entries an OV-SAM model name needs (empty for any other name)."""
    from .modeling.ovsam import get_ovsam_config

    return list(get_ovsam_config(OVSAM_MODELS[name]).parts.values()) if name in OVSAM_MODELS else []


def load_ovsam(name: str, device: str = "cpu", seed: int = 0, backend: str = "torch", precision: str = "fp32",
               engine_cache_dir: str | None = None, text_cache_dir: str | None = None):
    """An OvSamModel: 'ovsam-coco' / 'ovsam-lvis' from their released files (all verified; a missing one is
    refused naming the fetch command), or an OV-SAM architecture with seeded random weights."""
    from .modeling.ovsam import get_ovsam_config, ovsam_config_names
    from .ovsam import build_ovsam_model

    options = dict(device=device, backend=backend, precision=precision, engine_cache_dir=engine_cache_dir,
                   text_cache_dir=text_cache_dir)
    if name in OVSAM_MODELS:
        arch = OVSAM_MODELS[name]
        manifest = load_manifest()
        paths, missing = {}, []
        for part, entry_name in get_ovsam_config(arch).parts.items():
            entry = manifest.get(entry_name)
            if entry is None:
                raise ModelError(f"OV-SAM '{name}' needs '{entry_name}', which the manifest lacks")
            try:
                paths[part] = locate(entry)
            except ModelError:
                missing.append(entry_name)
                continue
            verify_entry(paths[part], entry)
        if missing:
            raise ModelError(f"OV-SAM '{name}' needs {', '.join(missing)} (not installed). On a machine with "
                             f"internet: ovseg-models fetch {name} (fetches every part; OV-SAM's own files are "
                             "under the NTU S-Lab License 1.0, non-commercial use only)")
        model_id = f"{arch}@{sha256_of(paths['clip2sam'])[:12]}"
        try:
            return build_ovsam_model(arch, {k: str(v) for k, v in paths.items()}, model_id=model_id,
                                     trusted=True, **options)
        except Exception as exc:  # a wrong or truncated file surfaces here
            raise ModelError(f"cannot load OV-SAM '{name}': {exc}") from exc
    if name in ovsam_config_names():
        LOG.warning("OV-SAM '%s' has no weights: seeded random init (seed %d); its labels mean nothing", name, seed)
        return build_ovsam_model(name, seed=seed, **options)
    raise ModelError(f"unknown prompt model '{name}'; choose sam, {', '.join(OVSAM_MODELS)} or an architecture "
                     f"with random weights ({', '.join(ovsam_config_names())})")


SAM_ARCHS = ("demo", "vit_b", "vit_l", "vit_h", "vit_t")


def load_sam(name_or_path: str, device: str = "cpu"):
    """Build a segment_anything Sam from a manifest name or 'ARCH:/path' (ARCH in SAM_ARCHS)."""
    import torch

    arch, path, _ = resolve(name_or_path, "sam")
    if arch not in SAM_ARCHS:
        raise ModelError(f"unknown SAM architecture '{arch}'; choose one of {', '.join(SAM_ARCHS)}")
    if path is None:
        raise ModelError(f"SAM '{name_or_path}' needs weights: a manifest name or {arch}:/path/to/checkpoint")
    try:
        if arch == "demo":
            from .sam_builders import build_demo_sam

            sam = build_demo_sam(str(path))
        elif arch == "vit_t":
            try:
                from mobile_sam import sam_model_registry as mobile_registry
            except ImportError as exc:
                raise ModelError("MobileSAM (vit_t) needs the mobile_sam package: "
                                 "pip install git+https://github.com/ChaoningZhang/MobileSAM.git timm") from exc
            sam = mobile_registry["vit_t"]()
            sam.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            from segment_anything import sam_model_registry

            sam = sam_model_registry[arch]()
            sam.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except ModelError:
        raise
    except Exception as exc:  # truncated file, wrong architecture, missing keys
        raise ModelError(f"cannot load SAM '{name_or_path}' ({arch}) from {path}: {exc}") from exc
    return sam.to(device).eval()


def fetch(name: str, force: bool = False) -> Path:
    """Download a manifest entry into the first writable model directory and verify it (needs internet)."""
    entry = load_manifest().get(name)
    if entry is None:
        raise ModelError(f"'{name}' is not in the manifest")
    if not entry.url:
        raise ModelError(f"'{name}' has no download URL (it ships with the package)")
    target_dir = Path(os.environ.get("OVSEG_MODELS_DIR", Path.home() / ".cache" / "ovseg_ros" / "models"))
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / entry.file
    if target.is_file() and not force:
        verify_entry(target, entry)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    LOG.info("downloading %s from %s", name, entry.url)
    download(entry.url, partial)
    verify(partial, entry.sha256, name)
    if not entry.sha256:  # nothing published to check against: record it now, verify against it from now on
        _write_atomic(recorded_sha256(target), f"{sha256_of(partial)}  {target.name}\n")
    partial.replace(target)
    return target


def drive_file_id(url: str) -> str:
    """The file id of a Google Drive sharing link (.../file/d/ID/view... or ...?id=ID)."""
    import re

    match = re.search(r"/file/d/([\w-]+)", url) or re.search(r"[?&]id=([\w-]+)", url)
    if match is None:
        raise ModelError(f"not a Google Drive file link: {url}")
    return match.group(1)


def download(url: str, target: Path) -> None:
    """Fetch `url` into `target`. Google Drive links (where SED's checkpoints are) go through gdown, which
    handles Drive's large-file confirmation page; everything else through urllib."""
    if "drive.google.com" in url:
        try:
            import gdown
        except ImportError as exc:
            raise ModelError("this model is on Google Drive: pip install gdown, then fetch again") from exc
        if gdown.download(id=drive_file_id(url), output=str(target), quiet=False) is None:
            raise ModelError(f"Google Drive refused the download of {url} (quota or permissions): retry later, or "
                             "download it in a browser into a models directory (ovseg-models list names them)")
        return
    urllib.request.urlretrieve(url, target)  # noqa: S310 - the user asked for this download


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovseg-models", description="List, verify and fetch ovseg_ros models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="manifest entries and whether each is installed")
    verify_cmd = sub.add_parser("verify", help="check the sha256 of installed models")
    verify_cmd.add_argument("names", nargs="*")
    fetch_cmd = sub.add_parser("fetch", help="download and verify (needs internet); an OV-SAM model name "
                               "(ovsam-coco, ovsam-lvis) fetches all its parts")
    fetch_cmd.add_argument("names", nargs="+")
    fetch_cmd.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest = load_manifest()
        if args.command == "list":
            for entry in manifest.values():
                try:
                    where = str(locate(entry))
                except ModelError:
                    where = "not installed"
                print(f"{entry.name:28s} {entry.kind:5s} {entry.arch:22s} {entry.license:22s} {where}")
        elif args.command == "verify":
            failed = 0
            for name in args.names or list(manifest):
                entry = manifest[name]
                try:
                    verify_entry(locate(entry), entry)
                    print(f"ok       {name}")
                except ModelError as exc:
                    failed += 1
                    print(f"FAILED   {name}: {exc}")
            return 1 if failed else 0
        else:
            for name in args.names:
                for part in ovsam_parts(name) or [name]:
                    print(fetch(part, args.force))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
if __name__ == "__main__":
    sys.exit(main())
