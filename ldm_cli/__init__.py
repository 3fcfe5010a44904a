"""ldm: local text-to-image latent diffusion from the command line."""
import os

# ldm never reaches a model hub: set before diffusers or transformers is first imported.
for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_switch, "1")


def _cpu_threads() -> int:
    """This process's share of the cores it may run on: each process of a launch gets its own."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        processes = 1
    return max(1, cores // max(1, processes))


# OpenMP reads these once, when torch loads, so they are set here, before anything imports torch.
# Threads waiting at a barrier sleep instead of spinning: a spinning thread fights a busy
# neighbour for its core, and one run beside another busy process went from 8 s to 50 s. A
# user's own settings win (GOMP_SPINCOUNT=300000 brings back libgomp's default spin).
if not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
THREADS_GIVEN = "OMP_NUM_THREADS" in os.environ  # the user's (or a launcher's) count: device.fit_threads keeps it
os.environ.setdefault("OMP_NUM_THREADS", str(_cpu_threads()))

__version__ = "0.1.0"

# Importing diffusers costs only the modules a run uses (libraries.py).
from ldm_cli import libraries  # noqa: E402

libraries.install()
