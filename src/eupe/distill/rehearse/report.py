"""The printed report of `eupe distill --rehearse` (the same figures as its JSON)."""

from __future__ import annotations

from typing import Any

from ..plan.estimate import CATEGORIES
from ..plan.report import format_flops

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 4


def format_rehearsal(r: dict[str, Any]) -> str:
    par = ", ".join(f"{n}: {p}" for n, p in r["parallelism"].items())
    lines = [
        f"rehearsal of {r['config']} at {r['world']} ranks of {r['gpu_label']} ({r['gpu_memory_gib']:.1f} GiB), "
        f"{r['steps']} steps + 1 counted, {r['seconds']:.0f} s",
        f"  per rank: micro-batch {r['micro_batch']} x accum {r['accum_steps']} (global {r['global_batch']}); "
        f"{par}; bf16 {'on' if r['bf16'] else 'off'}; activation checkpointing "
        f"{'on' if r['activation_checkpointing'] else 'off'}",
        "",
        "  per-rank peak memory (GiB), split at the peak:",
    ]
    for k in CATEGORIES:
        lines.append(f"    {k:<18}{r['by_category_gib'][k]:>10.2f}")
    lines.append(f"    {'peak':<18}{r['peak_gib']:>10.2f}")
    lines += [
        "",
        f"  FLOPs: {format_flops(r['flops_per_step'])} per step (all ranks), {format_flops(r['flops_per_image'])} per image",
    ]
    if r["plan_peak_gib"] is not None:
        lines.append(
            f"  eupe plan says {r['plan_peak_gib']:.2f} GiB for this config and world size: "
            f"{r['plan_diff']:.0%} from the rehearsal"
        )
    for u in r["untracked"]:
        lines.append(f"  added by hand: {u}")
    for n in r["notes"]:
        lines.append(f"  note: {n}")
    room = r["gpu_memory_gib"] - r["peak_gib"]
    verdict = (
        f"fits: {r['peak_gib']:.1f} of {r['gpu_memory_gib']:.1f} GiB ({room:.1f} GiB free)"
        if r["fits"]
        else f"DOES NOT FIT: {r['peak_gib']:.1f} GiB > {r['gpu_memory_gib']:.1f} GiB by {-room:.1f} GiB "
        "(set train.micro_batch lower, train.activation_checkpointing=true, or more ranks)"
    )
    lines += ["", f"  verdict: {verdict}"]
    return "\n".join(lines)


def exit_code(r: dict[str, Any]) -> int:
    return EXIT_FITS if r["fits"] else EXIT_DOES_NOT_FIT
