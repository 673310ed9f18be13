"""Test-session settings.

One intra-op thread: the tests' tensors are tiny, and on a shared 2-core machine OpenMP's spinning
threads make a 2-thread PyTorch up to ~60× slower whenever another process holds a core (measured:
a ResNet-8 forward+backward took 1.37 s with 2 threads vs 0.021 s with 1 under such contention).
"""
import torch

torch.set_num_threads(1)
