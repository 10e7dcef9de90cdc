import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TRAINED_STEPS, read_metrics, step_losses, subprocess_env
from safetensors.torch import load_file, save_model

import sentcode
from sentcode.config import load_config
from sentcode.data import DataDir
from sentcode.errors import SentcodeError
from sentcode.eval.bpb import evaluate_bpb
from sentcode.models.lm import LM
from sentcode.runs import checkpoint as ckpt_io
from sentcode.train.lm import build_lm_task, train_lm
from sentcode.train.loop import run_training

VENV_BIN = Path(sys.executable).parent


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=atol)


def test_loss_falls(trained_run, bytes_data):
    """Guards training that does not learn: held-out bpb and the logged training loss must fall."""
    run, summary = trained_run
    assert summary["status"] == "completed" and summary["step"] == TRAINED_STEPS
    # an untrained model (same config and seed) scores about log2(259) ~ 8 bits per byte
    cfg = load_config("tiny", TINY + ["model.vocab_size=259"])
    torch.manual_seed(cfg.train.seed)
    data = DataDir(bytes_data)
    initial = evaluate_bpb(LM(cfg.model), data.tokens("val"), data.tokenizer, 64, batch_size=16)["bpb"]
    assert 7.5 < initial < 8.5
    final = summary["final_eval"]["bpb"]
    assert final < initial - 2.0  # ~4.4 after 40 tiny steps
    losses = [loss for _, loss in step_losses(run)]
    assert len(losses) == TRAINED_STEPS
    assert losses[0] == pytest.approx(math.log(259), abs=0.1)
    assert np.mean(losses[-5:]) < losses[0] - 1.5
    # the final eval is logged too, and equals the summary's
    finals = [r for r in read_metrics(run) if r.get("final")]
    assert len(finals) == 1 and finals[0]["val_bpb"] == final
    assert (run / "model.safetensors").is_file() and (run / "train_summary.json").is_file()


