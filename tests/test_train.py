"""sola_vision.train / .eval on CPU: learning, checkpoints, resume, atomic writes, DDP (gloo), ImageFolder
data and error messages. Small runs: sola_vision_nano on a few digits at 32 px."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")
pytest.importorskip("safetensors")
from sola_vision import checkpoint as ckpt  # noqa: E402
from sola_vision import eval as sola_eval  # noqa: E402
from sola_vision import train  # noqa: E402

IMPL = "sola"
try:
    import sola_ops  # noqa: F401
except ImportError:
    IMPL = "torch"

QUICK = ["--train-samples", "64", "--batch-size", "32", "--no-progress", "--device", "cpu", "--attn-impl", IMPL]


def run_train(out, *extra):
    return train.main(QUICK + ["--output", str(out)] + [str(a) for a in extra])


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_lowers_the_loss(tmp_path):
    result = run_train(tmp_path, "--epochs", 4, "--train-samples", 128, "--warmup-epochs", 0)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result["history"][-1]["val_loss"] < result["history"][0]["val_loss"]
    for name in ("last.safetensors", "last_state.pt", "best.safetensors", "metrics.jsonl", "curves.png"):
        assert os.path.getsize(tmp_path / name) > 0, name
    assert read_metrics(tmp_path) == json.loads(json.dumps(result["history"]))


def test_amp_bf16_runs_on_the_cpu(tmp_path):
    """--amp bf16 autocasts on the CPU too (it used to run fp32 quietly): same seed, different losses."""
    fp32 = run_train(tmp_path / "fp32", "--epochs", 1, "--amp", "none")["history"][0]
    bf16 = run_train(tmp_path / "bf16", "--epochs", 1, "--amp", "bf16")["history"][0]
    assert math.isfinite(bf16["train_loss"]) and math.isfinite(bf16["val_loss"])
    assert bf16["train_loss"] != fp32["train_loss"]
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.05)


def test_checkpoint_round_trip_and_eval(tmp_path):
    result = run_train(tmp_path, "--epochs", 2)
    best = max(result["history"], key=lambda h: h["top1"])
    weights, info = ckpt.load_model_file(str(tmp_path / "best.safetensors"))
    assert info["model"] == "sola_vision_nano" and info["num_classes"] == 10 and info["in_chans"] == 1
    assert info["top1"] == best["top1"]
    # eval rebuilds the model from the checkpoint alone and must reproduce the validation numbers
    evaluated = sola_eval.main([str(tmp_path), "--device", "cpu", "--attn-impl", IMPL])
    assert evaluated["top1"] == pytest.approx(best["top1"], abs=1e-9)
    assert evaluated["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert evaluated["confusion"].sum() == evaluated["val_samples"] == 359
    assert evaluated["confusion"].trace() == round(best["top1"] * 359 / 100)
    assert os.path.getsize(evaluated["confusion_png"]) > 0


class StopAfterEpoch(Exception):
    pass


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    args = ("--epochs", 3, "--drop-path", 0.1)  # drop-path: the RNG state must be restored too
    full = run_train(tmp_path / "full", *args)

    save = train.Trainer.save

    def save_then_die(self, epoch, is_best):
        save(self, epoch, is_best)
        if epoch == 2:
            raise StopAfterEpoch  # a kill right after the epoch-2 checkpoint

    monkeypatch.setattr(train.Trainer, "save", save_then_die)
    with pytest.raises(StopAfterEpoch):
        run_train(tmp_path / "cut", *args)
    monkeypatch.undo()
    resumed = run_train(tmp_path / "cut", *args, "--resume")

    strip = lambda h: {k: v for k, v in h.items() if k not in ("img_per_s", "epoch_s")}  # noqa: E731
    assert [strip(h) for h in resumed["history"]] == [strip(h) for h in full["history"]]
    a, _ = ckpt.load_model_file(str(tmp_path / "full" / "last.safetensors"))
    b, _ = ckpt.load_model_file(str(tmp_path / "cut" / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tmp_path):
    """A resumed run continues the first run's schedule and data: other --epochs, --lr, --batch-size ... are
    refused by name (timm's scheduler state would silently override them); --attn-impl may change."""
    run_train(tmp_path, "--epochs", 1)
    with pytest.raises(ValueError, match=r"these differ: --epochs 1 -> 2, --lr 0.002 -> 0.001"):
        run_train(tmp_path, "--epochs", 2, "--lr", 1e-3, "--resume")
    with pytest.raises(ValueError, match=r"--batch-size 32 -> 16"):
        run_train(tmp_path, "--epochs", 1, "--batch-size", 16, "--resume")
    if IMPL == "sola":
        assert run_train(tmp_path, "--epochs", 1, "--attn-impl", "torch", "--resume")["history"]


def test_checkpoint_pair_is_written_before_either_is_renamed(tmp_path, monkeypatch):
    """last.safetensors and last_state.pt go through temporaries that are all written before the first rename:
    a failure (a kill) while writing the state leaves the previous pair, not two epochs' halves."""
    run_train(tmp_path, "--epochs", 1)
    write = ckpt._write_file

    def fail_on_state(path, data):
        if os.path.basename(path).startswith("last_state"):
            raise KeyboardInterrupt
        write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", fail_on_state)
    with pytest.raises(KeyboardInterrupt):
        run_train(tmp_path, "--epochs", 2)
    monkeypatch.undo()
    _, info = ckpt.load_model_file(str(tmp_path / "last.safetensors"))
    assert info["epoch"] == ckpt.load_train_state(str(tmp_path / "last_state.pt"))["epoch"] == 1
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    mask = os.umask(0)
    os.umask(mask)
    for name in ("last.safetensors", "last_state.pt", "best.safetensors", "metrics.jsonl"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~mask, name  # not mkstemp's owner-only


def test_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="last_state.pt"):
        run_train(tmp_path, "--epochs", 1, "--resume")


def test_atomic_write_survives_a_kill_mid_write(tmp_path):
    """A process dies half-way through writing a new checkpoint: the previous one must still load."""
    path = tmp_path / "model.safetensors"
    script = textwrap.dedent(f"""
        import os, torch
        from sola_vision import checkpoint as ckpt
        model = torch.nn.Linear(64, 64)
        torch.nn.init.constant_(model.weight, 1.0)
        ckpt.save_model({str(path)!r}, model, {{"epoch": 1}})
        def die_half_way(p, data):
            with open(p, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            os._exit(9)
        ckpt._write_file = die_half_way
        torch.nn.init.constant_(model.weight, 2.0)
        ckpt.save_model({str(path)!r}, model, {{"epoch": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    weights, info = ckpt.load_model_file(str(path))
    assert info == {"epoch": 1} and torch.equal(weights["weight"], torch.ones(64, 64))


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    model = torch.nn.Linear(8, 8)
    good = tmp_path / "good.safetensors"
    ckpt.save_model(str(good), model, {"epoch": 1})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_model_file(str(truncated))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        sola_eval.main([str(garbage), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sola_eval.main([str(tmp_path / "missing.safetensors"), "--device", "cpu"])
    state = tmp_path / "state.pt"
    state.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="not readable"):
        ckpt.load_train_state(str(state))


def make_image_tree(root, classes=("cat", "dog"), per_class=(6, 2)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name)
            for i in range(count):
                pixels = (torch.rand(40, 48, 3, generator=g) * 100 + 120 * c).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_image_folder_resume_with_workers_is_exact(tmp_path, monkeypatch):
    """ImageFolder data (timm's random crops draw from Python's random) with loader workers: --seed fixes the
    run, and a resumed run repeats the uninterrupted one (workers are seeded per epoch from the saved RNG)."""
    make_image_tree(tmp_path / "data")
    argv = ["--data", str(tmp_path / "data"), "--img-size", "32", "--epochs", "2", "--batch-size", "4",
            "--workers", "1", "--no-progress", "--device", "cpu", "--attn-impl", IMPL]
    full = train.main(argv + ["--output", str(tmp_path / "full")])
    save = train.Trainer.save

    def save_then_die(self, epoch, is_best):
        save(self, epoch, is_best)
        raise StopAfterEpoch

    monkeypatch.setattr(train.Trainer, "save", save_then_die)
    with pytest.raises(StopAfterEpoch):
        train.main(argv + ["--output", str(tmp_path / "cut")])
    monkeypatch.undo()
    resumed = train.main(argv + ["--output", str(tmp_path / "cut"), "--resume"])
    keys = ("train_loss", "val_loss", "top1")
    assert [[h[k] for k in keys] for h in resumed["history"]] == [[h[k] for k in keys] for h in full["history"]]


def test_val_classes_must_be_trained_and_eval_checks_class_names(tmp_path):
    """A val/ class with no training images is an error (its images were silently dropped), and eval refuses
    data whose class names differ from the checkpoint's (outputs would be read in the wrong order)."""
    make_image_tree(tmp_path / "extra")
    make_image_tree(tmp_path / "extra_val", classes=("ant",), per_class=(0, 1))
    os.rename(tmp_path / "extra_val" / "val" / "ant", tmp_path / "extra" / "val" / "ant")
    with pytest.raises(ValueError, match=r"val/ has classes with no training images under train/: \['ant'\]"):
        train.main(QUICK + ["--data", str(tmp_path / "extra"), "--output", str(tmp_path / "o1")])
    make_image_tree(tmp_path / "a", classes=("cat", "dog"))
    make_image_tree(tmp_path / "b", classes=("cow", "dog"))
    train.main(["--data", str(tmp_path / "a"), "--img-size", "32", "--epochs", "1", "--batch-size", "4",
                "--workers", "0", "--no-progress", "--device", "cpu", "--attn-impl", IMPL,
                "--output", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match=r"classes \['cow', 'dog'\], the checkpoint's model was trained on"):
        sola_eval.main([str(tmp_path / "o2"), "--data", str(tmp_path / "b"), "--device", "cpu", "--workers", "0"])


def test_image_folder_training(tmp_path, monkeypatch):
    make_image_tree(tmp_path / "data")
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # --data relative: the checkpoint records it absolute, for eval from elsewhere
    result = train.main(["--data", "data", "--img-size", "32", "--epochs", "2", "--batch-size", "4",
                         "--workers", "0", "--no-progress", "--device", "cpu", "--attn-impl", IMPL,
                         "--output", str(out)])
    assert len(result["history"]) == 2 and result["history"][-1]["val_samples"] == 4
    _, info = ckpt.load_model_file(str(out / "last.safetensors"))
    assert info["class_names"] == ["cat", "dog"] and info["in_chans"] == 3
    assert info["data"] == str(tmp_path / "data")
    model, info = ckpt.load_trained_model(str(out), attn_impl="torch")
    weights, _ = ckpt.load_model_file(str(out / "best.safetensors"))
    assert info["class_names"] == ["cat", "dog"] and model.num_classes == 2 and not model.training
    assert all(torch.equal(model.state_dict()[k], w) for k, w in weights.items())
    monkeypatch.chdir(out)
    evaluated = sola_eval.main([str(out), "--device", "cpu", "--workers", "0"])
    assert evaluated["confusion"].shape == (2, 2) and evaluated["confusion"].sum() == 4


@pytest.mark.parametrize("layout, message", [
    (None, "not 'digits' and not a directory"),
    ({"train": 1}, "val.* is missing"),
    ({"train": 0, "val": 1}, "no images found"),
])
def test_bad_data_paths(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout is not None:
        for split, count in layout.items():
            os.makedirs(root / split / "a")
            for i in range(count):
                (root / split / "a" / f"{i}.png").write_bytes(b"")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train.main(["--data", str(root), "--output", str(tmp_path / "out"), "--device", "cpu"])


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "4096"], "larger than the"),
])
def test_bad_arguments(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        train.main(QUICK + ["--output", str(tmp_path), "--epochs", "1"] + argv)


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--clip-grad", "-1"], "--clip-grad >= 0"),
    (["--min-lr", "0.1"], "--min-lr 0.1 is above --lr"),
    (["--warmup-epochs", "13"], "--warmup-epochs 13.0 is more than --epochs 12"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--model", "resnet50"], "--model 'resnet50' is not a registered SoLA-Vision model"),
    (["--layer-pattern", "L-LL-LLLX-LL"], "--layer-pattern: layer_pattern"),
    (["--layer-pattern", "L-LL-LL"], "has 3 stage(s)"),
])
def test_bad_arguments_exit_with_usage(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        train.main(argv + ["--output", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_eval_bad_numbers_exit_with_usage(tmp_path, capsys):
    for argv, message in ((["--img-size", "0"], "--img-size must be at least 8"),
                          (["--workers", "-2"], "--workers must be >= 0")):
        with pytest.raises(SystemExit):
            sola_eval.main([str(tmp_path)] + argv)
        assert message in capsys.readouterr().err


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) and the same global batch as one process: same losses. BatchNorm
    statistics span the global batch (--sync-bn); the remaining differences are float summation order, which
    Adam amplifies in parameters with near-zero gradients, so a small lr keeps them far below the tolerance
    (measured: 4e-5 relative at epoch 2, against 2.5e-3 already at epoch 1 without --sync-bn)."""
    common = QUICK + ["--epochs", "2", "--sync-bn", "--warmup-epochs", "0.5", "--lr", "2e-4"]
    run_train(tmp_path / "one", *common[len(QUICK):])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sola_vision.train", *common, "--output", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # the first traceback (the process that failed first) and the tail (torchrun's summary)
    first = max(proc.stderr.find("Traceback"), 0)
    assert proc.returncode == 0, (proc.stdout[-2000:] + "\n--- first traceback:\n" + proc.stderr[first:first + 4000]
                                  + "\n--- stderr tail:\n" + proc.stderr[-2000:])
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=5e-4), (a, b)
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=2e-2), (a, b)
        assert a["val_samples"] == b["val_samples"] == 359  # the val shards cover every image exactly once


def test_ddp_without_sync_bn_saves_what_it_validated(tmp_path):
    """Without --sync-bn each process's BatchNorm running stats are averaged after every epoch, so the saved
    checkpoint (process 0's model) evaluates to the validation loss the run reported (it differed by ~1e-4)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sola_vision.train", *QUICK, "--epochs", "1", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (reported,) = read_metrics(tmp_path)
    evaluated = sola_eval.main([str(tmp_path), "--device", "cpu", "--attn-impl", IMPL])
    assert evaluated["val_loss"] == pytest.approx(reported["val_loss"], rel=1e-6)
    assert evaluated["top1"] == pytest.approx(reported["top1"], abs=1e-9)


def test_console_scripts_run_and_exit_0(tmp_path):
    """The installed commands as a user runs them: each does its work and exits 0 (they exited 1, with
    main()'s result printed to stderr as the wrapper's sys.exit message)."""
    bin_dir = os.path.dirname(sys.executable)
    for name in ("sola-train", "sola-eval", "sola-explore"):
        assert os.path.exists(os.path.join(bin_dir, name)), f"{name} not in {bin_dir}: reinstall the package"

    def run(name, *args):
        proc = subprocess.run([os.path.join(bin_dir, name), *map(str, args)], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (name, proc.returncode, proc.stderr[-2000:])
        return proc

    run("sola-train", *QUICK, "--epochs", 1, "--output", tmp_path / "run")
    assert "top-1" in run("sola-eval", tmp_path / "run", "--device", "cpu", "--attn-impl", IMPL).stdout
    run("sola-explore", "--model", "sola_vision_nano", "--quick", "--no-latency", "--no-plot", "--out",
        tmp_path / "explore")
    assert any(p.suffix == ".csv" for p in (tmp_path / "explore").iterdir())
