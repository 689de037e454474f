"""The bundle contract: every file the runtime loads is listed, and the bytes checked are the bytes loaded;
a malformed manifest is a message, not a KeyError; a signed bundle verifies only under its key and only
as signed (OpenSSF model-signing, real keys, real files)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save_file

from tandem.bundle import (SIGNATURE, check_signing_key, generate_signing_key, is_bundle, read_bundle_file, read_manifest,
                           sign_bundle, verify_bundle_signature, write_manifest)
from tandem.errors import UserError


def _refused(match: str, fn, *args) -> str:
    """fn(*args) raises a one-line UserError matching `match` (never a KeyError or a traceback)."""
    with pytest.raises(UserError, match=match) as caught:
        fn(*args)
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.fixture
def bundle(tmp_path):
    """A small real bundle, made without torch: an ONNX graph (y = 2x), safetensors weights, the manifest."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "double",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    save_file({"w": np.arange(6, dtype=np.float32)}, str(folder / "weights.safetensors"))
    write_manifest(folder, {"name": "double", "version": 1})
    return folder


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two real EC key pairs: ours (trusted) and another signer's."""
    folder = tmp_path_factory.mktemp("keys")
    return {who: generate_signing_key(folder / f"{who}.key", folder / f"{who}.pub") for who in ("ours", "other")}


def _edit_manifest(folder, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


# Files that are verified: what is loaded is what was checked.

def test_read_bundle_file_returns_the_verified_bytes_and_they_load(bundle):
    manifest = read_manifest(bundle)
    assert set(manifest["files"]) == {"model.onnx", "weights.safetensors"}
    data = read_bundle_file(bundle, manifest, "model.onnx")
    assert data == (bundle / "model.onnx").read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": np.ones((3, 2), np.float32)})[0], np.full((3, 2), 2.0))
    weights = load_safetensors(read_bundle_file(bundle, manifest, "weights.safetensors"))
    np.testing.assert_array_equal(weights["w"], np.arange(6))


def test_read_bundle_file_refuses_a_file_changed_after_the_manifest_was_read(bundle):
    manifest = read_manifest(bundle)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / "model.onnx").write_bytes(bytes(data))
    _refused("model.onnx does not match its sha256 in manifest.json", read_bundle_file, bundle, manifest, "model.onnx")
    (bundle / "weights.safetensors").write_bytes(b"x" * 10)
    _refused("weights.safetensors does not match its size", read_bundle_file, bundle, manifest, "weights.safetensors")
    (bundle / "weights.safetensors").unlink()
    _refused("weights.safetensors is missing", read_bundle_file, bundle, manifest, "weights.safetensors")


def test_a_model_the_manifest_does_not_list_is_refused(bundle):
    _edit_manifest(bundle, lambda m: m["files"].pop("model.onnx"))
    manifest = read_manifest(bundle)  # the listed files verify; the unlisted one must not load
    message = _refused("lists no sha256 for model.onnx; the file is unverified", read_bundle_file,
                       bundle, manifest, "model.onnx")
    assert str(bundle) in message and "re-export the bundle" in message


GOOD = {"sha256": "0" * 64, "bytes": 1}


@pytest.mark.parametrize("files, named", [
    (["model.onnx"], "no `files` table"),
    ({"model.onnx": {"bytes": 1}}, "'model.onnx' has no sha256"),
    ({"model.onnx": {"sha256": "z" * 64, "bytes": 1}}, "'model.onnx' has no sha256 of 64 lowercase hex"),
    ({"model.onnx": {"sha256": "A" * 64, "bytes": 1}}, "'model.onnx' has no sha256"),
    ({"model.onnx": {"sha256": "0" * 63, "bytes": 1}}, "'model.onnx' has no sha256"),
    ({"model.onnx": {"sha256": "0" * 64}}, "'model.onnx' has no size"),
    ({"model.onnx": {"sha256": "0" * 64, "bytes": "1"}}, "'model.onnx' has no size"),
    ({"model.onnx": {"sha256": "0" * 64, "bytes": True}}, "'model.onnx' has no size"),
    ({"model.onnx": "0" * 64}, "'model.onnx' is not"),
    ({"../x": GOOD}, r"'\.\./x' has an empty, '\.' or '\.\.' part"),
    ({"a/../../x": GOOD}, "'a/../../x' has an empty"),
    ({"/etc/passwd": GOOD}, "'/etc/passwd' is not a relative POSIX path"),
    ({"C:/x": GOOD}, "'C:/x' is not a relative POSIX path"),
    ({"a\\b": GOOD}, "is not a relative POSIX path"),
    ({"": GOOD}, "'' is not a relative POSIX path"),
])
def test_a_malformed_manifest_is_a_message_not_a_crash(bundle, files, named):
    _edit_manifest(bundle, lambda m: m.update(files=files))
    for verify in (True, False):  # the shape is checked even when the hashes are not
        message = _refused(named, read_manifest, bundle, verify)
        assert message.startswith(f"bundle {bundle}: manifest.json") and message.endswith("re-export the bundle")
    _edit_manifest(bundle, lambda m: m.pop("files"))
    _refused("no `files` table", read_manifest, bundle)