def test_a_warmup_that_cannot_fit_is_shortened(bytes_data, tmp_path):
    from sentcode.config import TrainConfig
    from sentcode.train.loop import lr_at

    cfg = TrainConfig(max_steps=100, warmup_steps=50, warmup_max_frac=0.1, lr=1.0, min_lr_ratio=0.0)
    lrs = [lr_at(s / 100, s, cfg) for s in range(12)]
    assert lrs[0] == pytest.approx(1 / 50) and lrs[5] == pytest.approx(0.5)  # 5% of the run: half way up
    assert lrs[9] < 1.0 and lrs[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # warm by 10%
    # under a time budget the share of the budget counts: 30% of it gone means warm, whatever the step
    assert lr_at(0.3, 2, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    with pytest.warns(UserWarning, match="warmup is shortened to 2 steps"):
        train_lm(bytes_data, tmp_path / "r", overrides=TINY + ["train.warmup_steps=5"], max_steps=12, progress=False)


def test_the_cpu_peak_is_measured_once_and_kept(tmp_path, monkeypatch):
    from sentcode.train import precision

    monkeypatch.setenv("SENTCODE_CACHE", str(tmp_path))
    precision.cpu_peak.cache_clear()
    first = precision.cpu_peak(1)
    table = json.loads((tmp_path / "peak_flops.json").read_text())
    (entry,) = table.values()
    assert entry["flops"] == first > 0 and entry["cpu"] == precision.cpu_model() and entry["measured"]
    entry["flops"] = 123.0
    (tmp_path / "peak_flops.json").write_text(json.dumps(table))
    precision.cpu_peak.cache_clear()
    assert precision.cpu_peak(1) == 123.0  # read back, not measured again
    precision.cpu_peak.cache_clear()


def test_an_mfu_over_100_percent_is_not_printed(capsys):
    from sentcode.train.loop import _mfu
    from sentcode.train.progress import Progress

    bar = Progress(10, live=False, log_every=1)
    assert _mfu(0.4, bar) == 0.4
    assert _mfu(1.7, bar) is None and _mfu(2.0, bar) is None
    bar.update(1, {"loss": 1.0, "lr": 1e-3, "tok_s": 10.0, "mfu": None}, 0.1)
    out = capsys.readouterr().out
    assert out.count("over 100%") == 1 and "mfu ?" in out and "170" not in out


def test_exact_resume_in_process(bytes_data, tmp_path):
    """Guards inexact resume (schedule, optimizer, loader or RNG state not restored): losses must match bit for bit."""
    a = tmp_path / "a"
    sa = train_lm(bytes_data, a, overrides=TINY, max_steps=12, progress=False)
    assert sa["status"] == "completed"

    b = tmp_path / "b"
    sb = train_lm(bytes_data, b, overrides=TINY, max_steps=12, progress=False, stop_at=6)
    assert sb["status"] == "interrupted" and sb["step"] == 6 and sb["final_eval"] is None
    assert ckpt_io.latest_checkpoint(b).name == "step-0000006.pt"
    assert not (b / "model.safetensors").exists()
    assert [s for s, _ in step_losses(b)] == list(range(1, 7))

    sb2 = train_lm(bytes_data, b, overrides=TINY, max_steps=12, progress=False, resume="auto")
    assert sb2["status"] == "completed" and sb2["step"] == 12
    la, lb = step_losses(a), step_losses(b)
    assert [s for s, _ in lb] == list(range(1, 13))
    assert lb == la  # exact, not approximate
    assert sb2["final_eval"]["bpb"] == sa["final_eval"]["bpb"]
    assert_same_weights(weights(a), weights(b))


def test_resume_auto_skips_a_checkpoint_that_does_not_load(bytes_data, tmp_path):
    """A damaged newest checkpoint: --resume auto takes the newest one that loads, names the skipped one and
    why, and deletes nothing; the resumed run ends where an uninterrupted one does."""
    ref = tmp_path / "ref"
    train_lm(bytes_data, ref, overrides=TINY + ["train.save_every=3", "train.keep_checkpoints=5"], max_steps=9,
             progress=False)
    run = tmp_path / "run"
    over = TINY + ["train.save_every=3", "train.keep_checkpoints=5"]
    train_lm(bytes_data, run, overrides=over, max_steps=9, progress=False, stop_at=6)
    newest = ckpt_io.latest_checkpoint(run)
    assert newest.name == "step-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut short, as by a crash mid-write
    with pytest.warns(UserWarning, match=r"resuming from step-0000003.pt; skipped .*step-0000006.pt \(cannot read"):
        s = train_lm(bytes_data, run, overrides=over, max_steps=9, progress=False, resume="auto")
    assert s["status"] == "completed" and s["step"] == 9
    assert newest.exists()  # kept for the user to look at
    assert step_losses(run) == step_losses(ref)


def test_resume_auto_with_no_loadable_checkpoint_says_so(tmp_path):
    d = ckpt_io.checkpoint_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "step-0000002.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SentcodeError, match="no checkpoint in .* loads: step-0000002.pt"):
        ckpt_io.resolve_resume(tmp_path, "auto")
    assert (d / "step-0000002.pt").exists()


def test_a_fresh_run_sets_aside_the_log_of_a_run_that_died_early(bytes_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n')  # no checkpoint
    with pytest.warns(UserWarning, match="kept as metrics.1.jsonl"):
        train_lm(bytes_data, run, overrides=TINY, max_steps=3, progress=False)
    assert [s for s, _ in step_losses(run)] == [1, 2, 3]  # not 1, 2, 1, 2, 3
    assert (run / "metrics.1.jsonl").read_text().count("\n") == 2


def test_exact_resume_after_sigterm_cli(bytes_data, tmp_path):
    """Guards SIGTERM handling: finish the step, save, exit 130; `--resume auto` then reproduces an uninterrupted run."""
    steps = 100
    ref = tmp_path / "ref"
    train_lm(bytes_data, ref, overrides=TINY, max_steps=steps, progress=False)

    run = tmp_path / "run"
    cmd = [str(VENV_BIN / "sentcode"), "train", "lm", "--data", str(bytes_data), "--out", str(run),
           "--max-steps", str(steps), "--no-progress"]
    for o in TINY:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    ckpt = ckpt_io.latest_checkpoint(run)
    assert ckpt is not None
    stopped = int(ckpt.name[5:12])
    assert 3 <= stopped < steps
    assert [s for s, _ in step_losses(run)] == list(range(1, stopped + 1))
    assert not (run / "model.safetensors").exists()
    assert b"Traceback" not in err

    done = subprocess.run(cmd + ["--resume", "auto"], capture_output=True, env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert step_losses(run) == step_losses(ref)
    assert_same_weights(weights(run), weights(ref))


def test_compiled_state_dict_prefixes_load_into_bare_model(tmp_path, trained_run):
    """Guards CharLM's compile defect: `_orig_mod.`/`module.` key prefixes made checkpoints unloadable."""
    cfg = load_config("tiny", TINY + ["model.vocab_size=259"])
    torch.manual_seed(7)
    src = LM(cfg.model)
    compiled = torch.compile(src)  # wrapping only: nothing is compiled until it is called
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    ddp_like = {f"module.{k}": v for k, v in state.items()}  # what DDP(torch.compile(model)) would save
    for sd in (state, ddp_like):
        bare = LM(cfg.model)
        ckpt_io.load_model_state(bare, sd, "test")
        for k, v in src.state_dict().items():
            assert torch.equal(bare.state_dict()[k], v), k

    # a run whose exported weights carry the prefixes (safetensors stores the tied head once) loads too
    run = tmp_path / "prefixed"
    shutil.copytree(trained_run[0], run)
    save_model(compiled, str(run / "model.safetensors"))
    assert all(k.startswith("_orig_mod.") for k in load_file(str(run / "model.safetensors")))
    g = sentcode.load(run)
    for k, v in src.state_dict().items():
        assert torch.equal(g.model.state_dict()[k], v), k


def test_compile_training_checkpoint_loads_without_compile(bytes_data, tmp_path):
    """Guards CharLM's compile defect for real: a train.compile=true run loads into an uncompiled model."""
    try:
        assert bool((torch.compile(lambda x: x * 2 + 1)(torch.ones(2)) == 3).all())
    except Exception as e:  # no working compiler toolchain here
        pytest.skip(f"torch.compile does not work on this machine ({type(e).__name__})")
    run = tmp_path / "compiled"
    summary = train_lm(bytes_data, run, overrides=TINY + ["train.compile=true", "train.save_every=1"], max_steps=2,
                       progress=False)
    assert summary["status"] == "completed"
    state = ckpt_io.load_checkpoint(ckpt_io.latest_checkpoint(run))["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state)
    cfg = load_config("tiny", TINY + ["model.vocab_size=259"])
    bare = LM(cfg.model)
    ckpt_io.load_model_state(bare, state, "ckpt")
    g = sentcode.load(run)
    for k, v in bare.state_dict().items():
        assert torch.equal(g.model.state_dict()[k], v), k
    assert math.isfinite(g.score("The state of the union is strong.")) and g.score("The union.") > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(bytes_data, tmp_path):
    """Guards DDP data/gradient handling: 2 ranks x accumulation 1 == 1 process x accumulation 2."""
    steps = 5
    args = ["--data", str(bytes_data), "--max-steps", str(steps), "--no-progress"]
    for o in TINY:  # batch_tokens 512 = 2 * micro_batch 4 * seq_len 64
        args += ["--set", o]
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "sentcode.cli", "train", "lm", "--out", str(ddp), *args],
        capture_output=True, env=subprocess_env(), timeout=240,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert b"2 process(es), grad accumulation 1" in proc.stdout
    single = tmp_path / "single"
    s = train_lm(bytes_data, single, overrides=TINY, max_steps=steps, progress=False)
    assert s["world_size"] == 1
    ld, ls = step_losses(ddp), step_losses(single)
    assert [st for st, _ in ld] == [st for st, _ in ls] == list(range(1, steps + 1))
    for (_, x), (_, y) in zip(ld, ls):
        assert x == pytest.approx(y, rel=1e-5)
    assert_same_weights(weights(ddp), weights(single), atol=1e-5)
    # the loss moved, so the comparison covers real updates
    assert ls[-1][1] < ls[0][1] - 0.5


def _initial_state(data_dir, run_dir, seed: int, perturb: int):
    """Initial weights and first loss of a 1-step run with train.seed=seed, the global RNG perturbed first."""
    cfg = load_config("tiny", TINY + [f"train.seed={seed}", "train.max_steps=1", "model.vocab_size=259"])
    data = DataDir(data_dir)
    captured = {}

    def build(info, dev):
        task = build_lm_task(cfg, data, info, dev)
        captured["init"] = {k: v.detach().clone() for k, v in task.model.state_dict().items()}
        return task

    torch.manual_seed(perturb)  # whatever ran before must not matter
    torch.randn(100)
    run_training(run_dir, cfg.train, build, cfg.to_dict(), progress=False)
    return captured["init"], step_losses(run_dir)[0][1]


def test_seed_fixes_initial_weights(bytes_data, tmp_path):
    """Guards seeding after the model is built: the same seed gives the same initial weights, another seed others."""
    w1, l1 = _initial_state(bytes_data, tmp_path / "a", seed=5, perturb=1)
    w2, l2 = _initial_state(bytes_data, tmp_path / "b", seed=5, perturb=2)
    w3, l3 = _initial_state(bytes_data, tmp_path / "c", seed=6, perturb=1)
    assert_same_weights(w1, w2)
    assert l1 == l2
    assert not torch.equal(w1["embed.weight"], w3["embed.weight"])
    assert l1 != l3


def test_tensorboard_logging_writes_events(bytes_data, tmp_path):
    """The optional TensorBoard logger receives the same scalars as metrics.jsonl (skipped without the extra)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    train_lm(bytes_data, run, preset="tiny", overrides=TINY + ["train.tensorboard=true"], max_steps=3, progress=False)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    logged = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3
    assert losses == pytest.approx(logged, rel=1e-6)


def test_auto_precision_is_measured_cached_and_explained(tmp_path, monkeypatch):
    """A CPU flag is not a measurement: auto picks the precision whose training step is faster, once per shape."""
    from sentcode.train import precision as prec

    monkeypatch.setenv("SENTCODE_CACHE", str(tmp_path))
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    calls = []

    def timer(speeds):
        def step(p):
            calls.append(p)
            return speeds[p]
        return step

    choice, line = prec.choose_cpu_precision(timer({"fp32": 0.010, "bf16": 0.020}), "shape A")
    assert choice == "fp32" and "10 ms in fp32 and 20 ms in bf16" in line and "measured now" in line
    assert calls.count("fp32") == calls.count("bf16") == 4  # a warm-up and three timed steps each, in turn
    calls.clear()
    choice, line = prec.choose_cpu_precision(timer({"fp32": 0.010, "bf16": 0.001}), "shape A")
    assert choice == "fp32" and "cached from" in line and calls == []  # the first answer is kept
    choice, _ = prec.choose_cpu_precision(timer({"fp32": 0.030, "bf16": 0.010}), "shape B")
    assert choice == "bf16"
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)
    calls.clear()
    choice, line = prec.choose_cpu_precision(timer({"fp32": 1.0, "bf16": 0.1}), "shape C")
    assert choice == "fp32" and "no bf16 units" in line and calls == []
    assert prec.resolve_precision("auto", torch.device("cpu")) == prec.MEASURE
    assert prec.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_auto_precision_probe_leaves_the_run_unchanged(bytes_data, tmp_path, monkeypatch):
    """The timing steps run on a copy, with the loader and the random state put back: a run whose auto
    precision resolves to fp32 trains exactly like one told fp32."""
    from sentcode.train import loop

    probed = []

    def choose(step_seconds, shape_key):
        probed.append(step_seconds("fp32") + step_seconds("bf16"))  # the real probe, twice
        return "fp32", "precision auto: fp32 (test)"

    monkeypatch.setattr(loop, "choose_cpu_precision", choose)
    a = train_lm(bytes_data, tmp_path / "a", overrides=TINY + ["train.precision=auto"], max_steps=4, progress=False)
    b = train_lm(bytes_data, tmp_path / "b", overrides=TINY + ["train.precision=fp32"], max_steps=4, progress=False)
    assert len(probed) == 1 and a["precision"] == b["precision"] == "fp32"
    assert a["precision_note"] == "precision auto: fp32 (test)" and b["precision_note"] is None
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
