"""compile=off|graphs|inductor|auto (train/graphs.py). The CUDA capture itself needs a GPU (benchmarks/gpu.py runs it
there); on the CPU the captured step's body, its batch bookkeeping and its eager fallback for the last batch of an
epoch run uncaptured and must train exactly as the eager loop does."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tandem.config import TrainConfig
from tandem.errors import UserError
from tandem.train import graphs
from tandem.train.loop import train


def _cfg(npz, out, **extra) -> TrainConfig:
    # 600 images: 456 train after the split, so batches of 64 leave a last batch of 8 each epoch.
    tree = {"data": {"source": str(npz)}, "model": {"name": "cnn", "width": 4}, "batch_size": 64, "epochs": 2,
            "out_dir": str(out), "progress": False, "precision": "fp32", "device": "cpu"}
    tree.update(extra)
    return TrainConfig.model_validate(tree)


def test_the_captured_step_trains_exactly_as_the_eager_loop(small_npz, tmp_path, monkeypatch):
    """Batch norm, dropout, shift and flip on: the whole-step body (batch gathered by a device index, augmentation
    drawn inside it, forward, backward, optimizer, sums on the device) gives the eager loop's weights and metrics to
    the bit, with the epoch's short last batch going through the eager path in between."""
    eager = train(_cfg(small_npz, tmp_path / "eager", model={"name": "cnn", "width": 4, "dropout": 0.2}),
                  log=lambda *a, **k: None)

    steps = []
    real_step = graphs.CapturedStep.step

    def counted(self, index, lr):
        steps.append(len(index))
        return real_step(self, index, lr)

    monkeypatch.setattr(graphs, "resolve", lambda *a: "graphs")  # what a CUDA run resolves to
    monkeypatch.setattr(graphs.CapturedStep, "step", counted)
    lines = []
    whole = train(_cfg(small_npz, tmp_path / "whole", model={"name": "cnn", "width": 4, "dropout": 0.2}),
                  log=lambda *a, **k: lines.append(" ".join(map(str, a))))

    per_epoch = eager.metrics["steps"] // 2
    assert steps and set(steps) == {64} and len(steps) == 2 * (per_epoch - 1)  # every full batch, not the last
    assert any("compile=graphs" in line for line in lines)
    a = load_file(str(eager.last_checkpoint / "model.safetensors"))
    b = load_file(str(whole.last_checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("eager", "whole")]
    for one, other in zip(*records):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert one[key] == other[key], key
    assert whole.metrics["test_accuracy"] == eager.metrics["test_accuracy"]


class _Stop(Exception):
    pass


def test_a_captured_run_resumes_exactly(small_npz, tmp_path, monkeypatch):
    """Stopped right after the first checkpoint (mid epoch 2) and resumed under the captured step: bitwise the
    weights of an uninterrupted run."""
    import tandem.train.loop as loop

    monkeypatch.setattr(graphs, "resolve", lambda *a: "graphs")
    settings = {"checkpoint_every": 9, "model": {"name": "cnn", "width": 4, "dropout": 0.2}}
    straight = train(_cfg(small_npz, tmp_path / "straight", **settings), log=lambda *a, **k: None)

    real_save = loop.ckpt.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Stop

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", save_then_stop)
    cfg = _cfg(small_npz, tmp_path / "cut", **settings)
    with pytest.raises(_Stop):
        train(cfg, log=lambda *a, **k: None)
    monkeypatch.setattr(loop.ckpt, "save_checkpoint", real_save)
    resumed = train(cfg, resume=True, log=lambda *a, **k: None)
    a = load_file(str(straight.last_checkpoint / "model.safetensors"))
    b = load_file(str(resumed.last_checkpoint / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _resolve(device: str, world: int = 1, streamed: bool = False, **extra) -> str:
    return graphs.resolve(TrainConfig.model_validate(extra), torch.device(device), world, streamed)


def test_auto_picks_graphs_only_where_a_captured_step_can_run():
    assert _resolve("cuda") == "off"  # the default, until the capture has been checked on a GPU
    assert _resolve("cuda", compile="auto") == "graphs"
    assert _resolve("cpu", compile="auto") == "off"
    assert _resolve("cuda", world=2, compile="auto") == "off"
    assert _resolve("cuda", streamed=True, compile="auto") == "off"
    assert _resolve("cuda", optim={"grad_accum": 2}, compile="auto") == "off"
    assert _resolve("cpu", compile="inductor") == "inductor"
    assert _resolve("cuda", world=2, compile="inductor") == "inductor"  # ddp


@pytest.mark.parametrize("where, words", [
    ({"device": "cpu"}, "needs a CUDA GPU"),
    ({"device": "cuda", "world": 2}, "one process"),
    ({"device": "cuda", "streamed": True}, "data.stream=off"),
    ({"device": "cuda", "optim": {"grad_accum": 4}}, "optim.grad_accum=1"),
])
def test_compile_graphs_where_it_cannot_run_says_why(where, words):
    with pytest.raises(UserError, match=words):
        _resolve(compile="graphs", **where)


def test_compile_off_from_the_command_line_and_yaml(tmp_path):
    """YAML 1.1 reads a bare off as false: compile=off and `compile: off` must still mean "off"."""
    from tandem.config import load_config

    assert load_config(None, ["compile=off"]).compile == "off"
    (tmp_path / "run.yaml").write_text("compile: off\n")
    assert load_config(tmp_path / "run.yaml").compile == "off"
    with pytest.raises(UserError, match="compile"):
        load_config(None, ["compile=on"])


def test_compile_inductor_without_a_compiler_says_so(monkeypatch):
    monkeypatch.setattr(graphs, "_cxx_compiler", lambda: None)
    with pytest.raises(UserError, match="no C\\+\\+ compiler is installed"):
        _resolve("cpu", compile="inductor")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_a_resumed_optimizer_takes_this_runs_capturable_choice(name):
    """load_state_dict brings back the checkpoint's fused / capturable flags; set_capturable puts this run's back."""
    from tandem.train.optim import make_optimizer, set_capturable

    cfg = TrainConfig.model_validate({"optim": {"name": name}})
    model = torch.nn.Linear(3, 2)
    saved = make_optimizer(cfg, list(model.named_parameters()))
    model(torch.randn(4, 3)).sum().backward()
    saved.step()
    optimizer = make_optimizer(cfg, list(model.named_parameters()))
    optimizer.load_state_dict(saved.state_dict())
    key = "fused" if name == "sgd" else "capturable"
    set_capturable(optimizer, True)
    assert all(group[key] for group in optimizer.param_groups)
    set_capturable(optimizer, False)
    assert not any(group[key] for group in optimizer.param_groups)
    if name == "adamw":  # the step counters stay where torch keeps them uncaptured: float32 on the CPU
        steps = [state["step"] for state in optimizer.state.values()]
        assert steps and all(step.device.type == "cpu" and step.dtype == torch.float32 for step in steps)


def test_compile_inductor_refuses_split_models():
    for strategy in ("tensor", "pipeline"):
        with pytest.raises(UserError, match="compile=inductor works in one process"):
            _resolve("cpu", world=2, compile="inductor", parallel={"strategy": strategy})


def test_cli_compile_graphs_on_the_cpu_is_one_line(small_npz, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tandem", "train", f"data.source={small_npz}", "device=cpu",
                          "compile=graphs", f"out_dir={tmp_path / 'run'}", "epochs=1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "compile=graphs" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing left behind


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="compile=inductor builds C++ kernels: install g++ "
                                                         "(scripts/system-deps.sh does, as root)")
def test_inductor_gives_eager_gradients_and_a_plain_checkpoint(small_npz, tmp_path):
    """torch.compile (inductor, C++ kernels on the CPU) fuses and reorders the arithmetic: one forward and backward
    through the engine agrees with eager to rounding (a training run is too chaotic to compare after many steps:
    even eager with 1 thread and with 2 parts after a few). Compared in float64: in float32 the reordering alone
    moves the first layers' gradients by up to 3% (relative to their largest) on some seeds and models, through the
    batch norms' variance, so a float32 tolerance would pass or fail by the seed; in float64 they agree to 1e-14.
    A compiled run checkpoints the plain model."""
    import copy

    import torch.nn.functional as F

    from tandem.train.parallel.engine import Engine
    from tandem.train.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", 1, 28, 10, 8, 0.0).double().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    x = torch.randn(64, 1, 28, 28, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))

    def loss_fn(logits, target):
        return F.cross_entropy(logits, target, label_smoothing=0.1)

    eager = Engine(None, model, loss_fn, lambda: torch.autocast("cpu", enabled=False))
    compiled = Engine(None, twin, loss_fn, lambda: torch.autocast("cpu", enabled=False))
    compiled.compile()
    loss_a, correct_a, _ = eager.forward_backward(x, y, 1.0)
    loss_b, correct_b, _ = compiled.forward_backward(x, y, 1.0)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-12)
    assert correct_a == correct_b
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):  # batch-norm statistics
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)

    run = train(_cfg(small_npz, tmp_path / "inductor", compile="inductor", epochs=1), log=lambda *a, **k: None)
    reference = create_model("cnn", 1, 28, 10, 4, 0.0).state_dict()
    saved = load_file(str(run.last_checkpoint / "model.safetensors"))
    assert saved.keys() == reference.keys()  # no _orig_mod. prefixes
    assert run.metrics["parallel"] == {"strategy": "single", "processes": 1}
