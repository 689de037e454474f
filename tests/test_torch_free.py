"""Rule 1 of the house: the inference side, bundle, config and data never import torch."""

import subprocess
import sys

from helpers import animals


def _no_torch_after(code: str) -> None:
    probe = f"{code}\nimport sys\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_torch_free_modules_import_no_torch():
    _no_torch_after("import tandem.runtime, tandem.bundle, tandem.config, tandem.data, tandem.cli, "
                    "tandem.runtime.preprocess, tandem.images, tandem.data.cache, tandem.serve.app, "
                    "tandem.serve.client, tandem.serve.triton, tandem.explain.data, tandem.explain.occlusion, "
                    "tandem.explain.render, tandem.explain.faithfulness, tandem.cli.explain, tandem.explain.methods, "
                    "tandem.explain.evaluate, tandem.explain.explain_images, "
                    "tandem.explain.rules, tandem.explain.fit_rules")


def test_serving_a_bundle_imports_no_torch(tiny_bundle, tmp_path):
    import shutil

    shutil.copytree(tiny_bundle, tmp_path / "repo" / "animals" / "1")
    _no_torch_after(
        "from fastapi.testclient import TestClient\n"
        "from tandem.serve.app import create_app\n"
        "from tandem.serve.config import ServeConfig\n"
        f"cfg = ServeConfig.model_validate({{'store': {{'url': {str(tmp_path / 'db.sqlite')!r}}}, 'access_log': 'off'}})\n"
        f"with TestClient(create_app({str(tmp_path / 'repo')!r}, cfg, log=print)) as client:\n"
        "    body = {'inputs': [{'name': 'input', 'shape': [1, 1, 28, 28], 'datatype': 'FP32', 'data': [0.0] * 784}]}\n"
        "    assert client.post('/v2/models/animals/infer', json=body).status_code == 200"
    )


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
