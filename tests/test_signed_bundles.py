"""Signed bundles as a user meets them: `tandem keygen`, `export --sign`, `predict --trusted-key`,
`Predictor.load(trusted_key=...)`; and the runtime's other load options (providers, session_options)."""

import json
import shutil

import pytest

from helpers import animals, run_tandem
from tandem.errors import UserError
from tandem.runtime import Predictor


@pytest.fixture(scope="module")
def signed(tiny_run, tmp_path_factory):
    """A bundle exported and signed through the command, with its key pair and another key pair."""
    from PIL import Image

    root = tmp_path_factory.mktemp("signed")
    for name in ("key", "other"):
        run_tandem("keygen", str(root / f"{name}.pem"), str(root / f"{name}.pub"), check=True)
    bundle = root / "bundle"
    run_tandem("export", str(tiny_run.run_dir), "--out", str(bundle), "--sign", str(root / "key.pem"), check=True)
    x, _ = animals(1, classes=1)
    Image.fromarray(x[0]).save(root / "bear.png")
    return root, bundle


def _one_line(proc, expected: str) -> None:
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_keygen_makes_a_private_key_only_its_owner_reads(signed):
    root, _ = signed
    assert (root / "key.pem").stat().st_mode & 0o777 == 0o600
    _one_line(run_tandem("keygen", str(root / "key.pem"), str(root / "new.pub")), "already exists")


def test_a_signed_bundle_loads_under_its_key(signed):
    root, bundle = signed
    assert (bundle / "model.sig").is_file()
    proc = run_tandem("predict", str(bundle), str(root / "bear.png"), "--trusted-key", str(root / "key.pub"), "--json",
                      check=True)
    assert json.loads(proc.stdout)["top_k"][0]["label"]
    assert Predictor.load(bundle, trusted_key=root / "key.pub").labels[0] == "bear"


@pytest.mark.parametrize("damage, expected", [
    ("file", "changed after it was signed (changed: model.onnx"),
    ("manifest", "changed after it was signed (changed: manifest.json"),
    ("other-key", "was signed by another key"),
    ("unsigned", "is not signed"),
])
def test_a_bundle_not_as_signed_is_refused(signed, tmp_path, damage, expected):
    root, bundle = signed
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    key = root / "key.pub"
    if damage == "file":  # still matches its manifest: only the signature can tell
        from tandem.bundle import write_manifest, read_manifest

        data = bytearray((copy / "model.onnx").read_bytes())
        data[-1] ^= 1
        (copy / "model.onnx").write_bytes(bytes(data))
        manifest = read_manifest(copy, verify=False)
        write_manifest(copy, {k: v for k, v in manifest.items() if k != "files"})
        expected = "changed after it was signed (changed: manifest.json, model.onnx"
    elif damage == "manifest":
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["labels"][0] = "wolf"
        (copy / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "other-key":
        key = root / "other.pub"
    else:
        (copy / "model.sig").unlink()
    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        Predictor.load(copy, trusted_key=key)
    _one_line(run_tandem("predict", str(copy), str(root / "bear.png"), "--trusted-key", str(key)), expected)


def test_export_with_a_bad_key_fails_before_writing_anything(tiny_run, tmp_path):
    (tmp_path / "not-a-key.pem").write_text("hello")
    _one_line(run_tandem("export", str(tiny_run.run_dir), "--out", str(tmp_path / "b"), "--sign",
                         str(tmp_path / "not-a-key.pem")), "is not a PEM private key")
    assert not (tmp_path / "b").exists()


def test_load_takes_providers_and_session_options(tiny_bundle):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    predictor = Predictor.load(tiny_bundle, providers=["CPUExecutionProvider"], session_options=options)
    assert predictor.session.get_providers() == ["CPUExecutionProvider"]
    assert predictor.session.get_session_options().intra_op_num_threads == 1
    assert predictor.session.get_session_options().log_severity_level == 3
    x, _ = animals(1)
    default = Predictor.load(tiny_bundle)
    assert (predictor.logits(x) == default.logits(x)).all()
