"""``moegraph.optimize_pretrained``: load a local transformers checkpoint folder and optimise it.

The folder is what ``save_pretrained`` writes (``config.json`` and safetensors weights). It is read
with transformers' own loader, offline (``local_files_only``), then every MoE block is swapped by
``moegraph.optimize`` (checked numerically against the block it replaces, by default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError, require

__all__ = ["optimize_pretrained", "load_pretrained"]


def load_pretrained(path: str | Path, *, dtype: Any = None):
    """The transformers model saved in folder ``path`` (a causal LM if it is one, else the base model)."""
    transformers = require("transformers", "hf", "loading a transformers checkpoint")
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give the checkpoint folder that save_pretrained wrote "
                         "(config.json + *.safetensors)")
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no config.json here; give the checkpoint folder that save_pretrained wrote")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise InputError(f"{folder}: no weights (*.safetensors) next to config.json; "
                         "use `moegraph import-hf` for a config alone")
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ValueError:  # not a causal LM (e.g. an encoder-decoder): the architecture's base model
        model = transformers.AutoModel.from_pretrained(folder, **kwargs)
    return model.eval()


def optimize_pretrained(path: str | Path, *, backend: str = "torch", verify: bool = True, dtype: Any = None,
                        **optimize_kwargs):
    """Load the checkpoint in folder ``path`` and swap its MoE blocks for compiled moegraph layers.

    Returns the model (with ``model.moegraph_report``); ``optimize_kwargs`` go to ``moegraph.optimize``.
    """
    from .swap import optimize

    return optimize(load_pretrained(path, dtype=dtype), backend=backend, verify=verify, **optimize_kwargs)
