"""Rewrites a .cu/.cuh for the emulator: kernel<<<grid, block, smem, stream>>>(args); becomes
emu::launch(&kernel, grid, block, smem, stream, [&] { kernel(args); }) (the kernel's address: its shared
memory opt-in is checked); and kCUDA tensors become kCPU."""
import re, sys
src = open(sys.argv[1]).read()
pat = re.compile(r'([\w:]+<(?:[^<>;]|<[^<>;]*>)*>)<<<(.*?)>>>\((.*?)\);', re.S)  # one level of nested <>
n = len(pat.findall(src))
src = pat.sub(lambda m: f'emu::launch(&{m.group(1)}, {m.group(2)}, [&] {{ {m.group(1)}({m.group(3)}); }});', src)
src = src.replace('at::kCUDA', 'at::kCPU')
open(sys.argv[2], 'w').write(src)
print(sys.argv[1], n, 'launches')
