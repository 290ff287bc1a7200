"""Reference vectors for the noise schedules diffusers builds from a
scheduler config (beta_schedule), written to
trainer-core/tests/fixtures/schedules/<schedule>.json and compared by
trainer-core/tests/schedules.rs.

Needs: pip install torch diffusers. Run from the repository root:
    python scripts/make_schedule_vectors.py
"""
import json
import pathlib

from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

OUT = pathlib.Path("trainer-core/tests/fixtures/schedules")
INDICES = [0, 1, 10, 100, 250, 499, 500, 750, 900, 990, 998, 999]

for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule)
    ddpm = DDPMScheduler(**config)
    ddim = DDIMScheduler(**config, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(10)
    euler = EulerDiscreteScheduler(**config, timestep_spacing="linspace")
    euler.set_timesteps(10)
    vectors = {
        "config": config,
        "alphas_cumprod": {str(i): float(ddpm.alphas_cumprod[i]) for i in INDICES},
        "ddim_timesteps": [int(t) for t in ddim.timesteps],
        "euler_sigmas": [float(s) for s in euler.sigmas],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{schedule}.json").write_text(json.dumps(vectors, indent=1) + "\n")
    print("wrote", OUT / f"{schedule}.json")
