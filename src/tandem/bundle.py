"""Write, read and verify bundles: the one artifact between training and inference. Torch-free.

A bundle is a folder (one model version) with `manifest.json` and the files it lists by sha256:

    manifest = read_manifest("bundle/")          # raises UserError on a missing or altered file
    write_manifest("bundle/", manifest)          # fills in `files` with the hash of every file

See DESIGN.md, "The bundle (the contract)".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tandem.errors import UserError

FORMAT = "tandem-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Hash every file in the folder into manifest['files'] and write manifest.json (fsynced)."""
    folder = Path(folder)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    manifest["files"] = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in _bundle_files(folder)
    }
    with open(folder / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    return manifest


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """Read manifest.json; with verify, check that every listed file exists and matches its sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"bundle {folder} does not exist; export one with `tandem export RUN --out {folder}`")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a bundle: it has no {MANIFEST}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"bundle {folder}: {MANIFEST} is corrupt; re-export the bundle") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{folder}/{MANIFEST} is not a tandem bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"bundle {folder} has format version {manifest.get('format_version')}; "
                        f"this tandem reads version {FORMAT_VERSION}")
    if verify:
        for name, entry in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise UserError(f"bundle {folder}: {name} is missing; re-export the bundle")
            if sha256_file(path) != entry["sha256"]:
                raise UserError(f"bundle {folder}: {name} does not match its sha256 in {MANIFEST} "
                                "(altered or corrupt); re-export the bundle")
    return manifest
