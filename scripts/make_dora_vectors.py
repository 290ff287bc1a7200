"""Reference vectors for DoRA: PEFT's `use_dora=True` on one Linear layer
(forward, the gradients of a loss, and the merged weight), written to
trainer-core/tests/fixtures/lora/dora.json and compared by
trainer-core/tests/models.rs (dora_matches_peft).

The adapter is given non-zero `B` and a magnitude away from the weight's
norms, so every term of the formula matters.

Needs: pip install torch peft. Run from the repository root:
    python scripts/make_dora_vectors.py
"""
import json
import pathlib

import torch
from peft import LoraConfig, get_peft_model

OUT = pathlib.Path("trainer-core/tests/fixtures/lora/dora.json")
IN, OUT_FEATURES, RANK, ALPHA = 6, 5, 2, 3.0


class One(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT_FEATURES)

    def forward(self, x):
        return self.proj(x)


def flat(t):
    return [float(v) for v in t.detach().flatten()]


def main():
    torch.manual_seed(5)
    model = One().double()
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"], use_dora=True, lora_dropout=0.0))
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(RANK, IN, dtype=torch.float64) * 0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(OUT_FEATURES, RANK, dtype=torch.float64) * 0.5)
        magnitude = layer.lora_magnitude_vector["default"].weight
        magnitude.copy_(magnitude * (1.0 + 0.3 * torch.rand(OUT_FEATURES, dtype=torch.float64)))
    x = torch.randn(3, IN, dtype=torch.float64)
    upstream = torch.randn(3, OUT_FEATURES, dtype=torch.float64)
    peft_model.train()
    y = peft_model(x)
    (y * upstream).sum().backward()
    weight = layer.base_layer.weight
    vectors = {
        "scaling": layer.scaling["default"],
        "weight": flat(weight),  # [out, in]
        "bias": flat(layer.base_layer.bias),
        "lora_A": flat(layer.lora_A["default"].weight),  # [rank, in]
        "lora_B": flat(layer.lora_B["default"].weight),  # [out, rank]
        "magnitude": flat(layer.lora_magnitude_vector["default"].weight),  # [out]
        "x": flat(x),
        "upstream": flat(upstream),
        "y": flat(y),
        "grad_lora_A": flat(layer.lora_A["default"].weight.grad),
        "grad_lora_B": flat(layer.lora_B["default"].weight.grad),
        "grad_magnitude": flat(layer.lora_magnitude_vector["default"].weight.grad),
    }
    merged = peft_model.merge_and_unload()
    vectors["merged_weight"] = flat(merged.proj.weight)  # [out, in]
    vectors["shapes"] = {"in": IN, "out": OUT_FEATURES, "rank": RANK, "batch": 3}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    print("wrote", OUT)


if __name__ == "__main__":
    main()
