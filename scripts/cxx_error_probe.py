"""Raises each kind of error message our C++ argument checks build, by calling the ops directly.

On the GPU box (torch 2.11.0+cu130, Python 3.12, GCC 13.3, 2026-12-04) the checks whose message holds a
number or a shape crashed the process (SIGSEGV under c10::ValueError's construction, from
sola::check_qkv), while one holding only a device name raised cleanly. The public functions now check in
Python first; this probe tells whether the C++ path itself is sound. scripts/gpu_check.sh runs it and,
when it crashes, runs it again under cuda-gdb for the native backtrace.

    python scripts/cxx_error_probe.py            # exit 0: every case raised ValueError
"""
import faulthandler
import sys

import torch

import sola_ops  # noqa: F401  (registers torch.ops.sola_ops)

ops = torch.ops.sola_ops


def cases():
    """(what the message holds, call) pairs."""
    x = torch.randn(1, 2, 3, 8)
    yield "text only", lambda: ops.linear_attention_fwd(x, x, x, None, None, "gelu", True, 1e-6)
    yield "a double", lambda: ops.softmax_attention_fwd(x, x, x, float("nan"))
    yield "an integer", lambda: ops.softmax_attention_fwd(x, x[..., :4], x, 1.0)
    yield "a shape", lambda: ops.softmax_attention_fwd(x[0], x, x, 1.0)
    if torch.cuda.is_available() and sola_ops.build_info()["cuda"]:
        xc = x.cuda()
        yield "a device name", lambda: ops.softmax_attention_fwd(xc, x, xc, 1.0)
        y = torch.randn(1, 1, 4, 257, device="cuda")
        yield "an integer (CUDA head dim)", lambda: ops.softmax_attention_fwd(y, y, y, 1.0)


def main():
    faulthandler.enable()
    failed = 0
    for what, call in cases():
        print(f"message with {what}: ", end="", flush=True)
        try:
            call()
            print("no error (FAIL)")
            failed += 1
        except ValueError as e:
            print(f"ValueError ok: {str(e).splitlines()[0][:100]}")
        except Exception as e:  # noqa: BLE001 - the wrong kind of error is a failure to report
            print(f"{type(e).__name__} (FAIL): {str(e).splitlines()[0][:100]}")
            failed += 1
    print(f"cxx_error_probe: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
