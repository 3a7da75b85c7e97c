"""``moegraph import-hf``: the spec of a Hugging Face model config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..loader import SPEC_SUFFIXES, dump_spec
from . import app, console, err_console
from .checks import output_file
from .progress import waiting


@app.command("import-hf")
def import_hf(
    config: Annotated[Path, typer.Argument(help="An HF config.json (or the model folder holding it).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Spec file to write (.yaml/.json/.toml); "
                                                "default: print YAML.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Spec name (default: hf-<model_type>).")] = None,
    probe: Annotated[bool, typer.Option("--probe/--no-probe", help="Check the routing on the model's MoE block "
                                        "built on the meta device (needs transformers to know the model).")] = True,
) -> None:
    """Write the moegraph spec of an HF MoE model config: layer, routing and model section."""
    from ..hf import spec_from_hf_config

    if output is not None:  # before any work; the config (or the folder's config.json) is never overwritten
        output_file(output, "spec", tuple(SPEC_SUFFIXES), inputs=[config, config / "config.json"], example=".yaml")
    with waiting(err_console, f"reading {config}" + (" and probing its MoE block with transformers" if probe else "")):
        spec = spec_from_hf_config(config, name=name, probe=probe)
    if output is None:
        import yaml

        console.print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="", highlight=False, soft_wrap=True)
        return
    path = dump_spec(spec, output)  # whole or not at all
    r = spec.moe.router
    err_console.print(
        f"wrote {path}: {spec.name} (hash {spec.short_hash}) E={spec.moe.experts.num_experts} "
        f"k={getattr(r, 'top_k', '?')} score={getattr(r, 'score', '?')} layers={spec.model.num_layers} "
        f"moe layers={spec.model.num_moe_layers}",
        highlight=False, soft_wrap=True,
    )


@app.command("optimize")
def optimize_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="A local transformers checkpoint folder (config.json + "
                                               "safetensors, as save_pretrained writes).")],
    backend: Annotated[str, typer.Option(help="torch or triton.")] = "torch",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check each swapped block numerically "
                                         "against the one it replaces.")] = True,
) -> None:
    """Load a local checkpoint, swap every MoE block for a compiled layer, and report what was swapped and why."""
    from ..pretrained import optimize_pretrained

    with waiting(err_console, f"loading {checkpoint} and swapping its MoE blocks"):
        model = optimize_pretrained(checkpoint, backend=backend, verify=verify)
    console.print(str(model.moegraph_report), markup=False, highlight=False, soft_wrap=True)
