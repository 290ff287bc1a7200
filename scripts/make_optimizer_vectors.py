"""Reference vectors for the optimizers: the first steps of torch's AdamW,
prodigyopt's Prodigy and torch's Adafactor on a small problem,
written to trainer-core/tests/fixtures/optimizers/<case>.json and compared
by trainer-core/tests/optimizers.rs.

The problem: four parameters shaped like what Burnbooth trains (a linear
weight, a conv kernel, a bias, and a zero-initialised LoRA `up`), each with
the loss sum(weight * (p - target)^2) / 2 + 10 sum(p^3) (the cube keeps
the gradients from being linear in p). Gradients are clipped by their
global norm as the trainer does, the learning rate changes every step
(as a schedule would), then the optimizer steps.

Needs: pip install torch prodigyopt. Run from the repository root:
    python scripts/make_optimizer_vectors.py
"""
import json
import pathlib

import torch
from prodigyopt import Prodigy

OUT = pathlib.Path("trainer-core/tests/fixtures/optimizers")
SHAPES = {"linear.weight": [3, 5], "conv.weight": [2, 3, 2, 2], "norm.bias": [4], "lora.up": [5, 2]}
STEPS = 6
LEARNING_RATES = [1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
MAX_GRAD_NORM = 0.5
F32_EPS = float(torch.finfo(torch.float32).eps)

# (case, optimizer class, keyword arguments, learning rate multiplier)
CASES = [
    ("adamw", torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2), 1e-3),
    ("prodigy", Prodigy, dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decouple=True,
                              use_bias_correction=False, safeguard_warmup=False, d_coef=1.0), 1.0),
    ("prodigy_bias_correction_safeguard_decay", Prodigy,
     dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2, decouple=True, use_bias_correction=True,
          safeguard_warmup=True, d_coef=2.0, growth_rate=1.5, d0=1e-5), 1.0),
    # eps1 given as float32's epsilon: torch takes the parameters' dtype's
    # when it is None, and these run in float64.
    ("adafactor", torch.optim.Adafactor, dict(beta2_decay=-0.8, eps=(F32_EPS, 1e-3), d=1.0, weight_decay=0.0), 1e-2),
    ("adafactor_decay_clip", torch.optim.Adafactor, dict(beta2_decay=-0.5, eps=(F32_EPS, 1e-2), d=1.5, weight_decay=1e-1), 1.0),
]


def problem():
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, shape in SHAPES.items():
        # Small values (as trained weights are), so that float32 resolves
        # Prodigy's first steps of about 1e-6 (its d starts at d0).
        initial = torch.zeros(shape) if name == "lora.up" else torch.randn(shape, generator=generator) * 0.05
        target = torch.randn(shape, generator=generator) * 0.05
        weight = torch.rand(shape, generator=generator) + 0.5
        tensors[name] = (initial, target, weight)
    return tensors


def flat(t):
    return [float(v) for v in t.detach().flatten()]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = problem()
    for case, cls, kwargs, lr_scale in CASES:
        params = {name: torch.nn.Parameter(initial.clone().double()) for name, (initial, _, _) in tensors.items()}
        # float64 throughout, so the vectors are the algorithm's, not float32's rounding.
        kwargs = dict(kwargs)
        optimizer = cls(list(params.values()), lr=lr_scale, **kwargs)
        steps = []
        for step in range(STEPS):
            lr = LEARNING_RATES[step] * lr_scale
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            loss = sum(((w.double() * (params[n] - t.double()) ** 2).sum() / 2 + (params[n] ** 3).sum() * 10)
                       for n, (_, t, w) in tensors.items())
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM)
            optimizer.step()
            record = {"lr": lr, "grad_norm": float(norm), "params": {n: flat(p) for n, p in params.items()}}
            if cls is Prodigy:
                record["d"] = float(optimizer.param_groups[0]["d"])
            steps.append(record)
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
        vectors = {
            "optimizer": cls.__module__ + "." + cls.__name__,
            "settings": settings,
            "max_grad_norm": MAX_GRAD_NORM,
            "shapes": SHAPES,
            "initial": {n: flat(i) for n, (i, _, _) in tensors.items()},
            "target": {n: flat(t) for n, (_, t, _) in tensors.items()},
            "weight": {n: flat(w) for n, (_, _, w) in tensors.items()},
            "steps": steps,
        }
        path = OUT / f"{case}.json"
        path.write_text(json.dumps(vectors, indent=1) + "\n")
        print("wrote", path, "final d" if cls is Prodigy else "", steps[-1].get("d", ""))


if __name__ == "__main__":
    main()
