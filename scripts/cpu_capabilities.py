"""Prints the ATen CPU capabilities below this CPU's own (the values ATEN_CPU_CAPABILITY takes), lowest first:
`default` on an AVX2 CPU, `default avx2` on an AVX-512 one."""
import torch

LADDER = ("default", "avx2", "avx512")

native = torch.backends.cpu.get_cpu_capability().lower()
print(" ".join(LADDER[:LADDER.index(native)] if native in LADDER else LADDER[:1]))
