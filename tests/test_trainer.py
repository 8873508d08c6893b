"""The trainer itself: teardown on an exception, the golden loss curve, the switches it reads.

The golden baseline: the default run's (``python -m k2train.train``: k2_tiny, fp32, the embedded
corpus, MuonClip) first 20 losses on one thread, stored in tests/assets/loss_k2_tiny.json and
compared exactly, so that any numerical change is seen and re-baselined on purpose:

    python tests/test_trainer.py --update-golden
"""

import gc
import json
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from k2train.config import load_config
from k2train.data_pipeline.loader import build_data_loader, load_tokenizer
from k2train.faults import NonFiniteError
from k2train.trainer import Trainer
from parallel_harness import nonfinite_output

GOLDEN = Path(__file__).parent / "assets" / "loss_k2_tiny.json"
GOLDEN_STEPS = 20
QUIET = ["logging.wandb=false", "logging.progress_bar=false", "logging.console=false", "trainer.device=cpu"]


def _small(out: Path, *overrides: str):
    return load_config([
        "model=k2_tiny", "trainer.seq_len=32", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
        f"trainer.output_dir={out}", "trainer.checkpoint.export_hf=false", *QUIET, *overrides,
    ])


class _Boom(RuntimeError):
    pass


def test_an_exception_mid_run_tears_everything_down(tmp_path, monkeypatch):
    """Step 3 raises: the asynchronous save of step 2 is drained and complete on disk, the data
    thread is stopped, the signal handlers are back, the metrics file is closed."""
    cfg = _small(tmp_path, "trainer.steps=6", "trainer.checkpoint.interval=1", "trainer.checkpoint.async_save=true",
                 "data.prefetch=4")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    threads = set(threading.enumerate())  # other tests' threads are not ours to check
    launch_step = Trainer.launch_step

    def failing_step(self, batches):
        if self.step == 2:
            raise _Boom("injected at step 3")
        return launch_step(self, batches)

    monkeypatch.setattr(Trainer, "launch_step", failing_step)
    with pytest.raises(_Boom):
        with Trainer(cfg, run_dir=tmp_path / "logs") as trainer:
            trainer.run()
    assert trainer.checkpointer._pending is None
    assert (tmp_path / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    assert not [t for t in set(threading.enumerate()) - threads if t.name == "k2-data"]
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert trainer.logger.jsonl is None
    trainer.close()  # idempotent


def _everything(trainer: Trainer) -> dict:
    """Every bit a step may change: params and buffers (router biases) of every part, and every
    optimizer state tensor (moments, momentum buffers, fp32 masters, AdamW's step counts)."""
    out = {f"{i}.{k}": v.detach().clone() for i, part in enumerate(trainer.parts) for k, v in part.state_dict().items()}
    for j, (p, st) in enumerate(trainer.optimizer.state.items()):
        out.update({f"opt{j}.{k}": v.detach().clone() for k, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.mark.parametrize("optim,param_dtype,bad", [("muonclip", "float32", float("nan")),
                                                   ("adamw", "bfloat16", float("inf"))])
def test_a_nonfinite_step_changes_no_bit_and_training_goes_on(tmp_path, optim, param_dtype, bad):
    # The update of a step with a NaN / inf loss is masked on the device: weights, fp32 masters,
    # moments, momentum buffers, AdamW's step counts and the router biases keep every bit, and so
    # do the attention weights although a tiny QK-Clip tau clips every head of a finite step; the
    # host counts the step as skipped when it reads it; the next step trains.
    cfg = _small(tmp_path, f"optim={optim}", f"trainer.param_dtype={param_dtype}", f"trainer.dtype={param_dtype}",
                 "optim.qk_clip=true", "optim.qk_clip_tau=0.01",
                 "trainer.checkpoint.enable=false", "trainer.steps=3")
    with Trainer(cfg, run_dir=tmp_path / "logs") as trainer:
        first = trainer.train_step(trainer.next_batches())
        assert not first.skipped and first.layers["clipped_heads"] > 0
        before = _everything(trainer)
        hooks = nonfinite_output(trainer, {2}, bad)
        stats = trainer.read_step(trainer.launch_step(trainer.next_batches()))
        for h in hooks:
            h.remove()
        assert stats.skipped and stats.step == 2 and trainer.guard.skipped == 1
        after = _everything(trainer)
        assert after.keys() == before.keys()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert not changed, changed
        third = trainer.train_step(trainer.next_batches())
        assert not third.skipped and torch.isfinite(torch.tensor(third.loss))
        assert trainer.progress["tokens_seen"] == 2 * trainer.tokens_per_step
        moved = [k for k, v in _everything(trainer).items() if not torch.equal(v, after[k])]
        assert any(k.endswith("e_score_correction_bias") for k in moved) and any("q_b_proj" in k for k in moved)


def test_run_reads_the_device_every_log_interval_steps_one_step_late(tmp_path, monkeypatch):
    # log_interval=3, 7 steps, a NaN at step 5: run() reads steps 1-3 after launching step 4, 4-6
    # after 7, and 7 at once (the last step); every step reaches the JSONL but the skipped one,
    # with the same losses as reading each step at once.
    cfg = lambda out, *o: _small(out, "trainer.steps=7", "trainer.log_interval=3", "trainer.checkpoint.enable=false",  # noqa: E731
                                 "logging.jsonl=true", *o)
    reads = []
    read_step = Trainer.read_step

    def recording(self, pending):
        reads.append((self.step, pending.step))
        return read_step(self, pending)

    monkeypatch.setattr(Trainer, "read_step", recording)
    with Trainer(cfg(tmp_path / "a"), run_dir=tmp_path / "a" / "logs") as trainer:
        nonfinite_output(trainer, {5}, float("nan"))
        history = trainer.run()
    assert reads == [(4, 1), (4, 2), (4, 3), (7, 4), (7, 5), (7, 6), (7, 7)]
    assert trainer.guard.skipped == 1 and trainer.progress["tokens_seen"] == 6 * trainer.tokens_per_step
    logged = [json.loads(line) for line in (tmp_path / "a" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 6, 7]
    assert [r["loss"] for r in logged] == [m["loss"] for m in history]
    with Trainer(cfg(tmp_path / "b"), run_dir=tmp_path / "b" / "logs") as trainer:
        nonfinite_output(trainer, {5}, float("nan"))
        at_once = [trainer.train_step(trainer.next_batches()) for _ in range(7)]
    assert [s.loss for s in at_once if not s.skipped] == [m["loss"] for m in history]
    reads.clear()
    with pytest.raises(NonFiniteError, match="step 5"):  # on_nonfinite=stop: every step is read at once
        with Trainer(cfg(tmp_path / "c", "trainer.on_nonfinite=stop"), run_dir=tmp_path / "c" / "logs") as trainer:
            nonfinite_output(trainer, {5}, float("nan"))
            trainer.run()
    assert reads == [(s, s) for s in range(1, 6)]


def test_evaluation_reads_held_out_data_and_changes_no_training_bit(tmp_path):
    # trainer.eval_interval=2 over 5 steps, QK-Clip firing at every step (tau 0.01) and the router
    # bias moving: the validation loss after steps 2, 4 and 5, in the JSONL and val_history, equal
    # to the held-out batches' cross entropy computed here by hand; and the training itself is bit
    # for bit the run without evaluations (the forward leaves the max logits and expert loads the
    # next update reads as they were, and the training data's position).
    common = ["trainer.steps=5", "trainer.checkpoint.enable=false", "logging.jsonl=true", "data.valid_split=0.05",
              "optim.qk_clip_tau=0.01", "data.prefetch=0"]
    runs = {}
    for name, extra in (("eval", ["trainer.eval_interval=2", "trainer.eval_steps=3"]), ("plain", [])):
        cfg = _small(tmp_path / name, *common, *extra)
        with Trainer(cfg, run_dir=tmp_path / name / "logs") as trainer:
            runs[name] = (trainer.run(), _everything(trainer), trainer.val_history)
            if name == "eval":  # by hand: the first eval_steps x micro-batches of the held-out documents
                valid = build_data_loader(cfg.data, load_tokenizer(cfg.data), cfg.trainer.seq_len,
                                          cfg.trainer.micro_batch_size, 0, 1, cfg.model.vocab_size, split="valid")
                model = trainer.parts[0].eval()
                with torch.no_grad():
                    ces = [torch.nn.functional.cross_entropy(model(b["tokens"]).flatten(0, 1), b["labels"].flatten())
                           for b in [next(valid) for _ in range(3 * trainer.num_microbatches)]]
                by_hand = torch.stack(ces).mean().item()
    (history, state, evals), (plain_history, plain_state, plain_evals) = runs["eval"], runs["plain"]
    assert [m["loss"] for m in history] == [m["loss"] for m in plain_history] and plain_evals == []
    assert all(torch.equal(state[k], plain_state[k]) for k in plain_state)
    assert [e["step"] for e in evals] == [2, 4, 5] and evals[0]["val_loss"] > evals[-1]["val_loss"]
    assert abs(evals[-1]["val_loss"] - by_hand) <= 1e-6 * by_hand
    logged = [json.loads(line) for line in (tmp_path / "eval" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in logged if "val_loss" in r] == [(e["step"], e["val_loss"]) for e in evals]
    with pytest.raises(ValueError, match="trainer.eval_interval=2 needs validation data: set data.valid_split"):
        Trainer(_small(tmp_path / "none", "trainer.eval_interval=2"), run_dir=tmp_path / "none" / "logs")


def test_time_limit_ends_the_run_with_a_checkpoint_and_the_collector_runs_at_the_loops_pace(tmp_path, monkeypatch,
                                                                                            capsys):
    # trainer.gc_interval=2: Python's collector is off while the loop runs, collects (generation 1)
    # at its start and after launching steps 2 and 4, and is back on after the run.
    # trainer.exit_after_minutes: the first step that ends past it is the run's last, checkpointed as
    # after a preemption signal; the next run resumes there.
    collected, enabled = [], []
    collect, launch_step = gc.collect, Trainer.launch_step
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation) or collect(generation))

    def recording(self, batches):
        enabled.append(gc.isenabled())
        return launch_step(self, batches)

    monkeypatch.setattr(Trainer, "launch_step", recording)
    cfg = lambda *o: _small(tmp_path, "trainer.steps=5", "trainer.checkpoint.export_hf=false", *o)  # noqa: E731
    with Trainer(cfg("trainer.gc_interval=2", "trainer.checkpoint.enable=false"), run_dir=tmp_path / "a") as trainer:
        assert len(trainer.run()) == 5
    assert enabled == [False] * 5 and gc.isenabled() and collected.count(1) == 3
    with Trainer(cfg("trainer.exit_after_minutes=1e-9", "logging.console=true"), run_dir=tmp_path / "b") as trainer:
        assert len(trainer.run()) == 1
    assert "trainer.exit_after_minutes=1e-09 reached: checkpointing at step 1 and exiting" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "step-00000001" / "COMPLETE").exists()
    with Trainer(cfg(), run_dir=tmp_path / "c") as trainer:
        assert trainer.step == 1 and len(trainer.run()) == 4


def test_eval_only_evaluates_the_checkpoint_and_trains_nothing(tmp_path, capsys):
    # trainer.eval_only=true after a run: the run's last evaluation again, exactly (same weights, same
    # batches), logged, with no step and no new checkpoint; a checkpoint trained without a held-out
    # split evaluates too (the training data's position is not restored)
    common = ["trainer.steps=3", "trainer.eval_steps=2", "logging.jsonl=true", "logging.console=true"]
    with Trainer(_small(tmp_path, *common, "data.valid_split=0.05", "trainer.eval_interval=3"),
                 run_dir=tmp_path / "train") as trainer:
        trainer.run()
        trained = trainer.val_history[-1]["val_loss"]
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    capsys.readouterr()
    with Trainer(_small(tmp_path, *common, "data.valid_split=0.05", "trainer.eval_only=true"),
                 run_dir=tmp_path / "eval") as trainer:
        assert trainer.run() == [] and trainer.step == 3
        assert trainer.val_history == [dict(trainer.val_history[0], val_loss=trained)]
    out = capsys.readouterr().out
    assert f"evaluating the checkpoint of step 3 in {tmp_path / 'checkpoints'}" in out and "resume: the config" not in out
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    logged = [json.loads(line) for line in (tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["val_loss"]) for r in logged] == [(3, trained)]
    with Trainer(_small(tmp_path / "other", "trainer.steps=2"), run_dir=tmp_path / "other" / "train") as trainer:
        trainer.run()  # no held-out split
    with Trainer(_small(tmp_path / "other", "trainer.steps=2", "data.valid_split=0.05", "trainer.eval_only=true"),
                 run_dir=tmp_path / "other" / "eval") as trainer:
        trainer.run()
        assert trainer.step == 2 and len(trainer.val_history) == 1
    with pytest.raises(ValueError, match="trainer.eval_only=true needs validation data: set data.valid_split"):
        Trainer(_small(tmp_path, "trainer.eval_only=true"), run_dir=tmp_path / "none")


def test_validation_loss_of_each_dataset_and_their_weighted_mean(tmp_path):
    # data.valid_per_dataset with a 0.7/0.3 blend of two datasets: val_loss/<name> for each (their
    # held-out documents, eval_steps batches each) and val_loss = 0.7 a + 0.3 b; each dataset's loss
    # is the one a run validating on that dataset alone gets from the same checkpoint
    import numpy as np

    from k2train.data_pipeline.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    for name, low in (("web", 0), ("code", 2000)):
        writer = IndexedDatasetWriter(tmp_path / name, np.uint16)
        for _ in range(120):
            writer.add_document([*rng.integers(low, low + 1000, int(rng.integers(20, 80))).tolist(), 4097])
        writer.finalize()
    blend = f"data.datasets=[{{path:{tmp_path / 'web'},weight:0.7}},{{path:{tmp_path / 'code'},weight:0.3}}]"
    data = ["data.source=megatron", "data.valid_split=0.1", "trainer.eval_steps=2", "trainer.steps=2"]
    with Trainer(_small(tmp_path, *data, blend, "data.valid_per_dataset=true", "trainer.eval_interval=2"),
                 run_dir=tmp_path / "train") as trainer:
        trainer.run()
        [evaluated] = trainer.val_history
    assert abs(evaluated["val_loss"] - (0.7 * evaluated["val_loss/web"] + 0.3 * evaluated["val_loss/code"])) < 1e-12
    assert evaluated["val_loss/web"] != evaluated["val_loss/code"]
    with Trainer(_small(tmp_path, *data, f"data.datasets=[{{path:{tmp_path / 'code'},weight:1.0}}]",
                        "trainer.eval_only=true"), run_dir=tmp_path / "code_only") as trainer:
        trainer.run()
        assert trainer.val_history[0]["val_loss"] == evaluated["val_loss/code"]


def test_profile_writes_a_trace_of_the_window_steps(tmp_path):
    # trainer.profile over steps 2-3 of 4: a Chrome trace holding exactly those two steps' phases, and
    # the ops table, in <run dir>/profile/; a window past the run's last step ends with the run
    def run(name, *overrides):
        cfg = _small(tmp_path / name, "trainer.steps=4", "trainer.checkpoint.enable=false",
                     "trainer.profile.enable=true", *overrides)
        with Trainer(cfg, run_dir=tmp_path / name / "logs") as trainer:
            trainer.run()
        return tmp_path / name / "logs" / "profile"

    out = run("window", "trainer.profile.start_step=2", "trainer.profile.steps=2")
    assert sorted(p.name for p in out.iterdir()) == ["rank0_steps2-3.json", "rank0_steps2-3.txt"]
    events = json.loads((out / "rank0_steps2-3.json").read_text())["traceEvents"]
    names = [e["name"] for e in events if e.get("ph") == "X"]
    for phase in ("k2train.forward_backward", "k2train.optimizer", "k2train.qk_clip_and_router_bias"):
        assert names.count(phase) == 2, phase
    assert "k2train.forward_backward" in (out / "rank0_steps2-3.txt").read_text()
    out = run("late", "trainer.profile.start_step=4", "trainer.profile.steps=5")
    assert sorted(p.name for p in out.iterdir()) == ["rank0_steps4-4.json", "rank0_steps4-4.txt"]
    for overrides, match in [(["trainer.profile.memory_snapshot=true"], "memory_snapshot=true records the CUDA"),
                             (["trainer.profile.ranks=[0,3]"], r"ranks \[3\] do not exist in a run of 1 process")]:
        with pytest.raises(ValueError, match=match):
            run("bad", *overrides)
    with pytest.raises(ValueError, match="trainer.profile.start_step=0"):
        _small(tmp_path, "trainer.profile.start_step=0").validate()


def test_a_preemption_signal_ends_the_run_after_that_step_whatever_log_interval(tmp_path):
    # SIGUSR1 arrives during step 3 of a run that reads its numbers every 10 steps: the host flags
    # are asked after each step, so the run reads steps 1-3, checkpoints step 3 and returns.
    cfg = _small(tmp_path, "trainer.steps=8", "trainer.log_interval=10", "trainer.checkpoint.interval=100")
    with Trainer(cfg, run_dir=tmp_path / "logs") as trainer:
        def hook(module, args, out):
            if trainer.step == 3:
                signal.raise_signal(signal.SIGUSR1)
        for part in trainer.parts:
            part.norm.register_forward_hook(hook)
        history = trainer.run()
    assert [m["tokens_seen"] for m in history] == [s * trainer.tokens_per_step for s in (1, 2, 3)]
    assert trainer.step == 3 and (tmp_path / "checkpoints" / "step-00000003" / "COMPLETE").exists()


def test_a_bad_data_config_after_setup_leaves_nothing_open(tmp_path):
    """A failure inside the constructor (here: the data) closes what was already built."""
    cfg = _small(tmp_path, "data=megatron", "+data.datasets=[{path: /nonexistent/shard, weight: 1.0}]")
    threads = set(threading.enumerate())
    with pytest.raises((ValueError, FileNotFoundError), match="nonexistent"):
        Trainer(cfg, run_dir=tmp_path / "logs")
    assert set(threading.enumerate()) <= threads


def test_log_files_get_plain_lines_not_progress_bar_redraws(tmp_path):
    """stdout and stderr sent to files (as under Slurm): no progress bar, no carriage return, the
    step lines at trainer.log_interval; the bar is on by default, for terminals."""
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    cmd = [sys.executable, "-m", "k2train.train", "trainer.steps=4", "trainer.log_interval=2", "trainer.seq_len=32",
           "trainer.micro_batch_size=2", "trainer.global_batch_size=2", f"trainer.output_dir={tmp_path}",
           "logging.wandb=false", "trainer.checkpoint.enable=false"]
    with open(out, "w") as fo, open(err, "w") as fe:
        subprocess.run(cmd, stdout=fo, stderr=fe, timeout=300, check=True, cwd=tmp_path)
    text = out.read_text() + err.read_text()
    assert "\r" not in text
    assert [line.split("|")[0].strip() for line in text.splitlines() if line.startswith("step ")] == ["step      2/4",
                                                                                                     "step      4/4"]


def test_bf16_steps_cast_each_dense_weight_once_per_step(tmp_path):
    # one autocast region for all micro-batches: autocast's cache makes each weight's bf16 copy
    # once a step (the routed experts cast their stacked weights themselves, once per micro-batch)
    from torch.utils._python_dispatch import TorchDispatchMode

    from k2train.model.moe import grouped_mm_supported

    if not grouped_mm_supported(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("torch < 2.13 on CPU: the experts run the per-expert loop, which casts slices, not the stacked weights")

    cfg = _small(tmp_path, "trainer.micro_batch_size=1", "trainer.dtype=bfloat16", "trainer.checkpoint.enable=false")
    with Trainer(cfg, run_dir=tmp_path / "run") as trainer:
        names = {id(p): n for part in trainer.parts for n, p in part.named_parameters()}
        casts: dict[str, int] = {}

        copies: list[weakref.ref] = []  # the dense weights' bf16 copies

        class CountCasts(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func.overloadpacket is torch.ops.aten._to_copy and id(args[0]) in names:
                    casts[names[id(args[0])]] = casts.get(names[id(args[0])], 0) + 1
                    if ".experts." not in names[id(args[0])]:
                        copies.append(weakref.ref(out))
                return out

        # when the embedding's output gets its gradient every other layer's backward is done: the
        # copies live on (the cache) for the backwards that another forward follows, not the last
        alive: list[int] = []

        def count_alive(mod, args, out):
            out.register_hook(lambda grad: alive.append(sum(c() is not None for c in copies)))

        trainer.parts[0].embed_tokens.register_forward_hook(count_alive)
        assert trainer.num_microbatches == 4
        batches = trainer.next_batches()
        with CountCasts():
            trainer.train_step(batches)
    dense = {n: c for n, c in casts.items() if ".experts." not in n}
    assert len(dense) > 10 and set(dense.values()) == {1}, dense
    assert {c for n, c in casts.items() if ".experts." in n} == {4}
    assert alive[:3] == [len(dense)] * 3 and alive[3] == 0, alive


def _golden_losses(out: Path) -> list[float]:
    """The default run's first GOLDEN_STEPS losses (its config, its schedule over 200 steps)."""
    cfg = load_config([f"trainer.output_dir={out}", "trainer.checkpoint.enable=false", *QUIET])
    losses = []
    with Trainer(cfg, run_dir=out / "logs") as trainer:
        for _ in range(GOLDEN_STEPS):
            losses.append(trainer.train_step(trainer.next_batches()).loss)
    return losses


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def _platform() -> dict:
    # the CPU model too: two AVX512 machines (one an AMD EPYC) differed by one rounding
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": _cpu_model()}


def test_default_run_matches_the_golden_losses(tmp_path, one_thread):
    """Bitwise on the platform the baseline was recorded on (torch build, CPU vector ISA and CPU
    model: other ones take other kernels and round differently); elsewhere within 1e-5 relative
    (AVX2 against AVX512 kernels, ATEN_CPU_CAPABILITY=avx2: 5 of the 20 losses differ, by at most
    1.2e-7; an AMD EPYC against the AVX512 machine of the first recording: 1 of 20, by 6.6e-8)."""
    golden = json.loads(GOLDEN.read_text())
    got = _golden_losses(tmp_path)
    want = golden["losses"]
    if golden["platform"] == _platform():
        assert got == want, "the default run's losses changed; if on purpose: python tests/test_trainer.py --update-golden"
    else:
        worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
        assert worst <= 1e-5, f"losses differ by {worst:.2e} relative from the golden ones (recorded on {golden['platform']})"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update-golden"]:
        raise SystemExit("usage: python tests/test_trainer.py --update-golden")
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        losses = _golden_losses(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"platform": _platform(), "steps": GOLDEN_STEPS, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {losses}")


class _SlowDevice:
    """A device that takes ``seconds`` a step, one step after another, from the moment the host
    starts launching it (a GPU runs kernels as they are queued), on a clock of its own where the
    host's work takes no time (so the test does not depend on how busy this machine is): a
    launched step's wait moves the clock to the end of its turn on the device."""

    def __init__(self, seconds: float):
        self.seconds, self.free, self.now = seconds, 0.0, 0.0

    def __getattr__(self, name):  # the trainer's ``time`` module, with this clock's perf_counter
        return getattr(time, name)

    def perf_counter(self) -> float:
        return self.now

    def wait_until(self, t: float) -> None:
        self.now = max(self.now, t)

    def launch(self, launch_step):
        def launch(batches):
            start = self.now
            pending = launch_step(batches)  # the host's part (on the CPU, the whole step)
            self.free = max(self.free, start) + self.seconds
            pending.ready = SimpleNamespace(synchronize=lambda until=self.free: self.wait_until(until),
                                            query=lambda until=self.free: self.now >= until)
            return pending
        return launch


@pytest.mark.parametrize("log_interval", [1, 2])
def test_step_time_is_the_devices_when_the_host_runs_ahead(tmp_path, monkeypatch, log_interval):
    # the loop reads one step late, and at once at a checkpoint and the last step: each step's
    # time is the device's, whatever the reads cover (the last read used to count two steps as
    # one), and a checkpoint's save (0.3 s of host work here) is not a step's
    import k2train.trainer as trainer_module

    device = _SlowDevice(0.4)
    monkeypatch.setattr(trainer_module, "time", device)
    cfg = _small(tmp_path, "trainer.steps=6", f"trainer.log_interval={log_interval}", "trainer.checkpoint.interval=3")
    with Trainer(cfg, run_dir=tmp_path / "logs") as trainer:
        trainer.launch_step = device.launch(trainer.launch_step)
        save = trainer.checkpointer.save
        trainer.checkpointer.save = lambda *a, **k: (device.wait_until(device.now + 0.3), save(*a, **k))
        times = [m["step_time_s"] for m in trainer.run()]
    assert times == pytest.approx([0.4] * 6, abs=1e-9), times


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim", ["adamw", "muonclip"])
def test_no_host_sync_inside_a_step_on_the_gpu(tmp_path, optim):
    """Launching a step of the Triton-kernel model on the GPU never waits for the device: CUDA's
    sync debug mode warns at each synchronizing call (the skip decision stays on the device, the
    numbers come back behind the step's work and are read later, Trainer.read_step), and no copy
    to the GPU comes from pageable host memory (the driver waits for the stream before such a
    copy, which the sync debug mode does not see): the micro-batches come from pageable memory,
    as a data loader gives them, and must cross through pinned memory.

    (The host still cannot run more than the launch queue ahead of the GPU: about 1,000 kernels,
    1,021 measured on an H100, where this model's step launches ~1,950 with AdamW and ~2,600 with
    MuonClip; so "launch_step returns before earlier GPU work is done" is no test of it.)"""
    import warnings

    overrides = ["model=k2_tiny", "trainer.seq_len=256", "trainer.micro_batch_size=2", "trainer.global_batch_size=4",
                 "trainer.dtype=bfloat16", "trainer.device=cuda", "trainer.steps=3", f"optim={optim}",
                 "trainer.checkpoint.enable=false", "logging.wandb=false", "logging.progress_bar=false",
                 "logging.console=false", "model.attn_impl=triton", "model.moe_impl=triton", "model.norm_impl=triton",
                 "model.mlp_impl=triton", "optim.ns_impl=triton", f"trainer.output_dir={tmp_path}"]
    with Trainer(load_config(overrides), run_dir=tmp_path / "logs") as t:
        t.train_step(t.next_batches())  # first step: kernels compile and autotune (their own syncs)
        batches = t.next_batches()
        assert all(v.device.type == "cpu" and not v.is_pinned() for b in batches for v in b.values())
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    pending = t.launch_step(batches)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        stats = t.read_step(pending)
    syncs = [str(w.message) for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert not syncs, syncs
    copies = sorted({e.name for e in prof.events() if e.name.startswith("Memcpy HtoD")})
    assert copies and not any("Pageable" in name for name in copies), copies  # the batches' own copies are there
    assert not stats.skipped and stats.step == 2 and torch.isfinite(torch.tensor(stats.loss))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluation_and_profile_on_the_gpu(tmp_path):
    """The Triton-kernel model with bf16 weights, FP8 MoE inputs and offload: evaluations after
    steps 2 and 4 (forward only under no_grad: the kernels' and offload's inference paths), the
    last equal to the same batches' loss computed by hand; a profile of steps 2-3 with CUDA
    kernels in its trace and the allocator's history dumped."""
    import pickle

    cfg = load_config(["model=k2_tiny", "trainer.seq_len=256", "trainer.micro_batch_size=2",
                       "trainer.global_batch_size=4", "trainer.dtype=bfloat16", "trainer.param_dtype=bfloat16",
                       "trainer.device=cuda", "trainer.steps=4", "trainer.checkpoint.enable=false",
                       "logging.wandb=false", "logging.progress_bar=false", "logging.console=false",
                       "model.attn_impl=triton", "model.moe_impl=triton", "model.norm_impl=triton",
                       "model.mlp_impl=triton", "optim.ns_impl=triton", "parallel.fp8_moe_inputs=true",
                       "parallel.offload_activations=true", "data.valid_split=0.05", "trainer.eval_interval=2",
                       "trainer.eval_steps=2", "trainer.profile.enable=true", "trainer.profile.start_step=2",
                       "trainer.profile.memory_snapshot=true", f"trainer.output_dir={tmp_path}"])
    with Trainer(cfg, run_dir=tmp_path / "logs") as trainer:
        trainer.run()
        valid = build_data_loader(cfg.data, load_tokenizer(cfg.data), cfg.trainer.seq_len,
                                  cfg.trainer.micro_batch_size, 0, 1, cfg.model.vocab_size, split="valid")
        model = trainer.parts[0].eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ces = [trainer.loss(model(b["tokens"].cuda()), b["labels"].cuda()).float()
                   for b in [next(valid) for _ in range(2 * trainer.num_microbatches)]]
        by_hand = torch.stack(ces).mean().item()
        evals = trainer.val_history
    assert [e["step"] for e in evals] == [2, 4] and all(0 < e["val_loss"] < 20 for e in evals)
    assert abs(evals[-1]["val_loss"] - by_hand) <= 1e-3 * by_hand, (evals, by_hand)
    out = tmp_path / "logs" / "profile"
    events = json.loads((out / "rank0_steps2-3.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    with open(out / "rank0_steps2-3_memory.pickle", "rb") as f:
        assert pickle.load(f)["segments"]
