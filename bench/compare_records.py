"""Per-photo comparison of one method in two `diffrestore evaluate` runs (same photos, seeds and
measurements; e.g. two option settings): PSNR, SSIM and ||H x_hat - y|| side by side, as Markdown.

    python bench/compare_records.py RUN_A RUN_B --method pigdm [--also ddrm]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> dict:
    out = {}
    for line in (run / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["task"], r["method"], r["image_id"])] = r
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--method", required=True)
    p.add_argument("--also", default=None, help="a method of RUN_B whose PSNR is listed for reference")
    args = p.parse_args()
    a, b = load(args.run_a), load(args.run_b)
    keys = sorted(k for k in a if k[1] == args.method and k in b)
    for task in dict.fromkeys(k[0] for k in keys):
        print(f"\n{task}: A = {args.run_a.name}, B = {args.run_b.name}\n")
        print("| photo | PSNR A | PSNR B | B - A | SSIM A | SSIM B | ‖Hx̂−y‖ A | ‖Hx̂−y‖ B |" + (f" {args.also} PSNR |" if args.also else ""))
        print("|---|---|---|---|---|---|---|---|" + ("---|" if args.also else ""))
        rows = [(a[k], b[k], b.get((task, args.also, k[2]))) for k in keys if k[0] == task]
        for ra, rb, rc in rows:
            extra = f" {rc['psnr']:.2f} |" if rc else (" |" if args.also else "")
            print(f"| {ra['image_id']} | {ra['psnr']:.2f} | {rb['psnr']:.2f} | {rb['psnr'] - ra['psnr']:+.2f} | "
                  f"{ra['ssim']:.4f} | {rb['ssim']:.4f} | {ra['consistency']:.2f} | {rb['consistency']:.2f} |{extra}")
        n = len(rows)

        def mean(side, key):
            return sum(r[side][key] for r in rows) / n

        extra = ""
        if args.also:
            refs = [r[2]["psnr"] for r in rows if r[2]]
            extra = f" {sum(refs) / len(refs):.2f} |" if refs else " |"
        print(f"| mean of {n} | {mean(0, 'psnr'):.2f} | {mean(1, 'psnr'):.2f} | {mean(1, 'psnr') - mean(0, 'psnr'):+.2f} | "
              f"{mean(0, 'ssim'):.4f} | {mean(1, 'ssim'):.4f} | {mean(0, 'consistency'):.2f} | {mean(1, 'consistency'):.2f} |{extra}")


if __name__ == "__main__":
    main()
