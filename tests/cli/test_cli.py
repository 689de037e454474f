"""The `tandem` command as a user runs it: in a fresh process, one-line errors, JSON beside text."""

import json
import time

import pytest

from helpers import animals, make_folder, run_tandem


def _one_line_error(proc, expected: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_is_instant_and_lists_the_commands():
    start = time.perf_counter()
    proc = run_tandem("--help", check=True)
    assert time.perf_counter() - start < 5  # generous for a loaded CI box; the benchmark measures it properly
    for command in ("demo", "train", "export", "predict", "config", "keygen"):
        assert command in proc.stdout
    assert run_tandem().returncode == 2


@pytest.mark.parametrize("args, expected", [
    (["train", "optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    (["train", "data.source=/no/such/folder"], "/no/such/folder does not exist"),
    (["train", "missing.yaml"], "config file missing.yaml does not exist"),
    (["train", "--resume", "/no/such/run"], "no config.yaml there"),
    (["export", "/no/such/run", "--out", "/tmp/x"], "/no/such/run does not exist"),
    (["predict", "/no/such/bundle", "a.png"], "bundle /no/such/bundle does not exist"),
])
def test_user_mistakes_get_one_line(args, expected):
    _one_line_error(run_tandem(*args), expected)


@pytest.mark.parametrize("args, expected", [
    (["demo", "--epochs", "0"], "argument --epochs: 0 is out of range; give a number from 1 to 10000"),
    (["demo", "--epochs", "20000"], "argument --epochs: 20000 is out of range; give a number from 1 to 10000"),
    (["demo", "--seed", str(2**40)], "argument --seed: 1099511627776 is out of range"),
    (["demo", "--seed", "x"], "argument --seed: 'x' is not a whole number"),
    (["predict", "b", "a.png", "--top-k", "0"], "argument --top-k: 0 is out of range"),
    (["demo", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16'"),
])
def test_bad_options_get_usage_and_the_reason(args, expected):
    proc = run_tandem(*args)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_predict_and_export_through_the_command(tiny_run, tiny_bundle, tmp_path):
    from PIL import Image

    x, y = animals(1)
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    proc = run_tandem("predict", str(tiny_bundle), str(tmp_path), "--top-k", "3", "--json", check=True)
    answers = [json.loads(line) for line in proc.stdout.splitlines()]  # JSON Lines
    assert len(answers) == 10 and all(len(a["top_k"]) == 3 for a in answers)
    text = run_tandem("predict", str(tiny_bundle), str(tmp_path / "0.png"), check=True).stdout
    assert text.startswith(f"{tmp_path / '0.png'}: ") and "%" in text
    # One unreadable file among good ones: reported and skipped, the rest classified, exit 1 at the end.
    (tmp_path / "5-bad.png").write_bytes(b"nope")
    proc = run_tandem("predict", str(tiny_bundle), str(tmp_path), "--json")
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1 and len(lines) == 11 and "Traceback" not in proc.stderr
    assert [line["path"] for line in lines] == sorted(line["path"] for line in lines)  # input order
    bad = [line for line in lines if "error" in line]
    assert len(bad) == 1 and bad[0]["path"].endswith("5-bad.png") and "cannot read image" in bad[0]["error"]
    assert "1 file(s) could not be read" in proc.stderr
    _one_line_error(run_tandem("export", str(tiny_run.run_dir), "--out", str(tiny_bundle)), "--force")
    _one_line_error(run_tandem("export", str(tmp_path), "--out", str(tmp_path / "b")), "no usable checkpoint")


@pytest.mark.slow
def test_train_export_predict_on_a_users_image_folder(tmp_path):
    """No code change: a folder of RGB JPEGs of any size, class names from the sub-folders."""
    data = make_folder(tmp_path / "photos", per_class=40, classes=("bird", "cat", "horse"), rgb=True)
    run = tmp_path / "run"
    proc = run_tandem("train", f"data.source={data}", "data.channels=3", "data.image_size=32", "model.name=resnet",
                      "model.width=8", "epochs=2", "batch_size=32", f"out_dir={run}", "--json", check=True)
    metrics = json.loads(proc.stdout)
    assert metrics["test_images"] == 12 and 0 <= metrics["test_accuracy"] <= 1
    for name in ("curves.png", "confusion.png", "metrics.jsonl", "config.yaml", "results.json"):
        assert (run / name).is_file(), name
    bundle = tmp_path / "bundle"
    run_tandem("export", str(run), "--out", str(bundle), check=True)
    lines = run_tandem("predict", str(bundle), str(data / "cat"), "--json", check=True).stdout.splitlines()
    answers = [json.loads(line) for line in lines]
    assert len(answers) == 40
    assert {a["top_k"][0]["label"] for a in answers} <= {"bird", "cat", "horse"}


@pytest.mark.slow
def test_demo_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    proc = run_tandem("demo", "--out", str(out), "--epochs", "2", "--json", check=True, timeout=600)
    report = json.loads(proc.stdout)
    assert json.loads((out / "report.json").read_text()) == report
    for key in ("test_accuracy", "train_seconds", "images_per_second", "demo_accuracy_100", "bundle"):
        assert key in report
    assert report["seed"] == 0 and report["epochs"] == 2
    assert 0 < report["train_seconds"] <= report["train_wall_seconds"]
    truth = json.loads((out / "holdout" / "truth.json").read_text())
    assert len(truth) == 100 and len(set(truth)) == 10
    # Two epochs already beat chance (0.1) by far: 89% on the validation split. One is not enough since the cnn's
    # last pool rounds up (issue 19): 40-47% after one epoch (seeds 0, 1), against 76-78% for the floor-pooled cnn.
    assert report["demo_accuracy_100"] > 0.5
    for name in ("contact_sheet.png", "curves.png", "confusion.png", "bundle/manifest.json", "bundle/model.onnx"):
        assert (out / name).is_file(), name


def test_demo_never_replaces_files_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    (out / "run").mkdir(parents=True)
    (out / "run" / "important.txt").write_text("mine")
    _one_line_error(run_tandem("demo", "--out", str(out)), "holds files the demo did not write")
    assert (out / "run" / "important.txt").read_text() == "mine"


def test_output_piped_into_head_is_no_error():
    import subprocess
    import sys

    # `true` exits at once, long before tandem writes: the write meets a closed pipe.
    proc = subprocess.run(f"{sys.executable} -m tandem config --json | true; echo ${{PIPESTATUS[0]}}", shell=True,
                          executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "0" and "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr


def test_export_tolerance_must_be_positive(tiny_run, tmp_path):
    proc = run_tandem("export", str(tiny_run.run_dir), "--out", str(tmp_path / "b"), "--atol", "0")
    assert proc.returncode == 2 and "argument --atol: 0 must be greater than 0" in proc.stderr


def test_demo_keeps_the_config_to_the_run_folder_and_verbose(tmp_path):
    from tandem.demo import training_log

    said: list[str] = []
    for verbose in (False, True):
        log = training_log(lambda *a, **k: said.append(" ".join(map(str, a))), tmp_path / "run", verbose)
        log("config:\nepochs: 1\nseed: 0\n")
        log("export it:  tandem export run --out run/bundle")  # the demo exports the run itself
        log("epoch 1/1")
    assert said == [f"config: {tmp_path / 'run' / 'config.yaml'} (`tandem demo --verbose` prints it)", "epoch 1/1",
                    "config:\nepochs: 1\nseed: 0\n", "epoch 1/1"]


def test_a_torchrun_worker_leaves_without_the_exit_time_destructors(monkeypatch, capsys):
    """Under torchrun, gloo's threads outlive the process group and C++'s exit-time destructors would abort a
    run that succeeded (exit -6, the whole job failed): a run that succeeded ends with os._exit, its output flushed."""
    import os
    import sys

    import torch.distributed  # noqa: F401  (what a worker has loaded once it has trained)

    from tandem import cli

    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    assert cli.main(["config", "--json"]) == 0 and exits == []  # not a worker: the ordinary exit
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert "torch.distributed" in sys.modules
    cli.main(["config", "--json"])
    assert exits == [0] and capsys.readouterr().out.count('"key": "threads.count"') == 2  # both runs printed
    assert cli.main(["train", "optim.lr=-1"]) == 2
    assert exits == [0]  # a failed rank exits as usual: the other ranks get the time to print their own error
