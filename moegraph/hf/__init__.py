"""Hugging Face transformers interop: MoE blocks and model configs -> moegraph specs and layers.

    from_hf(block)              an HF MoE block (its config and weights) -> compiled layer, same weights
    spec_from_hf_config(config) an HF model config -> MoESpec (model section included)
    layer_specs_from_hf_config(config) one MoESpec per kind of MoE layer, with the layers of each

How a block is read, for any family (no per-family table):

1. Anatomy, from the block's modules: the experts module (3-D ``gate_up_proj``/``up_proj`` and
   ``down_proj`` as transformers v5 stores them, with the layout flags of
   ``@use_experts_implementation``), the router weight (the one [E, D] tensor outside the experts),
   its bias, an expert-selection bias (``e_score_correction_bias``, ``expert_bias``: any other
   E-sized tensor), shared-expert MLPs and a [1, D] shared-expert gate.
2. Routing, from the config (``num_experts_per_tok``, ``scoring_func``, ``norm_topk_prob``,
   ``routed_scaling_factor``, ``n_group``/``topk_group``, ``topk_method``) checked against the
   block itself: a light copy of the block, with the experts and shared experts replaced by stubs
   that record their inputs, routes random tokens with random router weights. The routing the
   config declares must reproduce the recorded expert ids and weights exactly; where a family's
   code departs from its config (e.g. DeepSeek-V2 ignores ``norm_topk_prob``) the few variants
   the spec language offers are tried and the one that reproduces the block is kept, with a note.
   Nothing that fails this check is compiled.
3. The combine: the stubs return known tensors, so the block's output must be routed + (gated)
   shared output, or a form the spec holds (a norm after the experts: ``moe.output_norm``; an output
   bias; a combine expression); anything else is refused with the reason.
4. ``from_hf`` then compiles the spec, copies (or shares) the weights and compares the compiled
   layer with the block on random tokens.

Blocks that take token ids (DeepSeek-V4's ``input_ids``) are probed with random ids: a routing
that changes with them must be a token id -> experts table the block holds (hash routing). Blocks
that feed every expert every token scaled by its routing weight (Llama 4) read as
``experts.routing_weight: input``. Activations are read as expressions (GPT-OSS's clamped
``(up + 1) * gate * sigmoid(alpha * gate)``), Phi-MoE's routing as ``router.sparsemixer``. Families whose
math the spec cannot express are refused with ``UnsupportedBlock`` naming the feature (NLLB-MoE, whose
experts module reads the router's top-1 mask as expert ids, ...); tests/test_hf_families.py lists them for
the installed transformers.
"""

from __future__ import annotations

# The readers' parts are public too: ``moegraph.optimize`` (swap.py) matches blocks HF's registry does
# not know with the same probes, activation tables and weight loaders.
from .anatomy import (
    BlockAnatomy,
    get_path,
    inspect_block,
    is_hf_moe_block,
    probe_activation,
)
from .block import HFImport, check_target, compare, from_hf, read_block, tolerance
from .config import layer_specs_from_hf_config, load_hf_config, spec_from_hf_config
from .probe import Probe, forward_args, light_copy, probe_block, token_id_arg, token_vocab
from .quant import block_scales
from .routing import Declared, Routing, declared_routing, identify_routing, route
from .vocab import DTYPE_NAMES, GATED_ACT, PLAIN_ACT
from .weights import hf_weights, load_hf_weights, torch_dtype_of

__all__ = [
    "DTYPE_NAMES",
    "GATED_ACT",
    "PLAIN_ACT",
    "BlockAnatomy",
    "Declared",
    "HFImport",
    "Probe",
    "Routing",
    "block_scales",
    "check_target",
    "compare",
    "declared_routing",
    "forward_args",
    "from_hf",
    "get_path",
    "hf_weights",
    "identify_routing",
    "inspect_block",
    "is_hf_moe_block",
    "light_copy",
    "load_hf_config",
    "load_hf_weights",
    "probe_activation",
    "probe_block",
    "read_block",
    "route",
    "spec_from_hf_config",
    "layer_specs_from_hf_config",
    "token_id_arg",
    "token_vocab",
    "tolerance",
    "torch_dtype_of",
]
