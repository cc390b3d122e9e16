"""Raises each kind of error message our C++ argument checks build, by calling the ops directly.

On the GPU box (torch 2.11.0+cu130, Python 3.12, GCC 13.3, 2026-12-04) the checks whose message holds a
number or a shape crashed the process (SIGSEGV under the throw in sola::check_qkv), while one holding only
a device name raised cleanly. The public functions now check in Python first; this probe tells whether the
C++ path itself is sound. Each case runs in a process of its own, so one crash hides no other; for the
first case that crashes, the probe prints which libraries the extension's iostream calls bind to
(LD_DEBUG=bindings) and the native backtrace from cuda-gdb (or gdb) when either is on PATH.

    python scripts/cxx_error_probe.py            # exit 0: every case raised ValueError
"""
import os
import shutil
import subprocess
import sys

import torch


def cases():
    """[(what the message holds, call)]; the ops come from sola_ops once imported."""
    import sola_ops  # noqa: F401  (registers torch.ops.sola_ops)
    ops = torch.ops.sola_ops
    x = torch.randn(1, 2, 3, 8)
    out = [("text only", lambda: ops.linear_attention_fwd(x, x, x, None, None, "gelu", True, 1e-6)),
           ("a double", lambda: ops.softmax_attention_fwd(x, x, x, float("nan"))),
           ("an integer", lambda: ops.softmax_attention_fwd(x, x[..., :4], x, 1.0)),
           ("a shape", lambda: ops.softmax_attention_fwd(x[0], x, x, 1.0))]
    if torch.cuda.is_available() and sola_ops.build_info()["cuda"]:
        xc, y = x.cuda(), torch.randn(1, 1, 4, 257, device="cuda")
        out += [("a device name", lambda: ops.softmax_attention_fwd(xc, x, xc, 1.0)),
                ("an integer (CUDA head dim)", lambda: ops.softmax_attention_fwd(y, y, y, 1.0))]
    return out


def run_case(index):
    """In the child: exit 0 when the case raised ValueError, 1 otherwise."""
    what, call = cases()[index]
    try:
        call()
        print("no error")
        return 1
    except ValueError as e:
        print(f"ValueError: {str(e).splitlines()[0][:100]}")
        return 0
    except Exception as e:  # noqa: BLE001 - the wrong kind of error is a failure to report
        print(f"{type(e).__name__}: {str(e).splitlines()[0][:100]}")
        return 1


def bindings(index):
    """Which library the extension's iostream calls bind to, from ld.so (LD_DEBUG=bindings): a library
    that exports its own copy of libstdc++'s symbols would take them over and could crash them."""
    env = dict(os.environ, LD_DEBUG="bindings")
    try:
        err = subprocess.run([sys.executable, __file__, "--case", str(index)], capture_output=True, text=True,
                             timeout=40, env=env).stderr
    except subprocess.TimeoutExpired:
        print("  (LD_DEBUG run timed out)")
        return
    std = ("`_ZNSt", "`_ZNKSt", "`_ZNSo", "`_ZNKSo", "`_ZSt", "`_ZTVNSt", "`_ZTTNSt")  # std:: symbols
    ours = [line.split("binding file", 1)[-1].strip() for line in err.splitlines()
            if "binding file" in line and "/_C." in line and any(p in line for p in std)]
    # std symbols taken from another library than libstdc++ (a copy of its own), and the number formatters
    odd = [line for line in ours if " to " in line
           and not any(lib in line.split(" to ", 1)[1].split(" ", 1)[0] for lib in ("libstdc++", "/_C."))]
    odd += [line for line in ours if "_M_insert" in line and line not in odd]
    print(f"  {len(ours)} std:: bindings; those to another library than libstdc++ or the extension itself, "
          "and the number formatters:")
    for line in odd[:15]:
        print("  " + line[:300])


def backtrace(index):
    """The native backtrace of a crashing case, from cuda-gdb or gdb."""
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb is None:
        print("  (no cuda-gdb or gdb on PATH for a backtrace)")
        return
    cmd = [gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 16", "--args", sys.executable, __file__, "--case", str(index)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=45).stdout
    except subprocess.TimeoutExpired:
        print("  (the debugger timed out)")
        return
    for line in out.splitlines():
        if line.startswith("#") or "SIG" in line:
            print("  " + line[:300])


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        return run_case(int(sys.argv[2]))
    failed, crashed = 0, []
    for i, (what, _) in enumerate(cases()):
        try:
            proc = subprocess.run([sys.executable, __file__, "--case", str(i)], capture_output=True, text=True,
                                  timeout=40)
        except subprocess.TimeoutExpired:
            print(f"message with {what}: FAILED (no answer in 40 s)", flush=True)
            failed += 1
            continue
        if proc.returncode < 0:
            verdict = f"CRASHED (signal {-proc.returncode})"
            crashed.append(i)
        else:
            verdict = ("ok: " if proc.returncode == 0 else "FAILED: ") + (proc.stdout.strip().splitlines() or ["?"])[-1]
        failed += proc.returncode != 0
        print(f"message with {what}: {verdict}", flush=True)
    if crashed:
        print(f"iostream symbol bindings of sola_ops._C in case {crashed[0]}:")
        bindings(crashed[0])
        print(f"backtrace of case {crashed[0]}:")
        backtrace(crashed[0])
    print(f"cxx_error_probe: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
