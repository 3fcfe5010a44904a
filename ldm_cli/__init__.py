"""ldm: local text-to-image latent diffusion from the command line."""
import os

# ldm never reaches a model hub: set before diffusers or transformers is first imported.
for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_switch, "1")

__version__ = "0.1.0"
