"""``moegraph validate``, ``show`` and ``schema``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import MoegraphError, SpecError
from ..fileio import write_atomically
from ..loader import load_spec, presets
from ..spec import MoESpec
from ..summary import human, human_bytes, summarize
from . import app, console
from .checks import output_file
from .output import say, say_error

SpecArg = Annotated[str, typer.Argument(help="Spec file (.yaml/.json/.toml) or preset name, e.g. deepseek-v3.")]


@app.command()
def validate(specs: Annotated[list[str], typer.Argument(help="Spec files or preset names.")]) -> None:
    """Validate spec files; print one line per problem and exit non-zero if any is invalid."""
    bad = 0
    for s in specs:
        try:
            spec = load_spec(s)
        except SpecError as exc:
            bad += 1
            say_error(exc.render())
            continue
        say(f"{s}: {spec.name} (hash {spec.short_hash})", prefix="ok", style="green")
    if bad:
        # A MoegraphError (not typer.Exit) so that cli.main() reports it and exits with status 2.
        raise MoegraphError(f"{bad} of {len(specs)} spec(s) invalid")


def _norm_text(n) -> str:
    """One line for a spec ExpertNorm: its eps, form and whether each expert has its own weight."""
    return (f"rms eps={n.eps:g}" + (" w+1" if n.weight_offset else "") + (" scale-first" if n.scale == "before" else "")
            + (" weight per expert" if n.per_expert else ""))


@app.command()
def show(spec: SpecArg) -> None:
    """A readable summary: parameters (total and active per token), FLOPs, expert memory, layers."""
    s = load_spec(spec)
    m = summarize(s)
    moe = s.moe
    r = moe.router
    say(f"hash {s.short_hash}  {s.description}", prefix=f"{s.name} ", style="bold")
    if s.source:
        console.print(f"source: {s.source}", highlight=False)
    routing = f"{r.type}"
    if r.type == "topk":
        routing += f" k={r.top_k} score={r.score} normalize={r.normalize} scale={r.scaling_factor}"
        if r.groups:
            routing += f" groups={r.groups.num_groups} keep={r.groups.topk_groups} ({r.groups.group_score})"
        if r.expert_bias:
            routing += " +expert-bias" + (" (on logits)" if r.expert_bias.applies_to == "logits" else "")
        if r.sparsemixer:
            routing += f" sparsemixer eps={r.sparsemixer.jitter_eps}"
        if r.input_norm:
            routing += f" input-norm={r.input_norm.kind}" + ("+weight" if r.input_norm.weight else "") + (
                f" x{r.input_norm.multiplier:g}" if r.input_norm.multiplier != 1.0 else "")
        if r.learned_logit_scale:
            routing += " +logit-scale"
        if r.logit_softcap is not None:
            routing += f" softcap={r.logit_softcap:g}"
        if r.per_expert_scale:
            routing += " +per-expert-scale"
        if r.learned_weight_scale:
            routing += " +weight-scale"
        if r.capacity:
            c = r.capacity
            routing += f" capacity={c.factor if c.tokens is None else str(c.tokens) + ' tokens'}" + (
                " per sequence" if c.per == "sequence" else "") + f" drop={c.drop_policy}"
    elif r.type == "expert_choice":
        routing += f" capacity_factor={r.capacity_factor}"
    else:
        routing += f" k={r.top_k} method={r.method}"
    console.print(
        f"layer: D={moe.hidden_size} E={moe.experts.num_experts} F={moe.experts.intermediate_size} "
        f"act={moe.experts.activation} shared={moe.shared_experts.count} dtype={moe.dtype}",
        highlight=False,
    )
    console.print(f"routing: {routing}", highlight=False)
    ex = moe.experts
    if moe.expert_projection is not None or ex.input_norm is not None or ex.output_norm is not None:
        space = [f"projected D -> {moe.expert_projection.size} -> D" if moe.expert_projection is not None else "",
                 f"input norm ({_norm_text(ex.input_norm)})" if ex.input_norm is not None else "",
                 f"output norm per expert ({_norm_text(ex.output_norm)})" if ex.output_norm is not None else ""]
        console.print("experts: " + ", ".join(p for p in space if p), highlight=False)
    if moe.shared_experts.output_norm is not None:
        console.print(f"shared experts: output norm ({_norm_text(moe.shared_experts.output_norm)})", highlight=False)

    t = Table(title="parameters", show_header=True)
    t.add_column("")
    t.add_column("total", justify="right")
    t.add_column("active / token", justify="right")
    t.add_row("one routed expert", human(m.layer.routed_expert), "")
    t.add_row(f"routed experts, {m.num_moe_layers} layers", human(m.num_moe_layers * m.layer.routed_total),
              human(m.num_moe_layers * m.layer.routed_active))
    t.add_row("one MoE layer", human(m.layer.routed_total + m.layer.shared + m.layer.router),
              human(m.layer.routed_active + m.layer.shared + m.layer.router))
    t.add_row(f"all {m.num_moe_layers} MoE layers", human(m.moe_total), human(m.moe_active))
    if m.model_total is not None:
        t.add_row("whole model", human(m.model_total), human(m.model_active))
    console.print(t)
    console.print(
        f"FLOPs/token (MoE layers): {human(m.flops_per_token_moe)}"
        + (f"   whole model: {human(m.flops_per_token_model)}" if m.flops_per_token_model else ""),
        highlight=False,
    )
    q = moe.quantization
    stored = moe.dtype if q is None else f"{q.format} + {q.scale_format} scales per {q.weight_block[0]}x{q.weight_block[1]} block"
    console.print(f"expert memory per MoE layer ({stored}): {human_bytes(m.expert_bytes_per_layer)}; "
                  f"all MoE layers: {human_bytes(m.expert_bytes_per_layer * m.num_moe_layers)}", highlight=False)
    if q is not None:
        console.print(f"  in {moe.dtype}: {human_bytes(m.expert_bytes_per_layer_dtype)} per MoE layer; FP8 "
                      f"takes {m.expert_bytes_per_layer / m.expert_bytes_per_layer_dtype:.3f}x", highlight=False)
    console.print(f"expert memory per GPU ({s.topology.num_gpus} GPUs, routed slots + shared, all MoE layers): "
                  f"{human_bytes(m.expert_bytes_per_gpu)}", highlight=False)
    if m.model_total is None:
        say("whole-model totals need model.attention and model.vocab_size in the spec", text_style="dim")

    lt = Table(title="layers", show_header=True)
    for c in ("layers", "kind", "params", "active / token"):
        lt.add_column(c, justify="right" if c != "kind" else "left")
    # Collapse runs of identical layers into one row.
    i = 0
    rows = m.rows
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1][1:] == rows[i][1:]:
            j += 1
        span = f"{rows[i][0]}" if i == j else f"{rows[i][0]}-{rows[j][0]}"
        lt.add_row(span, rows[i][1], human(rows[i][2]), human(rows[i][3]))
        i = j + 1
    console.print(lt)


@app.command()
def schema(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of spec files (for editor autocompletion)."""
    text = json.dumps(MoESpec.model_json_schema(), indent=2)
    if output is None:
        print(text)
    else:
        output_file(output, "schema", example=".json")
        # whole or not at all: a full disk left a truncated schema behind
        write_atomically(output, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"), "schema", MoegraphError)
        console.print(f"wrote {output}")


@app.command(name="presets")
def list_presets() -> None:
    """List the bundled preset specs."""
    t = Table(show_header=True)
    t.add_column("name")
    t.add_column("description")
    for name, path in presets().items():
        t.add_row(name, load_spec(path).description)
    console.print(t)