def test_a_listed_file_may_not_lie_outside_the_bundle(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "model.onnx", outside)
    (bundle / "model.onnx").symlink_to(outside)  # same bytes, same hash: still not the bundle's file
    _refused("model.onnx points outside the bundle", read_manifest, bundle)
    _refused("model.onnx points outside the bundle", read_bundle_file, bundle, read_manifest(bundle, False), "model.onnx")


def test_is_bundle_tells_a_bundle_from_any_other_folder(bundle, tmp_path):
    assert is_bundle(bundle)
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"png")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "something-else"}')
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "manifest.json").write_bytes(b"\xff{")
    for folder in ("empty", "photos", "other", "corrupt", "absent"):
        assert not is_bundle(tmp_path / folder), folder


def test_the_manifest_lists_neither_itself_nor_the_signature(bundle, keys):
    sign_bundle(bundle, keys["ours"][0])
    manifest = write_manifest(bundle, {"name": "double"})  # written again beside a signature
    assert set(manifest["files"]) == {"model.onnx", "weights.safetensors"}


# Signed bundles: origin, not just integrity.

def test_a_signed_bundle_verifies_under_its_key(bundle, keys):
    assert sign_bundle(bundle, keys["ours"][0]) == bundle / SIGNATURE
    verify_bundle_signature(bundle, keys["ours"][1])
    assert "model.sig" not in read_manifest(bundle)["files"]
    sign_bundle(bundle, keys["ours"][0])  # signing again ignores the old signature
    verify_bundle_signature(bundle, keys["ours"][1])


def test_a_real_exported_bundle_signs_and_verifies(tiny_bundle, tmp_path, keys):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    sign_bundle(bundle, keys["ours"][0])
    verify_bundle_signature(bundle, keys["ours"][1])
    data = read_bundle_file(bundle, read_manifest(bundle), "model.onnx")
    assert ort.InferenceSession(data, providers=["CPUExecutionProvider"]).get_inputs()[0].name == "input"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    ("file", r"changed after it was signed \(changed: model.onnx\)"),
    ("manifest", r"changed after it was signed \(changed: manifest.json\)"),
    ("added", r"changed after it was signed \(added: extra/notes.txt\)"),
    ("git-file", r"changed after it was signed \(added: .gitattributes\)"),
    ("removed", r"changed after it was signed \(removed: weights.safetensors\)"),
    ("other-key", "was signed by another key than"),
    ("altered-signature", "model.sig does not verify under"),
    ("corrupt-signature", "cannot check model.sig"),
    ("unsigned", "is not signed \\(it has no model.sig\\)"),
])
def test_a_bundle_not_as_signed_by_the_trusted_key_is_refused(bundle, keys, damage, expected):
    sign_bundle(bundle, keys["other" if damage == "other-key" else "ours"][0])
    if damage == "file":
        _flip_a_byte(bundle / "model.onnx")
    elif damage == "manifest":  # the hashes still match: only the signature can tell
        _edit_manifest(bundle, lambda m: m.update(labels=["cat", "dog"]))
        read_manifest(bundle)
    elif damage == "added":
        (bundle / "extra").mkdir()
        (bundle / "extra" / "notes.txt").write_text("added after signing")
    elif damage == "git-file":  # model-signing skips .git* by default; a bundle has none to skip
        (bundle / ".gitattributes").write_text("* binary")
    elif damage == "removed":
        (bundle / "weights.safetensors").unlink()
    elif damage == "altered-signature":
        signature = json.loads((bundle / SIGNATURE).read_text())
        envelope = signature["dsseEnvelope"]
        envelope["payload"] = envelope["payload"][:-8] + ("A" if envelope["payload"][-8] != "A" else "B") + \
            envelope["payload"][-7:]
        (bundle / SIGNATURE).write_text(json.dumps(signature))
    elif damage == "corrupt-signature":
        (bundle / SIGNATURE).write_text("{not json")
    elif damage == "unsigned":
        (bundle / SIGNATURE).unlink()
    message = _refused(expected, verify_bundle_signature, bundle, keys["ours"][1])
    assert message.startswith(f"bundle {bundle}")


def test_signing_refuses_a_bundle_that_is_already_altered(bundle, keys):
    _flip_a_byte(bundle / "weights.safetensors")
    _refused("weights.safetensors does not match its sha256", sign_bundle, bundle, keys["ours"][0])
    assert not (bundle / SIGNATURE).exists()


