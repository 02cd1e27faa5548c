"""Draw what `benchmarks/audit_canaries.sh` measured: canary exposure and membership AUC against steps.

One line per repeat count (0, 1, 4, 16 insertions) in the exposure panel, one per run in the AUC
panel; a run trained with DP-SGD (its audit JSONs say so through the run's config) is drawn dashed.
The grey band around 0.5 is where 95% of the AUCs of a model that tells nothing apart fall, for as
many member and held-out lines as the audits compared.

    python benchmarks/plot_audit.py OUT_DIR [OUT_DIR ...] --out docs/audit/exposure.png

Each OUT_DIR is the folder the script wrote (`audit-STEP.json` files and `run/config.toml`).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import tomllib
from matplotlib.figure import Figure


def read_audits(out_dir: Path) -> tuple[str, list[dict]]:
    """The run's label (its epsilon, or "no DP") and its audits in step order."""
    config = tomllib.loads((out_dir / "run" / "config.toml").read_text())
    epsilon = config.get("privacy", {}).get("target_epsilon")
    label = f"DP-SGD, epsilon {epsilon:g}" if epsilon else "no DP"
    audits = [json.loads(p.read_text()) for p in out_dir.glob("audit-*.json")]
    return label, sorted(audits, key=lambda a: a["step"])


def chance_band(lines: int) -> float:
    """1.96 deviations of the AUC of two samples of `lines` from one distribution (Mann-Whitney)."""
    return 1.96 * math.sqrt((2 * lines + 1) / (12 * lines * lines))


def draw(runs: list[tuple[str, list[dict]]], out: Path) -> None:
    figure = Figure(figsize=(10, 4), layout="constrained")
    exposure_axes, auc_axes = figure.subplots(1, 2)
    colours = {}
    for label, audits in runs:
        style = "--" if label.startswith("DP") else "-"
        steps = [a["step"] for a in audits]
        for group in range(len(audits[0]["exposure"]["by_repeats"])):
            repeats = audits[0]["exposure"]["by_repeats"][group]["repeats"]
            fit = [a["exposure"]["by_repeats"][group]["exposure_fit"] for a in audits]
            line = exposure_axes.plot(
                steps, fit, style, marker="o", color=colours.get(repeats), label=f"{repeats}x, {label}"
            )[0]
            colours[repeats] = line.get_color()
        measured = [a for a in audits if a["membership"] is not None]  # data prepared with --holdout-lines
        auc = [a["membership"]["auc"] for a in measured]
        auc_axes.plot([a["step"] for a in measured], auc, style, marker="o", label=label)
    exposure_axes.set(xlabel="step", ylabel="mean exposure (bits, normal fit)", title="canary exposure")
    exposure_axes.legend(fontsize=7, ncol=2)
    auc_axes.axhline(0.5, color="grey", linewidth=0.8)
    counts = [a["membership"]["lines"] for _, audits in runs for a in audits if a["membership"] is not None]
    if counts:
        band = chance_band(min(counts))
        auc_axes.axhspan(0.5 - band, 0.5 + band, color="grey", alpha=0.15, label="chance (95%)")
    auc_axes.set(xlabel="step", ylabel="AUC", title="membership: member vs held-out lines")
    auc_axes.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dirs", nargs="+", type=Path, help="folders written by audit_canaries.sh")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    draw([read_audits(d) for d in args.out_dirs], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
