"""``moegraph export``: a plan file in the form a serving engine reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import app, console
from .checks import output_file


@app.command()
def export(
    plan: Annotated[Path, typer.Argument(help="A plan file written by `moegraph plan -o`.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write.")],
    fmt: Annotated[str, typer.Option("--format", help="sglang: the JSON for SGLang's --init-expert-location.")] = "sglang",
) -> None:
    """Write a plan for a serving engine (SGLang's --init-expert-location file)."""
    from ..planner import Plan
    from ..planner.export import export_plan

    output_file(output, f"{fmt} placement", inputs=[plan], example=".json")
    p = Plan.load(plan)
    out = export_plan(p, fmt, output)
    redundant = p.num_slots - p.num_experts
    console.print(f"wrote {out}: {p.spec.model.num_layers} decoder layers ({p.num_layers} MoE) x {p.num_slots} "
                  f"physical experts; launch SGLang with --init-expert-location {out} --ep-size {p.num_gpus} "
                  f"--ep-num-redundant-experts {redundant}", highlight=False, markup=False, soft_wrap=True)
