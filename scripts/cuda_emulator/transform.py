"""Rewrites a .cu/.cuh for the emulator: kernel<<<grid, block, smem, stream>>>(args); becomes
emu::launch(&kernel, grid, block, smem, stream, [&] { kernel(args); }) (the kernel's address: its shared
memory opt-in is checked); a kernel's __launch_bounds__(max_threads, ...) becomes a check at the top of its
body that the block has at most max_threads threads (a GPU refuses that launch); and kCUDA tensors become
kCPU."""
import re, sys


def first_argument_end(text, start):
    """Index of the top-level ',' or ')' that ends the argument starting at text[start] (() and <> nest)."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c in "(<":
            depth += 1
        elif c in ")>":
            if depth == 0:
                return i
            depth -= 1
        elif c == "," and depth == 0:
            return i
    raise ValueError("unbalanced __launch_bounds__")


def check_launch_bounds(src):
    out, pos, n = [], 0, 0
    for m in re.finditer(r"__launch_bounds__\(", src):
        line_start = src.rfind("\n", 0, m.start()) + 1
        if m.start() < pos or "//" in src[line_start:m.start()]:  # mentioned in a comment
            continue
        end = first_argument_end(src, m.end())
        body = src.index("{", end)  # the kernel's body: its parameter list holds no braces
        out += [src[pos:body + 1], f" emu::check_block_bound({src[m.end():end].strip()});"]
        pos, n = body + 1, n + 1
    return "".join(out) + src[pos:], n


src = open(sys.argv[1]).read()
pat = re.compile(r'([\w:]+<(?:[^<>;]|<[^<>;]*>)*>)<<<(.*?)>>>\((.*?)\);', re.S)  # one level of nested <>
n = len(pat.findall(src))
src = pat.sub(lambda m: f'emu::launch(&{m.group(1)}, {m.group(2)}, [&] {{ {m.group(1)}({m.group(3)}); }});', src)
src, bounded = check_launch_bounds(src)
src = src.replace('at::kCUDA', 'at::kCPU')
open(sys.argv[2], 'w').write(src)
print(sys.argv[1], n, 'launches', bounded, 'launch bounds')
