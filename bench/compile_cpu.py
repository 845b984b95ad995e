"""--compile on CPU (issue 41): seconds per training step of resnet18 at 64 px, batch 32, eager against
torch.compile, after the first two steps (which include compiling). BENCHMARKS.md, "--compile on CPU".

    python bench/compile_cpu.py
"""

from __future__ import annotations

import time

import torch
import torchvision


def bench(compiled: bool, steps: int = 10) -> tuple[float, float]:
    """(seconds of the first two steps, mean seconds of the next ``steps``)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    run = torch.compile(net) if compiled else net
    images, labels = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(run(images), labels).backward()
        optimizer.step()

    started = time.perf_counter()
    step()
    step()
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return warm, (time.perf_counter() - started) / steps


def main() -> None:
    torch.set_num_threads(2)
    for compiled in (False, True):
        warm, per_step = bench(compiled)
        print(f"compiled={compiled}: first two steps {warm:.1f} s, then {per_step * 1000:.0f} ms a step", flush=True)


if __name__ == "__main__":
    main()
