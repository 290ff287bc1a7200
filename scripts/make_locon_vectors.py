"""Reference vectors for LoCon: the LyCORIS library's LoConModule (its
`lora`/`locon` algo) on convolutions (3x3, 3x3 with stride 2, 1x1) and a
Linear layer: saved tensor names and shapes, alpha, and the output for
given down/up weights. Written to trainer-core/tests/fixtures/lora/locon.json
and compared by trainer-core/tests/adapters.rs (locon_matches_lycoris).

The pairs are set to random non-zero values so the product matters.

Needs: pip install torch lycoris-lora. Run from the repository root:
    python scripts/make_locon_vectors.py
"""
import json
import pathlib

import torch
from lycoris.modules.locon import LoConModule

OUT = pathlib.Path("trainer-core/tests/fixtures/lora/locon.json")
CASES = [
    # name, layer, rank, alpha, input shape
    ("conv3x3", lambda: torch.nn.Conv2d(8, 6, 3, 1, 1), 3, 1.5, [2, 8, 5, 4]),
    ("conv3x3_stride2", lambda: torch.nn.Conv2d(6, 6, 3, 2, 1), 2, 0, [1, 6, 7, 6]),
    ("conv1x1", lambda: torch.nn.Conv2d(8, 4, 1, 1, 0), 4, 2, [2, 8, 3, 3]),
    ("linear", lambda: torch.nn.Linear(8, 6), 4, 1, [3, 8]),
]


def flat(t):
    return [float(v) for v in t.detach().flatten()]


def main():
    torch.manual_seed(5)
    layers = []
    for name, make, rank, alpha, x_shape in CASES:
        base = make().double()
        module = LoConModule(name, base, multiplier=1.0, lora_dim=rank, alpha=alpha).double()
        # LyCORIS initialises down with kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in).
        fan_in = module.lora_down.weight[0].numel()
        fresh_down_max = float(module.lora_down.weight.abs().max())
        module.apply_to()
        state = {}
        with torch.no_grad():
            for key in ["lora_down.weight", "lora_up.weight"]:
                tensor = dict(module.named_parameters())[key]
                tensor.copy_(torch.randn_like(tensor) * 0.3)
                state[key] = {"shape": list(tensor.shape), "values": flat(tensor)}
        x = torch.randn(*x_shape, dtype=torch.float64)
        y = base(x)  # apply_to routes the layer's forward through the module
        org = module.org_module[0]
        layers.append({
            "name": name,
            "weight_shape": list(org.weight.shape),
            "stride": org.stride[0] if hasattr(org, "stride") else 1,
            "padding": org.padding[0] if hasattr(org, "padding") else 0,
            "weight": flat(org.weight),
            "bias": flat(org.bias),
            "rank": rank,
            "alpha": alpha,
            "saved_keys": sorted(k for k in module.state_dict() if k.startswith("lora_") or k == "alpha"),
            "saved_alpha": float(module.alpha),
            "scale": float(module.scale),
            "init_bound": fan_in ** -0.5,
            "fresh_down_max": fresh_down_max,
            "parameters": state,
            "x_shape": x_shape,
            "x": flat(x),
            "y": flat(y),
        })
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"layers": layers}, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
