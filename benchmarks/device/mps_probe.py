"""Steps per second of la2d-ssl4mis's supervised step (SSL4MIS's U-Net, 24 slices of 96x96, SGD) in N processes
sharing one GPU, on synthetic tensors already on the device (no data pipeline).

Why: on one GPU, processes' kernels take turns unless CUDA's multi-process service (MPS) runs; this says how much
running several benchmark runs at once gains, with and without it. 2026-12-04, one H200: 77 steps/s alone, 143
together in 6 processes, 330 together in 6 processes under MPS (measured with a hand-written foreground batch
Dice in place of the protocol's loss used here; docs/evidence/la2d-ssl4mis-h200-partial/probe.txt).

    PYTHONPATH=src python benchmarks/device/mps_probe.py 6 500              # 6 processes, 500 timed steps each
    nvidia-cuda-mps-control -d; PYTHONPATH=src python benchmarks/device/mps_probe.py 6 500   # the same under MPS
"""
import multiprocessing as mp
import sys
import time

import torch

from superdiffusion.bench.protocols import load_protocol
from superdiffusion.methods.base import supervised_loss
from superdiffusion.nets.unet import build_unet


def worker(steps: int, queue) -> None:
    """Time `steps` training steps after 20 warm-up ones, syncing twice a step as the trainer does."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(2)
    cfg = load_protocol("la2d-ssl4mis").base  # the protocol's own network and supervised term
    net = build_unet(cfg["model"], dims=2, in_channels=1, out_channels=2).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(24, 1, 96, 96, device=device)
    y = (torch.rand(24, 96, 96, device=device) > 0.8).long()
    criterion = supervised_loss(cfg)
    for i in range(steps + 20):
        if i == 20:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = net(x)
        loss = 0.5 * criterion(out, y)
        if not torch.isfinite(loss):  # a second sync, as the trainer's check
            raise FloatingPointError(f"step {i}: loss {loss.item()}")
        loss.backward()
        opt.step()
        loss.item()
    queue.put(steps / (time.perf_counter() - t0))


def main(processes: int, steps: int) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(steps, queue)) for _ in range(processes)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    rates = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    print(f"{processes} process(es): {', '.join(f'{r:.1f}' for r in rates)} steps/s each, {sum(rates):.1f} "
          f"together ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
