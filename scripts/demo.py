"""The main job (`make demo`): train a small SoLA-Vision on the embedded digits with our kernels, evaluate
it, then check both ops against the PyTorch references (forward and backward) and time them against
PyTorch on the best local device.

    python scripts/demo.py [--output runs/demo] [--epochs 12]
"""
import argparse
import time

import torch
import torch.nn.functional as F

import sola_ops
from sola_ops import reference


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(name, ours, ref, inputs, tol):
    out = ours(*inputs)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad)
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    want_out = ref(*inputs64)
    want = torch.autograd.grad(want_out, inputs64, grad.double())
    errs = [max_err(out, want_out)] + [max_err(g, w) for g, w in zip(got, want)]
    ok = max(errs) <= tol
    print(f"  {name:<34} max |err| out {errs[0]:.1e}, grads {max(errs[1:]):.1e}  {'OK' if ok else 'MISMATCH'}")
    return ok


def timed(fn, device, reps):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


TARGET_TOP1 = 95.0


def train_and_evaluate(output, epochs):
    """sola_vision_nano on the digits (32 px, 1438 train / 359 val images), then sola_vision.eval on its best
    checkpoint. Returns the evaluated top-1."""
    from sola_vision import eval as sola_eval
    from sola_vision import train

    print(f"== training sola_vision_nano on the digits for {epochs} epochs (sola_ops kernels) ==")
    start = time.perf_counter()
    result = train.main(["--model", "sola_vision_nano", "--data", "digits", "--epochs", str(epochs),
                         "--output", output, "--no-progress"])
    print(f"trained in {time.perf_counter() - start:.0f} s; best val top-1 {result['best_top1']:.2f}%; "
          f"checkpoints, metrics.jsonl and curves.png in {output}/\n")
    print("== evaluating the best checkpoint ==")
    evaluated = sola_eval.main([output])
    return evaluated["top1"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/demo")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()
    demo_start = time.perf_counter()
    top1 = train_and_evaluate(args.output, args.epochs)

    device = torch.device("cuda" if torch.cuda.is_available() and sola_ops.build_info()["cuda"] else "cpu")
    print(f"\n== kernels: sola_ops {sola_ops.__version__}, build {sola_ops.build_info()}, device {device} ==")
    torch.manual_seed(0)

    print("agreement with the fp64 PyTorch reference (fp32 inputs, forward and backward):")
    mk = lambda *s: torch.randn(*s, device=device, requires_grad=True)  # noqa: E731
    q, k, v = mk(2, 3, 113, 32), mk(2, 3, 97, 32), mk(2, 3, 97, 48)
    ok = check("linear_attention (elu)", sola_ops.linear_attention, reference.linear_attention, [q, k, v], 1e-4)
    qn, kn = mk(2, 3, 113, 32), mk(2, 3, 97, 32)
    ok &= check("linear_attention (q_norm, k_norm)",
                lambda q, k, v, qn, kn: sola_ops.linear_attention(q, k, v, q_norm=qn, k_norm=kn),
                lambda q, k, v, qn, kn: reference.linear_attention(q, k, v, q_norm=qn, k_norm=kn),
                [q, k, v, qn, kn], 1e-4)
    ok &= check("softmax_attention", sola_ops.softmax_attention, reference.softmax_attention, [q, k, v], 1e-4)

    B, H, N, D, reps = (8, 4, 4096, 32, 20) if device.type == "cuda" else (4, 4, 1024, 32, 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\nspeed, forward + backward, B={B} H={H} N={N} D={D} {dtype} on {device} (median of {reps}):")
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def fwd_bwd(fn):
        return lambda: fn(q, k, v).sum().backward()

    rows = [
        ("linear", "sola_ops", fwd_bwd(sola_ops.linear_attention)),
        ("linear", "PyTorch composite", fwd_bwd(reference.linear_attention)),
        ("softmax", "sola_ops", fwd_bwd(sola_ops.softmax_attention)),
        ("softmax", "torch SDPA", fwd_bwd(F.scaled_dot_product_attention)),
        ("softmax", "PyTorch composite", fwd_bwd(reference.softmax_attention)),
    ]
    base = {}
    for op, impl, fn in rows:
        ms = timed(fn, device, reps)
        base.setdefault(op, ms)
        print(f"  {op:<8} {impl:<18} {ms:9.2f} ms   ({ms / base[op]:.2f}x the sola_ops time)")
    if not ok:
        raise SystemExit("demo: sola_ops disagrees with the reference")
    if top1 < TARGET_TOP1:
        raise SystemExit(f"demo: validation top-1 {top1:.2f}% is below the {TARGET_TOP1}% target")
    print(f"\nall checks passed: digits top-1 {top1:.2f}% (target {TARGET_TOP1}%), kernels agree with the "
          f"references; demo took {time.perf_counter() - demo_start:.0f} s")


if __name__ == "__main__":
    main()
