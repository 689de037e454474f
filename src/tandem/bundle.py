"""Write, read, verify and sign bundles: the one artifact between training and inference. Torch-free.

A bundle is a folder (one model version) holding `manifest.json`, which lists every other file by size
and sha256, and optionally `model.sig`, an OpenSSF model-signing signature over every file:

    manifest = read_manifest("bundle/")                         # UserError: malformed manifest, altered file
    onnx = read_bundle_file("bundle/", manifest, "model.onnx")  # the verified bytes: load these, not the path
    write_manifest("bundle/", manifest)                         # export: hash every file into `files`

    generate_signing_key("tandem.key", "tandem.pub")            # once (`tandem keygen`); keep tandem.key private
    check_signing_key("tandem.key")                             # UserError now rather than after an export
    sign_bundle("bundle/", "tandem.key")                        # writes bundle/model.sig
    verify_bundle_signature("bundle/", "tandem.pub")            # UserError unless that key signed these files

Hashes prove integrity, the signature proves origin. Signing needs `pip install 'tandem[sign]'`; it is
imported only when used, so reading bundles needs neither it nor torch. See docs/bundle.md, "The bundle".
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path

from tandem.errors import UserError
from tandem.files import is_temporary, write_bytes_atomic

FORMAT = "tandem-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "model.sig"
REEXPORT = "re-export the bundle"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # the elliptic curves model-signing accepts


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Hash every file in the folder into manifest['files'] and write manifest.json (atomically, fsynced)."""
    folder = Path(folder)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    # Not the manifest (it cannot hold its own hash), nor the signature (made after the manifest, covering it),
    # nor a temporary file of write_bytes_atomic.
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not is_temporary(p.name))
    manifest["files"] = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
                         for name in names if name not in (MANIFEST, SIGNATURE)}
    write_bytes_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def is_bundle(folder: str | Path) -> bool:
    """Whether folder has a manifest.json of format tandem-bundle (nothing else checked).

    Export asks before `--force` deletes a folder: only a bundle may be replaced.
    """
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _entry_problem(name: str, entry: object) -> str | None:
    # The names come from whoever wrote the bundle: none may point outside it.
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name):
        return "is not a relative POSIX path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' part"
    if not isinstance(entry, dict):
        return 'is not {"sha256": ..., "bytes": ...}'
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        return "has no sha256 of 64 lowercase hex digits"
    if type(entry.get("bytes")) is not int or entry["bytes"] < 0:
        return "has no size in bytes"
    return None


def _checked_files(folder: Path, manifest: dict) -> dict:
    """manifest['files'] once its shape is checked: {relative POSIX name: {"sha256": hex, "bytes": int}}."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise UserError(f"bundle {folder}: {MANIFEST} has no `files` table of names and hashes; {REEXPORT}")
    for name, entry in files.items():
        problem = _entry_problem(name, entry)
        if problem:
            raise UserError(f"bundle {folder}: {MANIFEST} entry {name!r} {problem}; {REEXPORT}")
    return files


def _path(folder: Path, name: str) -> Path:
    path = folder / name
    # A checked name stays inside; a symlink in the bundle still could point anywhere.
    if not path.resolve().is_relative_to(folder.resolve()):
        raise UserError(f"bundle {folder}: {name} points outside the bundle; {REEXPORT}")
    return path


def _check(folder: Path, name: str, entry: dict, size: int, digest: str) -> None:
    if size != entry["bytes"]:
        raise UserError(f"bundle {folder}: {name} does not match its size in {MANIFEST} ({size} bytes, "
                        f"listed {entry['bytes']}: altered or truncated); {REEXPORT}")
    if digest != entry["sha256"]:
        raise UserError(f"bundle {folder}: {name} does not match its sha256 in {MANIFEST} "
                        f"(altered or corrupt); {REEXPORT}")


def _check_folder(folder: Path) -> None:
    """A UserError unless folder is a folder: missing, or a file (manifest.json itself, a model file)."""
    if folder.is_dir():
        return
    if not folder.exists():
        raise UserError(f"bundle {folder} does not exist; export one with `tandem export RUN --out {folder}`")
    hint = f"pass its folder, {folder.parent}" if folder.name == MANIFEST else f"pass the folder that holds {MANIFEST}"
    raise UserError(f"{folder} is a file, not a bundle folder; {hint}")


def _not_a_bundle(folder: Path) -> str:
    message = f"{folder} is not a bundle: it has no {MANIFEST}"
    if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():
        message += f"; it is a training run: export it first with `tandem export {folder} --out BUNDLE`"
    return message


def read_manifest(folder: str | Path, verify: bool = True) -> dict:
    """Read manifest.json and check its shape; with verify, every listed file must exist and match."""
    folder = Path(folder)
    _check_folder(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(_not_a_bundle(folder)) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"bundle {folder}: {MANIFEST} is corrupt; {REEXPORT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{folder}/{MANIFEST} is not a tandem bundle manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"bundle {folder} has format version {manifest.get('format_version')}; "
                        f"this tandem reads version {FORMAT_VERSION}")
    _checked_files(folder, manifest)
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: str | Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Every listed file (but `skip`: those the caller reads and checks with read_bundle_file) must exist
    and match its size and sha256."""
    folder = Path(folder)
    for name, entry in _checked_files(folder, manifest).items():
        if name in skip:
            continue
        path = _path(folder, name)
        if not path.is_file():
            raise UserError(f"bundle {folder}: {name} is missing; {REEXPORT}")
        _check(folder, name, entry, path.stat().st_size, sha256_file(path))


