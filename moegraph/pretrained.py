"""``moegraph.optimize_pretrained``: load a local transformers checkpoint folder and optimise it.

The folder is what ``save_pretrained`` writes (``config.json`` and safetensors weights). It is read
with transformers' own loader, offline (``local_files_only``), then every MoE block is swapped by
``moegraph.optimize`` (checked numerically against the block it replaces, by default).

A fine-grained FP8 checkpoint (DeepSeek-V3's format) on a machine without a GPU is loaded in FP8
(``hf.quant.keep_fp8_config``; transformers alone would dequantize all of it): the swapped MoE layers
take the FP8 experts as they are, and only the FP8 weights left outside them are dequantized.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError, require

__all__ = ["optimize_pretrained", "load_pretrained"]


def _fp8_kept_on_cpu(folder: Path, transformers) -> Any:
    """The checkpoint's config set to load in FP8 without a GPU, or None (not FP8, or a GPU is here)."""
    import torch

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    section = getattr(config, "quantization_config", None)
    method = section.get("quant_method") if isinstance(section, dict) else getattr(section, "quant_method", None)
    if str(method) != "fp8" or torch.cuda.is_available():
        return None
    from .hf import quant

    config.quantization_config = quant.keep_fp8_config(section)
    return config


def load_pretrained(path: str | Path, *, dtype: Any = None, keep_fp8: bool = False):
    """The transformers model saved in folder ``path`` (a causal LM if it is one, else the base model).

    keep_fp8: load a fine-grained FP8 checkpoint in FP8 even without a GPU (its FP8 modules then run
    only once swapped or dequantized: what ``optimize_pretrained`` does).
    """
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
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    config = _fp8_kept_on_cpu(folder, transformers) if keep_fp8 else None
    if config is not None:
        kwargs["config"] = config
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

    model = optimize(load_pretrained(path, dtype=dtype, keep_fp8=True), backend=backend, verify=verify,
                     **optimize_kwargs)
    from .hf import quant
    from .runtime import CompiledMoEBase

    if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == quant.KEEP_FP8_METHOD:
        # FP8 weights outside the swapped MoE layers (attention, dense layers): dequantized, one module
        # at a time, so that they run on this machine (their count: model.moegraph_dequantized).
        quant.dequantize_modules(model, model.dtype, keep=(CompiledMoEBase,))
    return model