def test_bad_key_files_are_messages(bundle, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    sign_bundle(bundle, keys["ours"][0])
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        s.Encoding.PEM, s.PrivateFormat.PKCS8, s.BestAvailableEncryption(b"secret")))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    _refused("is not a PEM public key \\(pass the public half", verify_bundle_signature, bundle, keys["ours"][0])
    _refused("garbage.pub is not a PEM public key", verify_bundle_signature, bundle, garbage)
    _refused("public key .*rsa.pub is not an elliptic-curve key", verify_bundle_signature, bundle, rsa_pub)
    _refused("cannot read public key .*absent.pub \\(No such file", verify_bundle_signature, bundle, tmp_path / "absent.pub")
    _refused("is not a PEM private key", sign_bundle, bundle, keys["ours"][1])
    _refused("encrypted.key is encrypted", sign_bundle, bundle, encrypted)
    _refused("is not a PEM private key", check_signing_key, keys["ours"][1])  # what export asks first
    check_signing_key(keys["ours"][0])
    verify_bundle_signature(bundle, keys["ours"][1])  # a failed signing left the signature as it was


def test_generated_keys_are_private_and_never_overwritten(tmp_path):
    private, public = generate_signing_key(tmp_path / "a.key", tmp_path / "a.pub")
    assert os.stat(private).st_mode & 0o777 == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    _refused("a.key already exists; keys are never overwritten", generate_signing_key, private, tmp_path / "b.pub")
    _refused("a.pub already exists", generate_signing_key, tmp_path / "b.key", public)
    assert private.read_bytes() == before and not (tmp_path / "b.key").exists()
    _refused("two files", generate_signing_key, tmp_path / "c", tmp_path / "c")


def test_without_model_signing_signing_says_what_to_install(bundle, keys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "model_signing", None)  # what `import model_signing` meets when absent
    install = r"signing needs model-signing: pip install 'tandem\[sign\]'"
    _refused(install, sign_bundle, bundle, keys["ours"][0])
    _refused(install, check_signing_key, keys["ours"][0])
    _refused(install, verify_bundle_signature, bundle, keys["ours"][1])
    _refused(install, generate_signing_key, tmp_path / "k.key", tmp_path / "k.pub")
    read_bundle_file(bundle, read_manifest(bundle), "model.onnx")  # reading needs no signing library


def test_reading_bundles_imports_neither_torch_nor_model_signing(bundle):
    probe = ("import sys\nfrom tandem.bundle import read_manifest, read_bundle_file, is_bundle\n"
             f"m = read_manifest({str(bundle)!r})\nread_bundle_file({str(bundle)!r}, m, 'model.onnx')\n"
             "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'model_signing', 'cryptography'))\n"
             "assert not bad, bad\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# Not a bundle: a file, a training run; keys that cannot be written. Each said the wrong thing before.

def test_a_file_is_not_a_bundle_folder(bundle, keys):
    for path in (bundle / "manifest.json", bundle / "model.onnx"):
        message = _refused("is a file, not a bundle folder", read_manifest, path)
        assert message.startswith(str(path)) and "does not exist" not in message
        _refused("is a file, not a bundle folder", verify_bundle_signature, path, keys["ours"][1])
    assert f"pass its folder, {bundle}" in _refused("is a file", read_manifest, bundle / "manifest.json")


@pytest.mark.parametrize("marker", ["checkpoints", "config.yaml"])
def test_a_training_run_is_not_a_bundle_and_the_message_says_to_export_it(tmp_path, keys, marker):
    run = tmp_path / "run"
    run.mkdir()
    if marker == "checkpoints":
        (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    else:
        (run / "config.yaml").write_text("seed: 0\n")
    export = f"it is a training run: export it first with `tandem export {run} --out BUNDLE`"
    assert export in _refused(f"{run} is not a bundle: it has no manifest.json", read_manifest, run)
    assert export in _refused("is not a bundle", verify_bundle_signature, run, keys["ours"][1])
    (tmp_path / "photos").mkdir()  # any other folder: not a bundle, and nothing about runs
    assert "training run" not in _refused("is not a bundle: it has no manifest.json", read_manifest, tmp_path / "photos")


def test_a_key_pair_that_cannot_be_written_leaves_nothing_behind(tmp_path):
    private = tmp_path / "k.key"
    message = _refused(r"cannot write .*k.pub \(No such file or directory\)", generate_signing_key,
                       private, tmp_path / "nodir" / "k.pub")
    assert "never overwritten" not in message
    assert not private.exists()  # the private half is removed again...
    generate_signing_key(private, tmp_path / "k.pub")  # ...so the next try (a good path) works
    assert private.is_file() and (tmp_path / "k.pub").is_file()
    message = _refused(r"cannot write .*k2.key \(No such file", generate_signing_key, tmp_path / "nodir" / "k2.key",
                       tmp_path / "k2.pub")
    assert "never overwritten" not in message and not (tmp_path / "k2.pub").exists()


def test_the_module_points_at_documentation_that_exists():
    import tandem.bundle

    assert "DESIGN.md" not in tandem.bundle.__doc__ and 'docs/bundle.md, "The bundle"' in tandem.bundle.__doc__
    page = Path(__file__).resolve().parents[1] / "docs" / "bundle.md"
    assert "# The bundle" in page.read_text()
