"""The built-in model's release gate: per-attribute accuracy of generated images, scored by the
evaluator, for seen prompts and held-out colour-shape pairs and wordings.

    python bench/builtin_quality.py                      # default settings, 128 prompts per group
    python bench/builtin_quality.py --cfg 3 5 7 --per-group 32   # compare guidance scales
    python bench/builtin_quality.py --model runs/x.safetensors --grid docs/builtin-grid.png
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ldm_cli import loading
from ldm_cli.demo import gate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model file (default: the built-in model)")
    parser.add_argument("--per-group", type=int, default=128)
    parser.add_argument("--cfg", type=float, nargs="*", default=[None], help="guidance scales (default: the model's)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="write a captioned grid of 16 samples here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = loading.load(args.model)
    cases = gate.prompt_set(args.per_group)
    counts = {g: sum(c.group == g for c in cases) for g in gate.GROUPS}
    for cfg in args.cfg:
        start = time.perf_counter()
        images = gate.render(model, [c.prompt for c in cases], [c.seed for c in cases], cfg=cfg, steps=args.steps)
        shown = cfg if cfg is not None else model.defaults.get("cfg")
        print(f"\ncfg {shown}, steps {args.steps or model.defaults.get('steps')}: {len(cases)} prompts "
              f"in {time.perf_counter() - start:.0f} s")
        scores = gate.score(cases, images)
        print(gate.table(gate.accuracy(cases, scores), counts))
    if args.grid:
        # three of each group, then up to four misses (marked), then more prompts to fill 16
        missed = [[a for a, ok in scored.items() if not ok] for scored in scores]
        picks = [i for g in gate.GROUPS for i in [j for j, c in enumerate(cases) if c.group == g][:3]]
        picks += [i for i in range(len(cases)) if missed[i] and i not in picks][:4]
        picks += [i for i in range(len(cases)) if i not in picks][: 16 - len(picks)]
        labels = [cases[i].prompt + (f" [missed {', '.join(missed[i])}]" if missed[i] else "") for i in picks]
        sheet = gate.captioned_grid([images[i] for i in picks], labels)
        sheet.save(args.grid, optimize=True)
        print(f"\ngrid: {args.grid}")


if __name__ == "__main__":
    main()
