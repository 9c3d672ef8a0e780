#!/usr/bin/env python3
"""PyTorch CPU reference for the empf training benchmark "mnist-cnn" (issue 3).

The same network, maths and time loop as `empf bench train --arch mnist-cnn`:

    FP conv3x3 1->32 (no bias) + BN -> EM-PF V1 -> BConv3x3 32->64 + BN -> EM-PF V1 -> AvgPool2
    -> BConv3x3 64->128 + BN -> EM-PF V1 -> AvgPool2 -> GAP -> FP Linear 128->10 (bias)

* BConv: W_b = alpha_o * sign(W) (sign(0) = +1), alpha_o = mean_r |W[o, r]| held constant in the
  backward; latent gradient = clipped straight-through estimator dL/dW = dL/dW_b * 1{|W| <= 1}
  (src/layers/binary.rs).
* EM-PF Version I (src/layers/neuron.rs, EMPF.md Eq. 5): lambda[t] = sigmoid(a[t]),
  theta[t] = sigmoid(b[t]) (a = b = 0 at init), m = lambda * sg(v[t-1]) + I, s = ReLU(m - theta)
  (output), v = m - s = min(m, theta) (state). The ReLU's derivative is H(m - theta) exactly as in
  empf (no separate surrogate).
* BN: training mode, batch statistics per time-step (PyTorch defaults eps 1e-5, momentum 0.1).
* Loss per step: cross-entropy of O[t], scaled by 1/(number of back-propagated steps).
* SGD, momentum 0.9, Nesterov, weight decay 5e-4 (on all parameters here: a negligible
  difference in cost), lr 0.01, one update per batch (empf's OptimConfig::default()).
* Online BP (EMPF.md Sec. 7): for t = 1..T: forward step t with the neuron state detached
  (sg(v[t-1])), loss L[t], backward through step t only, gradients accumulate; one update.
* Random BP: one random t_r per batch; steps before t_r run under torch.no_grad() (no graph),
  step t_r is run with a graph and L[t_r] back-propagated; one update.
* Synthetic 28x28 inputs (uniform [0, 1)), the same static image at every step, batch 64, T = 4,
  torch.set_num_threads(2). Warm-up batches, then the median over timed batches.

Installing torch where only PyPI is reachable: `python3 -m venv /work/torchenv &&
/work/torchenv/bin/pip install torch numpy` (PyPI's x86-64 Linux wheel is the CUDA build; pip pulls
the nvidia-* wheels too, ~5.4 GB in the venv, about 3 minutes here; the CPU path works without a
GPU). Measured with torch 2.15.0+cu132 (MKL 2024.2, oneDNN 3.13.3, "CPU capability usage: AVX2").

Run:  /work/torchenv/bin/python benches/pytorch/mnist_cnn.py [--modes online,random] [--steps 4]
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BinarizeSTE(torch.autograd.Function):
    """W_b = alpha_o * sign(W); backward: dW = dW_b * 1{|W| <= 1} (alpha held constant)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        return alpha * sign

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * (w.abs() <= 1).to(g.dtype)


class BinaryConv2d(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, 3, 3))
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x):
        return F.conv2d(x, BinarizeSTE.apply(self.weight), padding=1)


class EmpfV1(nn.Module):
    """Version I neuron; per-step scalars a[t], b[t]."""

    def __init__(self, steps):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(steps))
        self.b = nn.Parameter(torch.zeros(steps))

    def forward(self, x, t, v_prev):
        lam = torch.sigmoid(self.a[t])
        th = torch.sigmoid(self.b[t])
        # sg(v[t-1]): the state is detached, online training's defining cut (spec Sec. 7)
        m = x if v_prev is None else lam * v_prev.detach() + x
        s = F.relu(m - th)
        v = m - s
        return s, v


class MnistCnn(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.sn1 = EmpfV1(steps)
        self.conv2 = BinaryConv2d(32, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.sn2 = EmpfV1(steps)
        self.conv3 = BinaryConv2d(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.sn3 = EmpfV1(steps)
        self.fc = nn.Linear(128, 10)

    def step(self, x, t, state):
        """One time-step: returns O[t] and the new neuron states."""
        v1, v2, v3 = state
        s, v1 = self.sn1(self.bn1(self.conv1(x)), t, v1)
        s, v2 = self.sn2(self.bn2(self.conv2(s)), t, v2)
        s = F.avg_pool2d(s, 2)
        s, v3 = self.sn3(self.bn3(self.conv3(s)), t, v3)
        s = F.avg_pool2d(s, 2)
        s = s.mean(dim=(2, 3))
        return self.fc(s), (v1, v2, v3)


def train_batch(net, opt, x, y, steps, mode, gen):
    opt.zero_grad(set_to_none=False)
    state = (None, None, None)
    if mode == "online":
        for t in range(steps):
            out, state = net.step(x, t, state)
            loss = F.cross_entropy(out, y) / steps
            loss.backward()
            # the graph of step t is gone; the next step sees the states as constants
            state = tuple(v.detach() for v in state)
    elif mode == "random":
        tr = int(torch.randint(steps, (1,), generator=gen))
        with torch.no_grad():
            for t in range(tr):
                _, state = net.step(x, t, state)
        out, state = net.step(x, tr, state)
        F.cross_entropy(out, y).backward()
    else:
        raise ValueError(mode)
    opt.step()


def bench(mode, steps, batch, warmup, timed, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = MnistCnn(steps).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.arange(batch) % 10
    for _ in range(warmup):
        train_batch(net, opt, x, y, steps, mode, gen)
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        train_batch(net, opt, x, y, steps, mode, gen)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), batch / (sum(times) / len(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="online,random")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, mkldnn available: {torch.backends.mkldnn.is_available()}, "
          f"threads {torch.get_num_threads()}")
    for line in torch.__config__.show().splitlines()[:8]:
        print("  " + line.strip())
    print(f"mnist-cnn, batch {a.batch}, T = {a.steps}, {a.warmup} warm-up + {a.batches} timed batches")
    print(f"{'mode':<8} {'images/s (median)':>18} {'images/s (mean)':>16}")
    for mode in a.modes.split(","):
        med, mean = bench(mode, a.steps, a.batch, a.warmup, a.batches, a.seed)
        print(f"{mode:<8} {med:>18.1f} {mean:>16.1f}")


if __name__ == "__main__":
    main()
