"""Rule 1 of the house: the inference side, bundle, config and data never import torch."""

import subprocess
import sys

from conftest import animals


def _no_torch_after(code: str) -> None:
    probe = f"{code}\nimport sys\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_torch_free_modules_import_no_torch():
    _no_torch_after("import tandem.runtime, tandem.bundle, tandem.config, tandem.data, tandem.cli, "
                    "tandem.runtime.preprocess, tandem.images, tandem.data.cache")


def test_predicting_a_bundle_imports_no_torch(tiny_bundle, tmp_path):
    from PIL import Image

    x, _ = animals(1)
    Image.fromarray(x[0]).save(tmp_path / "a.png")
    _no_torch_after(
        "from tandem.cli import main\n"
        f"assert main(['predict', {str(tiny_bundle)!r}, {str(tmp_path)!r}, '--json']) == 0\n"
        "from tandem.data import load_dataset, split_dataset\n"
        "split_dataset(load_dataset('animals', 28, 1), 0.1, 0.1, 0)"
    )