def read_bundle_file(folder: str | Path, manifest: dict, name: str) -> bytes:
    """The bytes of one listed file, checked against its size and sha256. Load these bytes, not the path:

        session = onnxruntime.InferenceSession(read_bundle_file(bundle, manifest, "model.onnx"))
        weights = safetensors.numpy.load(read_bundle_file(bundle, manifest, "weights.safetensors"))

    Hashing a file and then opening it again by name would load whatever lies there by then.
    """
    folder = Path(folder)
    entry = _checked_files(folder, manifest).get(name)
    if entry is None:
        raise UserError(f"bundle {folder}: {MANIFEST} lists no sha256 for {name}; the file is unverified — {REEXPORT}")
    try:
        with open(_path(folder, name), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != entry["bytes"]:  # refuse before reading what may be a huge file
                _check(folder, name, entry, size, "")
            data = handle.read()
    except FileNotFoundError:
        raise UserError(f"bundle {folder}: {name} is missing; {REEXPORT}") from None
    except OSError as err:
        raise UserError(f"bundle {folder}: cannot read {name} ({err.strerror}); {REEXPORT}") from None
    _check(folder, name, entry, len(data), sha256_bytes(data))  # the bytes returned, not the file
    return data


# Signing: OpenSSF model-signing, with an elliptic-curve key pair, offline.

def _model_signing():
    try:
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError:  # model-signing itself, or OpenSSL (pyopenssl), which it imports undeclared
        raise UserError("signing needs model-signing: pip install 'tandem[sign]'") from None
    return model_signing


def _hashing(model_signing):
    # Every file counts, .git* too (model-signing skips those by default); only the signature is left out,
    # so that signing again, or verifying with the signature in place, sees the files that were signed.
    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _load_key(path: str | Path, private: bool) -> None:
    """Refuse, in words, a key file model-signing would fail on with a traceback."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind, path = ("private" if private else "public"), Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {kind} key {path} ({err.strerror}); check the path") from None
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except TypeError:  # a password-protected private key
        raise UserError(f"private key {path} is encrypted; tandem signs with an unencrypted key "
                        "(`tandem keygen` makes one, readable by you alone)") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = "" if private else " (pass the public half of the key pair, e.g. tandem.pub)"
        raise UserError(f"{path} is not a PEM {kind} key{hint}; make a key pair with `tandem keygen`") from None
    public = key.public_key() if private else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in _CURVES:
        raise UserError(f"{kind} key {path} is not an elliptic-curve key (P-256, P-384 or P-521); "
                        "make a key pair with `tandem keygen`")


def check_signing_key(private_key: str | Path) -> None:
    """Raise UserError unless signing can work with this key: call it before hours of work, not after."""
    _model_signing()
    _load_key(private_key, private=True)


def sign_bundle(folder: str | Path, private_key: str | Path) -> Path:
    """Sign every file of a bundle (manifest.json included) with an EC private key; returns folder/model.sig.

        sign_bundle("bundles/animals/1", "tandem.key")   # export does this with --sign tandem.key
    """
    model_signing, folder = _model_signing(), Path(folder)
    read_manifest(folder)  # a signature must never vouch for a bundle that is already altered
    _load_key(private_key, private=True)
    signature = folder / SIGNATURE
    try:
        (model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
         .set_hashing_config(_hashing(model_signing)).sign(folder, signature))
    except (OSError, ValueError) as err:  # e.g. a symlink in the bundle, a read-only folder
        raise UserError(f"cannot sign bundle {folder}: {err}") from None
    return signature


def _changes(folder: Path, signature: Path) -> str:
    """Which files differ from those the (verified) signature lists, for the message."""
    try:
        envelope = json.loads(signature.read_text())["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    except (OSError, ValueError, KeyError, TypeError):
        return "its files differ from the signed ones"
    now = {p.relative_to(folder).as_posix(): sha256_file(p)
           for p in folder.rglob("*") if p.is_file() and p != signature}
    found = {"changed": sorted(n for n in signed if n in now and now[n] != signed[n]),
             "added": sorted(set(now) - set(signed)), "removed": sorted(set(signed) - set(now))}
    return "; ".join(f"{how}: {', '.join(names)}" for how, names in found.items() if names) or \
        "its files differ from the signed ones"


def verify_bundle_signature(folder: str | Path, public_key: str | Path) -> None:
    """Raise UserError unless folder/model.sig is a signature by public_key over exactly these files.

        verify_bundle_signature("bundles/animals/1", "tandem.pub")   # Predictor.load(..., trusted_key=...)
    """
    model_signing, folder = _model_signing(), Path(folder)
    _check_folder(folder)
    signature = folder / SIGNATURE
    if not signature.is_file():
        if not (folder / MANIFEST).exists():  # a photo folder, a training run: not unsigned, not a bundle at all
            raise UserError(_not_a_bundle(folder))
        raise UserError(f"bundle {folder} is not signed (it has no {SIGNATURE}); get a signed copy from "
                        "its publisher, or sign it with `tandem export ... --sign KEY`")
    _load_key(public_key, private=False)
    from cryptography.exceptions import InvalidSignature

    try:
        (model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
         .set_hashing_config(_hashing(model_signing)).verify(folder, signature))
    except Exception as err:  # model-signing raises ValueError for most things, others for a corrupt file
        text = str(err)
        if text.startswith("Key mismatch"):
            message = (f"bundle {folder} was signed by another key than {public_key}; refusing it: get a copy "
                       "signed with that key, or pass the key it was signed with if you trust it")
        elif isinstance(err, InvalidSignature):
            message = f"bundle {folder}: {SIGNATURE} does not verify under {public_key} (altered); refusing it"
        elif text.startswith("Signature mismatch"):
            message = (f"bundle {folder} changed after it was signed ({_changes(folder, signature)}); "
                       "get it again from its publisher, or re-export and sign it")
        else:
            message = (f"bundle {folder}: cannot check {SIGNATURE} ({text or type(err).__name__}); "
                       "get the bundle again, or re-export and sign it")
        raise UserError(message) from None


def generate_signing_key(private_path: str | Path, public_path: str | Path) -> tuple[Path, Path]:
    """Make an EC P-256 key pair as PEM files: the private key (mode 0600) signs, the public one verifies.

        generate_signing_key("tandem.key", "tandem.pub")   # `tandem keygen`; never overwrites a file

    On failure it leaves nothing behind: a key it wrote before the error is removed again.
    """
    _model_signing()  # cryptography comes with it
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    paths = Path(private_path), Path(public_path)
    if paths[0].resolve() == paths[1].resolve():
        raise UserError(f"the private and the public key need two files, got {paths[0]} twice")
    for path in paths:
        if path.exists() or path.is_symlink():
            raise UserError(f"{path} already exists; keys are never overwritten: choose another name or move it")
    key = ec.generate_private_key(ec.SECP256R1())
    pems = (key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()),
            key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    created: list[Path] = []
    try:
        for path, pem, mode in zip(paths, pems, (0o600, 0o644)):
            try:  # O_EXCL: never replace a file that appeared meanwhile; the mode is set at creation, not after
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise UserError(f"{path} already exists; keys are never overwritten: choose another name or "
                                "move it") from None
            except OSError as err:
                raise UserError(f"cannot write {path} ({err.strerror}); check the path") from None
            created.append(path)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(pem)
            except OSError as err:  # a full disk, a quota
                raise UserError(f"cannot write {path} ({err.strerror})") from None
    except BaseException:
        # Half a key pair is of no use, and would make the next try fail with "already exists".
        for path in created:
            try:
                path.unlink()
            except OSError:
                pass
        raise
    return paths
