"""``moegraph import-hf``: the spec of a Hugging Face model config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..loader import dump_spec
from . import app, console, err_console
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

    with waiting(err_console, f"reading {config}" + (" and probing its MoE block with transformers" if probe else "")):
        spec = spec_from_hf_config(config, name=name, probe=probe)
    if output is None:
        import yaml

        console.print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="", highlight=False, soft_wrap=True)
        return
    path = dump_spec(spec, output)
    r = spec.moe.router
    err_console.print(
        f"wrote {path}: {spec.name} (hash {spec.short_hash}) E={spec.moe.experts.num_experts} "
        f"k={getattr(r, 'top_k', '?')} score={getattr(r, 'score', '?')} layers={spec.model.num_layers} "
        f"moe layers={spec.model.num_moe_layers}",
        highlight=False, soft_wrap=True,
    )
