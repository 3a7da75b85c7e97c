"""The MoE families of the installed transformers, found by scanning the package, each tried with from_hf.

Nothing here is a list kept by hand: every ``transformers/models/<family>/modeling_<family>.py``
whose source assigns ``self.experts`` (or an attribute built by an ``...Experts(`` class, as
JetMoE's ``input_linear``) is imported, and each of its module classes whose ``__init__`` does so
is a candidate block. A candidate is built from a tiny version of its
family's config (sizes shrunk by attribute name, see ``SHRINK``), its weights randomised, and
read with ``moegraph.from_hf`` (which compares the compiled layer with the block numerically).
Each lands in one bucket:

- ``parity``: compiled, and the compiled layer matches the block (from_hf's own check);
- ``inline``: a decoder layer ``from_hf`` refuses, whose MoE is written in its forward; the smallest
  model class of its family holding it, built tiny, keeps its output with the MoE swapped by
  ``moegraph.optimize`` (``moegraph/hf/inline.py``);
- ``refused``: ``from_hf`` raised ``UnsupportedBlock``, whose reason is kept;
- ``unbuildable``: no tiny block could be built from the family's config classes (the
  reason is the construction error).

``python tests/hf_families.py`` prints the table the README's "MoE families" section holds.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

D = 32

#: config attribute -> tiny value, applied wherever a config has the attribute (int or unset)
SHRINK = dict(
    hidden_size=D, d_model=D, intermediate_size=48, moe_intermediate_size=16, expert_intermediate_size=16,
    expert_ffn_hidden_size=16, shared_expert_intermediate_size=24, moe_shared_expert_intermediate_size=24,
    ffn_dim=48, d_ff=48, num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_heads=4, d_kv=8,
    num_hidden_layers=2, num_layers=2, vocab_size=64, num_experts=8, num_local_experts=8, n_routed_experts=8,
    moe_num_experts=8, n_experts=8, num_routed_experts=8, num_experts_per_tok=2, moe_topk=2, moe_k=2, top_k=2,
    n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, zero_expert_num=4, max_position_embeddings=64, q_lora_rank=16,
    kv_lora_rank=16, router_hidden_size=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, top_k_experts=2,
    moe_hidden_size=24, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, part_features=8,
)

#: config switches that turn a family's MoE block on (Gemma 4 builds its decoder layers without experts otherwise)
SWITCH_ON = ("enable_moe_block",)


@dataclass
class FamilyResult:
    family: str  # the transformers model folder
    block_class: str
    bucket: str  # "parity", "inline", "refused", "unbuildable"
    reason: str = ""  # the refusal or construction error; the routing read for "parity"


#: what a block's __init__ does to own experts: assign self.experts, or build an attribute from an *Experts class
OWNS_EXPERTS = re.compile(r"self\.experts\s*=|self\.\w+\s*=\s*\w*Experts\(")


def candidate_blocks() -> list[tuple[str, type]]:
    """(family, block class) for every module class of the installed transformers that owns experts."""
    import transformers

    root = Path(transformers.models.__file__).parent
    out = []
    for folder in sorted(root.iterdir()):
        src = folder / f"modeling_{folder.name}.py"
        if not src.is_file() or not OWNS_EXPERTS.search(src.read_text(encoding="utf-8")):
            continue
        mod = importlib.import_module(f"transformers.models.{folder.name}.modeling_{folder.name}")
        for cls in vars(mod).values():
            if (inspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == mod.__name__
                    and OWNS_EXPERTS.search(inspect.getsource(cls.__init__))):
                out.append((folder.name, cls))
    return out


def _config_classes(cls: type, family: str) -> list[type]:
    """Config classes to try for a block: its annotation, then the family's, nearest name first."""
    import transformers

    mod = importlib.import_module(cls.__module__)
    param = inspect.signature(cls.__init__).parameters.get("config")
    ann = param.annotation if param is not None else None
    if isinstance(ann, str):
        ann = vars(mod).get(ann)
    out = [ann] if isinstance(ann, type) else []
    try:
        cmod = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    except ImportError:
        return out

    def shared_prefix(c: type) -> int:
        return len(_common_prefix(c.__name__, cls.__name__))

    found = [c for c in vars(cmod).values() if inspect.isclass(c) and issubclass(c, transformers.PretrainedConfig)
             and c.__module__ == cmod.__name__ and c not in out]
    return out + sorted(found, key=lambda c: (-shared_prefix(c), c.__name__))


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _value(cfg, key: str):
    """A config attribute; for one that may vary per layer (transformers' per-layer configs refuse the global
    read), its global value."""
    try:
        return getattr(cfg, key, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError, whose class is not exported
        return vars(cfg).get(key)


def tiny_config(config_cls: type):
    cfg = config_cls()
    n0 = _value(cfg, "num_hidden_layers")
    for key in SWITCH_ON:
        if isinstance(vars(cfg).get(key), bool):
            setattr(cfg, key, True)
    for key, value in SHRINK.items():
        cur = _value(cfg, key)
        if (cur is None and key in vars(cfg)) or (isinstance(cur, int) and not isinstance(cur, bool)):
            setattr(cfg, key, value)
    n = _value(cfg, "num_hidden_layers")
    if isinstance(n0, int) and n != n0:  # per-layer lists follow the new layer count
        for key, value in list(vars(cfg).items()):
            if isinstance(value, list) and len(value) == n0 and key != "mlp_only_layers":
                setattr(cfg, key, (value * n)[:n])
    cfg._experts_implementation = "eager"
    return cfg


def _constructor_args(cls: type, cfg) -> dict:
    """Keyword arguments for the block's constructor: the config, layer 1, and sizes named like config keys."""
    kwargs = {}
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if name == "config":
            kwargs[name] = cfg
        elif name == "layer_idx":
            kwargs[name] = 1
        elif name in SHRINK:
            kwargs[name] = SHRINK[name]
        else:
            raise TypeError(f"its constructor needs an argument {name!r} no config provides")
    return kwargs


def _construct(cls: type, cfg, seed: int) -> torch.nn.Module:
    """``cls`` from ``cfg``; a size the block reads but its config class never defines (a config that lags its
    block, as Qwen3-Omni's talker) is given its tiny value, then construction is tried again."""
    while True:
        torch.manual_seed(seed)
        try:
            return cls(**_constructor_args(cls, cfg))
        except AttributeError as exc:
            missing = re.search(r"has no attribute '(\w+)'", str(exc))
            key = missing.group(1) if missing else None
            if key not in SHRINK or key in vars(cfg):
                raise
            setattr(cfg, key, SHRINK[key])


def build_tiny_block(family: str, cls: type, seed: int = 0) -> torch.nn.Module:
    """A float32 eval block of ``cls`` from a tiny config, every floating tensor randomised."""
    errors = []
    for config_cls in _config_classes(cls, family):
        try:
            cfg = tiny_config(config_cls)
            block = _construct(cls, cfg, seed)
            break
        except Exception as exc:  # noqa: BLE001 - each config class is one attempt; all failures are reported
            errors.append(f"{config_cls.__name__}: {type(exc).__name__}: {exc}")
    else:
        raise RuntimeError("; ".join(errors) or "no config class found")
    _randomise(block, seed)
    return block.float().eval()


def classify(family: str, cls: type) -> FamilyResult:
    """Build a tiny block and read it: the bucket it lands in, with the reason.

    Only construction errors and ``UnsupportedBlock`` are buckets; any other exception from
    ``from_hf`` propagates (a crash of the importer is a bug, not a refusal).
    """
    from moegraph.errors import UnsupportedBlock
    from moegraph.hf import from_hf

    try:
        block = build_tiny_block(family, cls)
    except RuntimeError as exc:
        return FamilyResult(family, cls.__name__, "unbuildable", _one_line(str(exc)))
    try:
        layer = from_hf(block)
    except UnsupportedBlock as exc:
        if "decoder layer" in exc.reason:  # maybe an MoE written in the layer's forward: optimize on a model
            inline = inline_result(family, cls)
            if inline is not None:
                return inline
        return FamilyResult(family, cls.__name__, "refused", _one_line(exc.reason))
    return FamilyResult(family, cls.__name__, "parity", layer.hf_import.routing.describe())


#: the most parameters a "tiny" model may have (some configs keep towers or embeddings no SHRINK key reaches)
MAX_TINY_MODEL = 5_000_000


def inline_result(family: str, cls: type) -> FamilyResult | None:
    """A decoder layer whose MoE is written in its forward: the smallest model class of its family that holds it,
    built tiny and run through ``moegraph.optimize``. "inline" when every such layer was swapped and the model's
    output did not move; None when no model holding the layer could be built and run (the refusal stands)."""
    import moegraph
    from moegraph.hf.inline import run_seeded

    mod = importlib.import_module(cls.__module__)
    models = sorted((c for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == mod.__name__
                     and issubclass(c, transformers_pretrained()) and hasattr(c, "get_input_embeddings")),
                    key=lambda c: (len(c.__name__), c.__name__))
    ids = torch.randint(3, SHRINK["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    for model_cls in models:
        for config_cls in _config_classes(cls, family):
            try:
                with torch.device("meta"):  # count first: a family's multimodal towers keep their full sizes
                    size = sum(p.numel() for p in model_cls(tiny_model_config(config_cls)).parameters())
                if size > MAX_TINY_MODEL:
                    continue
                torch.manual_seed(0)
                model = model_cls(tiny_model_config(config_cls)).float().eval()
                if not any(isinstance(m, cls) for m in model.modules()):
                    break
                _randomise(model)
                want = run_seeded(model, ids)
            except Exception:  # noqa: BLE001 - this model class or config does not build or run tiny: next
                continue
            moegraph.optimize(model)
            report = model.moegraph_report
            hosts = [r for r in report.records if r.block_class == cls.__name__]
            got = run_seeded(model, ids)
            if hosts and all(r.status == "swapped" and r.found_by == "inline" for r in hosts):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
                why = f"optimize swaps the MoE in its forward on {model_cls.__name__}: {hosts[0].routing}"
                return FamilyResult(family, cls.__name__, "inline", why)
            return FamilyResult(family, cls.__name__, "refused", _one_line(
                f"optimize on {model_cls.__name__}: " + "; ".join(dict.fromkeys(r.reason for r in hosts))))
    return None


def tiny_model_config(config_cls: type):
    """``tiny_config``, with the configs it holds (a composite model's text/vision/audio configs) shrunk too."""
    import transformers

    cfg = tiny_config(config_cls)
    for key, sub in list(vars(cfg).items()):
        if isinstance(sub, transformers.PretrainedConfig):
            setattr(cfg, key, tiny_config(type(sub)))
    return cfg


def transformers_pretrained() -> type:
    import transformers

    return transformers.PreTrainedModel


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def scan() -> list[FamilyResult]:
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [classify(family, cls) for family, cls in candidate_blocks()]


def markdown(results: list[FamilyResult]) -> str:
    rows = ["| family | block | result | reason |", "| --- | --- | --- | --- |"]
    for r in results:
        reason = r.reason.replace("|", "/") if r.bucket != "parity" else ""
        rows.append(f"| {r.family} | `{r.block_class}` | {r.bucket} | {reason} |")
    return "\n".join(rows)


SECTION = "### MoE families in the installed transformers"


def readme_section(results: list[FamilyResult]) -> str:
    """The README's section on the families (heading to the end of its table)."""
    import textwrap

    import transformers

    parity = ", ".join(sorted({r.family for r in results if r.bucket == "parity"}))
    text = textwrap.fill(
        "`tests/test_hf_families.py` finds the MoE blocks of the installed transformers by scanning the package "
        "(every `modeling_*.py` class that owns `self.experts`), builds each from a tiny config and reads it with "
        f"`from_hf`. With transformers {transformers.__version__}, the compiled layer matches the block for the "
        f"blocks of these families: {parity}. Of the rest, decoder layers whose MoE is written in their forward "
        "are swapped by `optimize` on a whole model (inline: same output), the others are refused with the reason, "
        "or no tiny block could be built from the family's configs (its constructor error; "
        "`python tests/hf_families.py --readme` rewrites this section):", 100, break_on_hyphens=False, break_long_words=False)
    return f"{SECTION}\n\n{text}\n\n{markdown([r for r in results if r.bucket != 'parity'])}\n"


def write_readme(results: list[FamilyResult]) -> None:
    path = Path(__file__).resolve().parents[1] / "README.md"
    readme = path.read_text(encoding="utf-8")
    m = re.search(rf"^{re.escape(SECTION)}\n.*?\n\|.*?\n(?!\|)", readme, flags=re.S | re.M)
    assert m, f"README has no section {SECTION!r}"
    path.write_text(readme[: m.start()] + readme_section(results) + readme[m.end():], encoding="utf-8")


if __name__ == "__main__":
    import sys

    found = scan()
    if "--readme" in sys.argv[1:]:
        write_readme(found)
    else:
        print(readme_section(found))
