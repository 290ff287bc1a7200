"""Reference vectors for LoKr: the LyCORIS library's LokrModule on one
Linear layer (its factor shapes, saved tensor names, and output for given
factors) and its `factorization`, written to
trainer-core/tests/fixtures/lora/lokr.json and compared by
trainer-core/tests/adapters.rs (lokr_matches_lycoris).

Two layers: full factors (scale 1, whatever linear_alpha says) and a
low-rank w2 pair (scale linear_alpha / linear_dim). The factors are set to
random non-zero values so the product matters.

Needs: pip install torch lycoris-lora. Run from the repository root:
    python scripts/make_lokr_vectors.py
"""
import json
import pathlib

import torch
from lycoris.functional.general import factorization
from lycoris.modules.lokr import LokrModule

OUT = pathlib.Path("trainer-core/tests/fixtures/lora/lokr.json")
CASES = [
    # name, in, out, factor, linear_dim, linear_alpha, full_matrix
    ("full", 12, 20, 4, 10000, 1, True),
    ("low_rank", 24, 32, -1, 2, 1, False),
]
FACTORIZATIONS = [(320, 16), (768, 16), (2560, 8), (1280, 8), (320, -1), (1024, -1), (640, 7), (77, 4), (12, 4), (1, 4)]


def flat(t):
    return [float(v) for v in t.detach().flatten()]


def main():
    torch.manual_seed(11)
    layers = []
    for name, d_in, d_out, factor, dim, alpha, full in CASES:
        base = torch.nn.Linear(d_in, d_out).double()
        module = LokrModule(name, base, multiplier=1.0, lora_dim=dim, alpha=alpha, factor=factor, full_matrix=full).double()
        module.apply_to()
        state = {}
        with torch.no_grad():
            for key, tensor in module.named_parameters():
                tensor.copy_(torch.randn_like(tensor) * 0.3)
                state[key] = {"shape": list(tensor.shape), "values": flat(tensor)}
        x = torch.randn(3, d_in, dtype=torch.float64)
        y = base(x)  # apply_to routes the layer's forward through the module
        layers.append({
            "name": name,
            "in": d_in,
            "out": d_out,
            "factor": factor,
            "linear_dim": dim,
            "linear_alpha": alpha,
            "full_matrix": full,
            "weight": flat(module.org_module[0].weight),  # [out, in]
            "bias": flat(module.org_module[0].bias),
            "saved_keys": sorted(k for k in module.state_dict() if k.startswith("lokr_") or k == "alpha"),
            "saved_alpha": float(module.alpha),
            "parameters": state,
            "x": flat(x),
            "y": flat(y),
        })
    vectors = {
        "layers": layers,
        "factorizations": [{"dimension": d, "factor": f, "result": list(factorization(d, f))} for d, f in FACTORIZATIONS],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
