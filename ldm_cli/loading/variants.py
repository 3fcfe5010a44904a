"""--variant NAME: which release a model is where its tensors cannot tell (FLUX.2 klein's
step-distilled and base, Z-Image Turbo and Base, Qwen-Image and its Edit and Edit Plus), over
what the file's metadata, its name or a folder's model_index.json say. FLUX.1 dev and Kontext
are told by the command (`ldm edit` runs dev as Kontext), so FLUX.1 has no variant to name."""
from __future__ import annotations

from ldm_cli.errors import LdmError

# the variants a user may name, per family; "plain" is Qwen-Image itself (no variant)
NAMEABLE = {"flux2": ("distilled", "base"), "zimage": ("turbo", "base"), "qwen-image": ("plain", "edit", "edit-plus")}
PLAIN = "plain"
TOLD = "--variant"  # `ldm info`'s variant_from when the flag said it


def told(family: str, found: str | None, given: str | None) -> str | None:
    """The model's variant: `given` where the family has it, else `found` (what detection read);
    a name the family does not have is one line listing those it has."""
    if given is None:
        return found
    names = NAMEABLE.get(family)
    if names is None:
        listed = "; ".join(f"{f} ({', '.join(v)})" for f, v in NAMEABLE.items())
        raise LdmError(f"--variant {given}: this {family} model's tensors say what it is; --variant is for {listed}")
    if given not in names:
        raise LdmError(f"--variant {given}: {family} has {', '.join(names)}")
    if family == "flux2" and found == "dev":
        raise LdmError(f"--variant {given}: this is FLUX.2 dev, by its guidance embedding; "
                       "--variant names FLUX.2 klein's releases (distilled, base)")
    return None if given == PLAIN else given
