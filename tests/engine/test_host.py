"""engine.host: with freed memory held, repeated training steps stop faulting in fresh pages."""

import subprocess
import sys

import pytest

from superdiffusion.engine.host import hold_freed_memory

PROBE = """
import resource, sys, torch
from superdiffusion.engine.host import hold_freed_memory
held = hold_freed_memory() if sys.argv[1] == "hold" else None
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
x = torch.randn(8, 1, 128, 128)  # 8 MiB activations: above glibc's default mmap threshold
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(held, sum(faults[4:]))
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    held, faults = out.split()
    return held, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_held_memory_is_reused_without_page_faults():
    if not hold_freed_memory():  # musl and the like: nothing to hold, and the call says so
        pytest.skip("this C library has no mallopt")
    held, faults_held = _faults("hold")
    _, faults_plain = _faults("plain")
    assert held == "True"
    assert faults_plain > 2 * faults_held, (faults_plain, faults_held)  # later steps re-use the first ones' pages
