"""The machinery every training stage shares: a seeded, resumable loop with a scheduled learning
rate, checkpoints that an interruption cannot corrupt, an EMA of weights, a log and a progress bar."""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm


def autocast(args):
    """bf16 mixed precision where it pays: on CUDA, and for the VAE's convolutions on a CPU with
    AVX512-BF16 (1.4x); the CPU runs the denoiser's small matmuls faster in fp32. The weights
    and the optimizer stay fp32."""
    if args.device.type == "cuda":
        enabled = torch.cuda.is_bf16_supported()
    else:
        enabled = args.stage == "vae" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=enabled)


class EMA:
    """An exponential moving average of a module's weights: what a diffusion model samples best with."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.average = copy.deepcopy(module).requires_grad_(False)

    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory at first, while weights move fast
        with torch.no_grad():
            for average, live in zip(self.average.parameters(), self.module.parameters()):
                average.lerp_(live, 1 - decay)


def log(out: Path, text: str) -> None:
    with open(out / "log.txt", "a") as f:
        f.write(text + "\n")


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Checkpoint:
    """Models (saved with save_pretrained, a folder each), plain modules that only training
    needs (`extra`), optimizer state and step, under `folder`. state.pt is replaced last, so
    an interrupted save leaves the previous step to resume from."""

    def __init__(self, folder: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                 extra: dict[str, torch.nn.Module] | None = None):
        self.folder, self.modules, self.optimizer, self.extra = folder, modules, optimizer, extra or {}

    def save(self, step: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, module in self.modules.items():
            module.save_pretrained(self.folder / name)
        tmp = self.folder / "state.pt.tmp"
        torch.save({"step": step, "optimizer": self.optimizer.state_dict(),
                    "extra": {name: m.state_dict() for name, m in self.extra.items()}}, tmp)
        tmp.replace(self.folder / "state.pt")

    def resume(self) -> int:
        """The step to start from: 0, or where the last checkpoint left off."""
        path = self.folder / "state.pt"
        if not path.exists():
            return 0
        for name, module in self.modules.items():
            module.load_state_dict(type(module).from_pretrained(self.folder / name).state_dict())
        state = torch.load(path, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        for name, module in self.extra.items():
            module.load_state_dict(state["extra"][name])
        return state["step"]


def run_steps(args, checkpoint: Checkpoint, step_fn, name: str, after_step=None) -> None:
    """The shared loop: resume, step with the scheduled LR, log, checkpoint."""
    start = checkpoint.resume()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=name, mininterval=10)
    began = time.monotonic()
    for step in bar:
        for group in checkpoint.optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        with autocast(args):
            loss, metric = step_fn(step)
        checkpoint.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in checkpoint.optimizer.param_groups for p in g["params"]], 1.0)
        checkpoint.optimizer.step()
        if after_step is not None:
            after_step(step)
        bar.set_postfix(loss=f"{loss.item():.4f}", metric=f"{metric:.2f}", refresh=False)
        if step % 50 == 0:
            log(args.out, f"{name} step {step} loss {loss.item():.5f} metric {metric:.3f} "
                          f"({time.monotonic() - began:.0f} s)")
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            checkpoint.save(step + 1)
