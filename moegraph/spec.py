"""The spec language: one validated, frozen, hashable description of an MoE model.

A spec file (YAML, JSON or TOML) holds four sections:

- ``model``: how many layers, which are dense and which are MoE, and (optionally) the non-MoE sizes
  (attention, embeddings) used only to count whole-model parameters;
- ``moe``: the MoE layer itself: routed experts, shared experts, router policy, dtype;
- ``topology``: the cluster the layer is planned for;
- ``placement`` and ``codegen``: settings for the planner and the code generator.

Every model is frozen with ``extra="forbid"``; numbers carry bounds; cross-field rules live in small
validators whose messages say what to do instead. Values are never rewritten silently.

Legend used in docstrings: T tokens, D hidden size, F expert intermediate size, E routed experts,
K top-k, G groups.
"""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
import warnings
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import MAX_PROBLEMS, close_names, more_problems
from .semantics import activations as _activations
from .semantics import combine as _combine
from .semantics import dtypes as _dtypes
from .semantics import scores as _scores
from .semantics.scores import (  # noqa: F401  (the spec language's names, kept importable from here)
    MAX_SCORE_EXPRESSION,
    SCORE_EXPR_FUNCTIONS,
    SCORE_EXPR_MATH,
    SCORE_FUNCTIONS,
    SCORE_PROBE_X,
    emit_score,
    score_can_be_negative,
    score_expression,
    score_tree,
    score_value,
)

__all__ = [
    "MoESpec",
    "ModelSpec",
    "MoELayerSpec",
    "ExpertsSpec",
    "SharedExpertsSpec",
    "TopKRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "GroupLimit",
    "ExpertBias",
    "RouterInputNorm",
    "SparseMixer",
    "AuxLoss",
    "Capacity",
    "UniformTopology",
    "ExplicitTopology",
    "PlacementSpec",
    "CodegenSpec",
    "QuantizationSpec",
    "SCORE_FUNCTIONS",
    "ACTIVATIONS",
    "score_expression",
    "score_tree",
]


def field_error(field: str, message: str) -> PydanticCustomError:
    """A validation error pinned to ``field``, a dotted path below the model that raises it.

    Cross-field rules run on the containing model, so pydantic would report the model's path
    ("moe"); the loader appends ``field`` so the user is pointed at the value to change
    ("moe.router.top_k"). The message itself is unchanged.
    """
    return PydanticCustomError("spec_field", "{message}", {"field": field, "message": message})


class _Problems:
    """Collects a validator's cross-field problems so that all of them are reported, not the first."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.more = 0  # problems beyond MAX_PROBLEMS, counted only

    def add(self, field: str, message: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append((field, message))
        else:
            self.more += 1

    def raise_any(self) -> None:
        if len(self.items) == 1 and not self.more:
            raise field_error(*self.items[0])
        if self.items:
            # One pydantic error carrying several (and the count of those not kept); the loader turns it back
            # into one Problem each.
            raise PydanticCustomError("spec_fields", "{message}", {
                "problems": [list(item) for item in self.items], "more": self.more,
                "message": "; ".join([message for _, message in self.items]
                                     + ([more_problems(self.more)] if self.more else [])),
            })


def _is_number_annotation(tp: Any) -> bool:
    """Whether an annotation is int or float, possibly Optional."""
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


def _is_int_annotation(tp: Any) -> bool:
    return tp is int or int in typing.get_args(tp) and float not in typing.get_args(tp)


def _as_line_errors(errors: list[dict]) -> list[dict]:
    """pydantic's errors (``exc.errors()``) as line errors to raise again beside others: each keeps its type, place,
    input and context, and its message as formatted. The message goes last into the context, under a key of its own:
    pydantic fills a template's keys in the context's order, and a message used as a template again would read a
    user's ``{name}`` in it as a placeholder."""
    return [{"type": PydanticCustomError(e["type"], "{_text}", {**{k: v for k, v in (e.get("ctx") or {}).items()
                                                                   if k != "_text"}, "_text": e["msg"]}),
             "loc": e["loc"], "input": e["input"]} for e in errors]


def _raw_problems(model: type[BaseModel], data: dict) -> list[tuple[str, str]]:
    """(key, message) for the values of ``data`` that ``model``'s fields must not take as they are."""
    problems = []
    for key, value in data.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            continue
        if isinstance(value, (list, tuple)):
            # pydantic checks a list's max_length only after validating every entry: a file of a million
            # wrong entries would take minutes and give a million errors. The length is checked first.
            most = next((m.max_length for m in field.metadata if getattr(m, "max_length", None) is not None), None)
            if most is not None and len(value) > most:
                problems.append((key, f"lists {len(value)} entries, more than the {most} it takes; shorten it"))
        items = _number_items(field.annotation)
        if items is not None and isinstance(value, (list, tuple)):  # a tuple of numbers: each entry as strict
            problems += [(f"{key}.{i}", m) for i, v in enumerate(value) for m in _strict_number(v, items)]
        elif _is_number_annotation(field.annotation):
            problems += [(key, m) for m in _strict_number(value, field.annotation)]
    return problems


def _number_items(tp: Any) -> Any:
    """The entries' annotation of a tuple of numbers (``tuple[int, int]``, ``tuple[float, ...]``), else None."""
    args = [a for a in typing.get_args(tp) if a is not Ellipsis] if typing.get_origin(tp) is tuple else []
    return args[0] if args and all(a == args[0] and _is_number_annotation(a) for a in args) else None


def _strict_number(value: Any, annotation: Any) -> list[str]:
    """The problem of a value a number field must not take as it is (none or one message)."""
    # pydantic's lax mode reads `true` as 1; in a spec file that is a mistake, not a number.
    if isinstance(value, bool):
        return [f"expected a number, got the boolean {str(value).lower()}; write the number"]
    # Strict: YAML, JSON and TOML all give real numbers; a quoted one is a mistake.
    if isinstance(value, (str, bytes)):
        shown = value if len(value) <= 40 else value[:40] + "..."
        what = "an integer" if _is_int_annotation(annotation) else "a number"
        return [f"expected {what}, got the string {shown!r}; write the number without quotes"]
    return []


class _Frozen(BaseModel):
    # allow_inf_nan=False: an infinite bandwidth or a NaN coefficient is never meant.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _no_negative_zero(cls, v: Any) -> Any:
        """-0.0 is 0.0: equal specs (same hash) must give the same generated code, which reads these values."""
        return 0.0 if isinstance(v, float) and v == 0 else v

    @model_validator(mode="wrap")
    @classmethod
    def _raw_values_checked(cls, data: Any, handler: Any) -> Any:
        """Values no field should take as they are (a list longer than the field takes, a boolean or quoted
        number), each reported beside what the rest of the model makes of the other keys: a quoted number
        hid every other problem of its section, unknown keys included."""
        raw = _raw_problems(cls, data) if isinstance(data, dict) else []
        if not raw:
            return handler(data)
        bad = {key.split(".")[0] for key, _ in raw}  # (an entry's problem, "weight_block.0", drops its field)
        line_errors = [{"type": field_error(key, message), "loc": (), "input": data} for key, message in raw]
        try:
            handler({k: v for k, v in data.items() if k not in bad})
        except ValidationError as exc:
            # Without the bad keys: their absence is no problem of its own, and the model's own cross-field rules
            # (raised at the model, loc ()) ran on defaults in their place, so they are left to the next run.
            line_errors += _as_line_errors([e for e in exc.errors(include_url=False)
                                            if e["loc"] and not (e["type"] == "missing" and e["loc"] == (e["loc"][0],)
                                                                 and e["loc"][0] in bad)])
        raise ValidationError.from_exception_data(cls.__name__, line_errors)

    #: Fields added after the spec format was first published, with the value that means "off". A spec
    #: that leaves them off dumps (and hashes) exactly as before they existed, so plan files and cached
    #: layers written by older versions keep matching their specs.
    _LATER_FIELDS: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _omit_later_fields_when_off(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name, value in data.items():  # -0.0 equals 0.0: dumps (hash, generated code) must not differ
                if isinstance(value, float) and value == 0:
                    data[name] = 0.0
            for name, off in self._LATER_FIELDS.items():
                if name in data and (data[name] == off or getattr(self, name) == off):  # (a tuple dumps as a list)
                    del data[name]
        return data


# --------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------

#: activation name -> its entry (expression of gate and up, or of x); the table lives in moegraph.semantics
ACTIVATIONS = _activations.ACTIVATIONS


def _check_activation(v: Any) -> str:
    if isinstance(v, str) and v in ACTIVATIONS:
        return v
    if isinstance(v, str) and _activations.is_inline(v) and v.strip() not in ACTIVATIONS:  # (a padded name: below)
        # An inline expression of gate and up (or x): validated by the expression language (unknown
        # names, arity, non-elementwise constructs, anything but numbers and calls, finiteness).
        try:
            _activations.activation(v)
        except ValueError as exc:
            raise ValueError(f"{exc}; or use one of {', '.join(ACTIVATIONS)}") from None
        return v
    if isinstance(v, str) and v.lower() in ACTIVATIONS:
        raise ValueError(f"activation names are lower case here: '{v.lower()}'")
    if isinstance(v, str) and v.lower() in _activations.OTHER_NAMES:
        name = _activations.OTHER_NAMES[v.lower()]
        gated = next((n for n, a in ACTIVATIONS.items() if a.gated and a.elementwise == name), None)
        raise ValueError(f"'{v}' is called '{name}' here" + (f" (gated, as experts usually are: '{gated}')" if gated
                                                             else ""))
    names = [repr(n) for n in ACTIVATIONS]
    # The same error (and wording) as a Literal field's: the loader adds "did you mean".
    raise PydanticCustomError("literal_error", "Input should be {expected}",
                              {"expected": ", ".join(names[:-1]) + " or " + names[-1]})


def _activation_schema(schema: dict[str, Any]) -> None:
    schema["anyOf"] = [{"enum": list(ACTIVATIONS)},
                       {"type": "string", "description": "an elementwise expression of gate and up (or of x)"}]


def _check_dtype(v: Any) -> Any:
    # float64 and the float8 formats are torch dtypes but not spec dtypes: say where they belong, not "did you
    # mean 'float16'"; anything else goes on to the Literal (and its wording).
    where = _dtypes.not_a_spec_dtype(v) if isinstance(v, str) else None
    if where:
        names = list(_dtypes.DTYPES)
        raise ValueError(f"{v!r} is not a spec dtype (use {', '.join(names[:-1])} or {names[-1]}): {where}")
    return v


DType = Annotated[Literal[tuple(_dtypes.DTYPES)], BeforeValidator(_check_dtype)]  # type: ignore[valid-type]


#: most routed experts a spec (and a trace) may have
MAX_EXPERTS = 65536


class ExpertNorm(_Frozen):
    """An RMS norm in the experts' space with one learned per-channel weight (Muse Spark's expert norms), or for
    the routed experts' output norm one per expert (``per_expert``, Ergo).

    The weight w multiplies as ``(weight_offset + w)``: offset 0 is nn.RMSNorm's form, offset 1 a weight
    stored as a difference from one (it starts at zero). ``scale: before`` scales the input by it and then
    normalises (Muse Spark's post-expert norm); ``after`` normalises, then scales.
    """

    kind: Literal["rms"] = Field("rms", description="rms: v / sqrt(mean(v^2) + eps), computed in float32.")
    eps: float = Field(1e-6, gt=0, le=1.0, description="Added to the mean square before the square root.")
    weight_offset: Literal[0.0, 1.0] = Field(
        0.0, description="The learned weight w scales as (weight_offset + w): 0 (w starts at one) or 1 (w starts at "
        "zero, stored as a difference from one).",
    )
    scale: Literal["after", "before"] = Field(
        "after", description="Apply the weight after the norm (most norms) or before it (an input-scaled norm).",
    )
    per_expert: bool = Field(
        False, description="One learned weight per routed expert (experts.output_norm_weight [E, width], kept and "
        "moved with the expert's other weights; Ergo) instead of one shared by all; experts.output_norm only.",
    )

    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"per_expert": False}


def _not_per_expert(field: str, why: str) -> str:
    """Why ``per_expert`` does not go with a norm other than the routed experts' output norm, and the fix."""
    return (f"{field}.per_expert gives each routed expert its own weight, but {field} {why}; only "
            f"experts.output_norm has a weight per expert: drop per_expert")


class ExpertsSpec(_Frozen):
    """The routed experts: E identical MLPs of shape D -> F -> D."""

    num_experts: int = Field(gt=0, le=MAX_EXPERTS, description="Number of routed experts E.")
    intermediate_size: int = Field(gt=0, le=1 << 20, description="Hidden size F of one routed expert.")
    activation: str = Field(
        "swiglu",
        json_schema_extra=_activation_schema,
        description="Gated (swiglu, geglu, geglu_tanh, reglu: act(x W_gate) * (x W_up)) or plain "
        "(silu, gelu, gelu_tanh, relu, relu2: act(x W_up)) expert MLP, or an elementwise expression of gate and up "
        "(or of x) such as '(clamp(up, -7, 7) + 1) * clamp(gate, max=7) * sigmoid(1.702 * clamp(gate, max=7))'.",
    )
    bias: bool = Field(False, description="Whether expert projections carry a bias.")
    gate_clamp: float | None = Field(
        None, gt=0, le=1e30, description="Clamp the gate projection to at most this value before the activation."
    )
    up_clamp: float | None = Field(
        None, gt=0, le=1e30, description="Clamp the up projection to [-up_clamp, up_clamp] (gated MLPs only)."
    )
    routing_weight: Literal["output", "input"] = Field(
        "output", description="Where a token's routing weight multiplies: the expert's output, w * expert(x) (most "
        "MoEs), or its input, expert(w * x) (Llama 4).",
    )
    identity_experts: int = Field(
        0, ge=0, le=MAX_EXPERTS, description="Extra router choices whose expert returns its input (LongCat-Flash's "
        "zero-computation experts): router ids num_experts .. num_experts + identity_experts - 1.",
    )
    zero_experts: int = Field(
        0, ge=0, le=MAX_EXPERTS, description="Extra router choices whose expert returns zero, after the identity ones.",
    )

    input_norm: ExpertNorm | None = Field(
        None, description="A norm of what the routed experts see (the layer input, or its projection with "
        "moe.expert_projection), one learned weight pre_expert_norm.weight; the router still sees the layer input "
        "(Gemma 4, Muse Spark); None = none.",
    )
    output_norm: ExpertNorm | None = Field(
        None, description="A norm of each expert's output before its routing weight scales it (Muse Spark's "
        "post-expert norm), one learned weight shared by the experts (expert_output_norm.weight), or with "
        "per_expert one per expert (experts.output_norm_weight); None = none.",
    )

    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"routing_weight": "output", "identity_experts": 0, "zero_experts": 0,
                                               "input_norm": None, "output_norm": None}

    @property
    def router_choices(self) -> int:
        """Router outputs: the MLP experts, then the identity experts, then the zero experts."""
        return self.num_experts + self.identity_experts + self.zero_experts

    _activation_known = field_validator("activation", mode="before")(_check_activation)

    @property
    def gated(self) -> bool:
        return _activations.activation(self.activation).gated

    @model_validator(mode="after")
    def _clamps_need_gate(self) -> ExpertsSpec:
        if not self.gated and (self.gate_clamp is not None or self.up_clamp is not None):
            raise field_error(
                "gate_clamp" if self.gate_clamp is not None else "up_clamp",
                f"gate_clamp/up_clamp apply to gated activations only, but activation is "
                f"'{self.activation}'; use a gated activation such as 'swiglu' or drop the clamps"
            )
        if self.input_norm is not None and self.input_norm.per_expert:
            raise field_error("input_norm.per_expert", _not_per_expert("experts.input_norm", "normalises what every "
                                                                       "expert sees, before any expert is chosen"))
        return self


class SharedExpertsSpec(_Frozen):
    """Always-active experts added to the routed output (DeepSeek, Qwen2-MoE)."""

    count: int = Field(0, ge=0, le=64, description="Number of shared experts (0 = none).")
    intermediate_size: int | None = Field(
        None, gt=0, le=1 << 20, description="Hidden size of one shared expert; defaults to the routed expert's F."
    )
    gate: Literal["none", "sigmoid", "router"] = Field(
        "none", description="'sigmoid': scale the shared output by sigmoid(x w_gate) as in Qwen2-MoE. 'router': each "
        "shared expert has its own router row after the routed choices; its score joins the chosen experts' weights "
        "(normalised and scaled with them) and scales that shared expert's output (Inkling). The shared experts are "
        "then stored one by one, as [count, ., .] tensors like the routed ones.",
    )
    output_norm: ExpertNorm | None = Field(
        None, description="A norm of the shared experts' output, one learned weight shared_expert_norm.weight [D] "
        "(Ergo: an MLP, then an RMS norm); None = none.",
    )
    combine: str = Field(
        _combine.DEFAULT_COMBINE,
        description="How the shared output joins the routed one: an elementwise expression of 'routed' (the routed "
        "experts' weighted sum) and 'shared' (the shared experts' output, after their gate), e.g. "
        "'0.5 * (routed + shared)' (averaged) or 'routed + 0.25 * shared'. Default: the sum.",
    )

    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"combine": _combine.DEFAULT_COMBINE, "output_norm": None}

    _combine_valid = field_validator("combine")(_combine.check_combine)

    @model_validator(mode="after")
    def _settings_need_expert(self) -> SharedExpertsSpec:
        problems = _Problems()
        if self.count == 0 and self.gate != "none":
            problems.add(
                "gate", "a shared-expert gate needs at least one shared expert: set count >= 1 or gate: none"
            )
        if self.count == 0 and self.combine != _combine.DEFAULT_COMBINE:
            problems.add("combine", "combine says how the shared experts' output joins the routed one, but count is 0; "
                                    "set count >= 1 or drop combine")
        if self.output_norm is not None:
            if self.count == 0:
                problems.add("output_norm", "output_norm normalises the shared experts' output, but count is 0; set "
                                            "count >= 1 or drop output_norm")
            elif self.gate != "none":
                problems.add("output_norm", f"a shared-expert output norm with gate '{self.gate}' is not defined "
                                            "(would the norm undo the gate's scale?); set gate: none or drop "
                                            "output_norm")
            if self.output_norm.per_expert:
                problems.add("output_norm.per_expert", _not_per_expert(
                    "shared_experts.output_norm", "normalises the shared experts' output, which no routing chooses"))
        if self.count == 0 and self.intermediate_size is not None:
            problems.add(
                "intermediate_size",
                "intermediate_size is set but count is 0, so there is no shared expert to size; set count >= 1 "
                "or drop intermediate_size",
            )
        problems.raise_any()
        return self


# --------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------

# The score language (named scores, custom expressions of x) lives in moegraph.semantics.scores.
_check_score = _scores.check_score


class GroupLimit(_Frozen):
    """Group-limited routing (DeepSeek-V2 device-limited, DeepSeek-V3 node-limited).

    Experts are split into ``num_groups`` contiguous groups of E/G; each token keeps the
    ``topk_groups`` best groups (by ``group_score``) and picks its top-k experts inside them only.
    """

    num_groups: int = Field(gt=0, le=65536, description="Number of expert groups G; must divide the number of experts.")
    topk_groups: int = Field(gt=0, le=65536, description="Groups kept per token (M in DeepSeek-V2).")
    group_score: Literal["max", "sum_topn"] = Field(
        "max", description="Score of a group: its best expert (V2) or the sum of its top_n experts (V3)."
    )
    top_n: int = Field(2, gt=0, le=65536, description="Experts summed per group when group_score is 'sum_topn'.")
    tie_to: Literal["none", "device", "node"] = Field(
        "none",
        description="Tie groups to devices or nodes of the topology (then num_groups must equal that count).",
    )

    @model_validator(mode="after")
    def _kept_le_groups(self) -> GroupLimit:
        if self.topk_groups > self.num_groups:
            raise field_error(
                "topk_groups",
                f"topk_groups ({self.topk_groups}) exceeds num_groups ({self.num_groups}); keep at most "
                f"num_groups groups"
            )
        return self


class ExpertBias(_Frozen):
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias used for selection only."""

    update_rate: float = Field(0.001, ge=0, le=1, description="Bias step per update (gamma in DeepSeek-V3).")
    applies_to: Literal["scores", "logits"] = Field(
        "scores", description="Add the bias to the scores (DeepSeek-V3) or to the logits before scoring (Kolibri): "
        "the selection is top-k of (scores or logits) + bias either way; the weights stay the unbiased scores.",
    )
    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"applies_to": "scores"}


class RouterInputNorm(_Frozen):
    """What the router sees: ``multiplier * [weight *] rms(x)`` (Gemma 4), or the input only scaled.

    ``weight`` is a learned per-channel vector ``router.input_norm.weight`` [D] (initialised to ones);
    the experts still get the layer input unchanged.
    """

    kind: Literal["rms", "none"] = Field(
        "rms", description="rms: x / sqrt(mean(x^2) + eps) in float32; none: no norm, only the weight and multiplier."
    )
    eps: float = Field(1e-6, gt=0, le=1.0, description="Added to the mean square before the square root (rms).")
    weight: bool = Field(False, description="Multiply by a learned per-channel weight router.input_norm.weight [D].")
    multiplier: float = Field(1.0, gt=0, le=1e4, description="A constant factor (Gemma 4: hidden_size ** -0.5).")

    @model_validator(mode="after")
    def _does_something(self) -> RouterInputNorm:
        if self.kind == "none" and not self.weight and self.multiplier == 1.0:
            raise field_error("kind", "router.input_norm with kind none, no weight and multiplier 1 leaves the router "
                                      "input unchanged; drop input_norm or set kind: rms, weight or multiplier")
        return self


class SparseMixer(_Frozen):
    """Phi-MoE's sparsemixer at inference: the k-th choice is the k-th largest logit, weighted by a softmax
    over the experts not chosen before whose logits are within a relative ``2 * jitter_eps`` of it."""

    jitter_eps: float = Field(gt=0, le=1, description="The mask threshold is 2 * jitter_eps (router_jitter_noise).")


def _tag_required(key: str) -> ConfigDict:
    """The config of a tagged union's member whose tag validation requires (a mapping without it is refused):
    the JSON schema lists the tag as required too, though the field has a default (a model built in Python
    need not name it). Without that, a plain ``oneOf`` lets a mapping lacking its tag match the one member whose
    other fields it fits, which validation refuses."""
    def extra(schema: dict[str, Any]) -> None:
        schema["required"] = [key, *(k for k in schema.get("required", ()) if k != key)]

    return ConfigDict(json_schema_extra=extra)


class RouterLinear(_Frozen):
    """A linear layer of a router network (``router.mlp``): the width becomes ``size``; parameters
    ``router.mlp.<i>.weight`` [size, width before] and, with ``bias``, ``router.mlp.<i>.bias`` [size]."""

    model_config = _tag_required("op")

    op: Literal["linear"] = "linear"
    size: int = Field(gt=0, le=1 << 20, description="Output width of the layer.")
    bias: bool = Field(False, description="Whether the layer adds a learned bias.")


class RouterNorm(_Frozen):
    """An RMS norm inside a router network, in float32, times a learned weight ``router.mlp.<i>.weight``
    [width] (starts at one)."""

    model_config = _tag_required("op")

    op: Literal["rms_norm"] = "rms_norm"
    eps: float = Field(1e-6, gt=0, le=1.0, description="Added to the mean square before the square root.")


class RouterActivation(_Frozen):
    """An elementwise function inside a router network: a plain activation name (gelu, silu, relu, ...) or
    an expression of x, as for ungated experts."""

    model_config = _tag_required("op")

    op: Literal["activation"] = "activation"
    function: str = Field(description="A plain (ungated) activation name or an expression of x, e.g. 'gelu'.")

    @field_validator("function")
    @classmethod
    def _plain(cls, v: str) -> str:
        entry = _activations.activation(v)
        if entry.gated:
            raise ValueError(f"router.mlp activation {v!r} is gated (an expression of gate and up); a router layer "
                             "has one input: use a plain activation such as gelu, silu, relu or an expression of x")
        return v


class RouterState(_Frozen):
    """Where a router network meets the router state the layers of a model pass on (Zaya): with
    ``receive``, the previous layer's state times a learned ``router.mlp.<i>.scale`` [width] (starts at one)
    is added here; the value here is this layer's state, which the layer returns beside its output."""

    model_config = _tag_required("op")

    op: Literal["state"] = "state"
    receive: bool = Field(True, description="Add the previous layer's state (false: a first layer, which only "
                                            "returns its own).")


def _tag_of(v: Any, key: str, default: Any = None) -> Any:
    """A tagged union's tag: ``v[key]`` (a mapping) or ``v.key`` (a model), when it is a string; anything else
    gives None, which pydantic reports as a missing tag. (A list or mapping there is never formatted: pydantic
    would print the whole value in its error, which a YAML alias bomb makes endless.)"""
    tag = v.get(key, default) if isinstance(v, dict) else getattr(v, key, None)
    return tag if isinstance(tag, str) else None


RouterLayer = Annotated[
    Union[
        Annotated[RouterLinear, Tag("linear")],
        Annotated[RouterNorm, Tag("rms_norm")],
        Annotated[RouterActivation, Tag("activation")],
        Annotated[RouterState, Tag("state")],
    ],
    Discriminator(lambda v: _tag_of(v, "op")),
]


AuxLossKind = Literal[
    "expert_balance",  # Switch/GShard/DeepSeek-V2 expert-level: E * sum_e f_e * P_e (f over all K choices)
    "device_balance",  # DeepSeek-V2 device-level: the same over devices
    "comm_balance",  # DeepSeek-V2 communication balance: tokens sent to each device
    "sequence_balance",  # DeepSeek-V3 sequence-wise: expert_balance per sequence, averaged
    "global_balance",  # expert_balance with loads summed over the whole global batch
    "z_loss",  # ST-MoE router z-loss: mean(logsumexp(logits)^2)
]


#: the aux losses that weigh loads by the scores' share of each token (z_loss reads the logits)
BALANCE_LOSSES = frozenset(typing.get_args(AuxLossKind)) - {"z_loss"}


class AuxLoss(_Frozen):
    """An auxiliary loss the layer returns in training mode (see moegraph.runtime for formulas)."""

    kind: AuxLossKind
    coef: float = Field(ge=0, le=100, description="Coefficient alpha of the loss.")


class Capacity(_Frozen):
    """Expert capacity: at most ceil(factor * T * K / E) tokens per expert (or ``tokens``), counted over the
    batch or over each sequence (``per``); the rest are dropped."""

    factor: float | None = Field(None, gt=0, le=1024, description="Capacity factor (1.0 = the even share).")
    drop_policy: Literal["probs", "position", "choice_then_position"] = Field(
        "probs", description="Which tokens an over-full expert keeps: the highest-scoring ('probs'), the earliest "
        "whichever choice of theirs it is ('position', Megatron's), or every token's first choice before any second "
        "choice, each in token order ('choice_then_position', GShard's as DeepSpeed and fairseq implement it).",
    )
    min_capacity: int = Field(1, ge=0, le=1 << 30, description="Lower bound on the per-expert capacity.")
    tokens: int | None = Field(
        None, gt=0, le=1 << 30, description="An absolute capacity: at most this many tokens per expert (Switch "
        "Transformers' expert_capacity), instead of a factor.",
    )
    per: Literal["batch", "sequence"] = Field(
        "batch", description="What the capacity counts over: every token of the call (T = B*S), or each sequence "
        "of a [B, S, D] input on its own (T = S; Switch Transformers).",
    )

    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"tokens": None, "per": "batch"}

    @model_validator(mode="after")
    def _factor_or_tokens(self) -> Capacity:
        if (self.factor is None) == (self.tokens is None):
            raise field_error("factor", "give the capacity as a factor (factor: 1.25) or as a number of tokens "
                                        "(tokens: 64), exactly one of them")
        if self.tokens is not None and self.min_capacity > self.tokens:  # (warned, not refused: old files load)
            warnings.warn(f"capacity.min_capacity {self.min_capacity} is ignored: the capacity is tokens: {self.tokens} "
                          "(min_capacity bounds a capacity computed from factor); raise tokens or drop min_capacity",
                          stacklevel=2)
        return self


def _normalize_negative(score: str) -> str:
    """Why normalize does not go with a score that can be negative, and the fix."""
    return (f"normalize divides the chosen experts' scores by their sum, but score '{score}' "
            f"{_scores.negative_score_words(score)}: the sum can be near zero and the weights huge (hundreds, either "
            "sign); use a non-negative score (softmax, sigmoid, softplus, or e.g. relu(...) of an expression) or drop "
            "normalize")


class TopKRouter(_Frozen):
    """Token choice: each token picks its top-k experts by router score."""

    type: Literal["topk"] = "topk"
    top_k: int = Field(gt=0, le=1024, description="Experts per token K.")
    score: str = Field(
        "softmax",
        description="'softmax', a named function (sigmoid, softplus, sqrt_softplus, tanh, identity) or an "
        "elementwise expression of the logit x, e.g. 'sqrt(softplus(x))'.",
    )
    topk_order: Literal["score_then_topk", "topk_then_score"] = Field(
        "score_then_topk",
        description="Score all experts then pick top-k, or pick top-k logits then score them (softmax over K).",
    )
    normalize: bool = Field(False, description="Divide the selected weights by their sum.")
    scaling_factor: float = Field(1.0, gt=0, le=1e4, description="Multiply routed weights by this factor.")
    groups: GroupLimit | None = None
    expert_bias: ExpertBias | None = None
    router_bias: bool = Field(False, description="Whether the router linear has a bias.")
    aux_losses: tuple[AuxLoss, ...] = Field((), max_length=len(typing.get_args(AuxLossKind)),
                                            description="Auxiliary losses, each kind at most once.")
    capacity: Capacity | None = Field(None, description="None = dropless (default).")
    jitter: float = Field(
        0.0, ge=0, lt=1, description="Multiplicative input noise U(1-j, 1+j) on the router input in training."
    )
    input_norm: RouterInputNorm | None = Field(
        None, description="Normalise or scale the router's input (not the experts'); None = the layer input."
    )
    learned_logit_scale: bool = Field(
        False, description="Multiply the logits by a learned scalar router.logit_scale (a temperature; starts at 1)."
    )
    logit_softcap: float | None = Field(
        None, gt=0, le=1e4, description="Cap the logits before scoring: c * tanh(logits / c); None = no cap.",
    )
    sparsemixer: SparseMixer | None = Field(
        None, description="Weigh the top-k choices by Phi-MoE's sparsemixer (inference form) instead of their scores."
    )
    per_expert_scale: bool = Field(
        False, description="Multiply each chosen expert's weight by a learned per-expert scale "
        "router.per_expert_scale [E] (Gemma 4; starts at 1), after normalisation and scaling_factor.",
    )
    learned_weight_scale: bool = Field(
        False, description="Multiply the routing weights by a learned scalar router.weight_scale (starts at 1), "
        "after normalisation and scaling_factor; the shared experts' router rows too (Inkling's global_scale).",
    )
    mlp: tuple[RouterLayer, ...] = Field(
        (), max_length=32, description="The router as a small network: these layers (linear, rms_norm, activation, "
        "state) run on the router input, then router.weight maps their output to the logits; () = one linear.",
    )
    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"input_norm": None, "learned_logit_scale": False,
                                               "logit_softcap": None, "sparsemixer": None, "per_expert_scale": False,
                                               "mlp": (), "learned_weight_scale": False}

    _score_known = field_validator("score")(_check_score)

    @field_validator("aux_losses")
    @classmethod
    def _unique_losses(cls, v: tuple[AuxLoss, ...]) -> tuple[AuxLoss, ...]:
        kinds = [loss.kind for loss in v]
        for i, k in enumerate(kinds):
            if k in kinds[:i]:
                raise field_error(
                    f"{i}.kind",
                    f"aux loss kind '{k}' is listed more than once (entries {kinds.index(k)} and {i}); "
                    "give each kind once with its coef",
                )
        return v

    @field_validator("mlp")
    @classmethod
    def _one_state(cls, v: tuple[Any, ...]) -> tuple[Any, ...]:
        states = [i for i, layer in enumerate(v) if layer.op == "state"]
        if len(states) > 1:
            raise field_error(f"{states[1]}.op", f"router.mlp has a state at layers {states}; a layer passes on one "
                                                 "router state: keep one state step")
        if v and all(layer.op in ("state", "activation", "rms_norm") for layer in v) and not states:
            raise field_error("0.op", "router.mlp has no linear layer and no state, so it is one norm or function "
                                      "before router.weight; write it with router.input_norm, or add a linear layer")
        return v

    @property
    def mlp_width(self) -> int | None:
        """Width of the router network's output (router.weight's columns); None = the layer input."""
        sizes = [layer.size for layer in self.mlp if layer.op == "linear"]
        return sizes[-1] if sizes else None

    @property
    def router_state(self) -> RouterState | None:
        """The state step of the router network, if any (the layer then returns its router state)."""
        return next((layer for layer in self.mlp if layer.op == "state"), None)

    @model_validator(mode="after")
    def _order_needs_softmax(self) -> TopKRouter:
        if self.topk_order == "topk_then_score" and self.score != "softmax":
            raise field_error(
                "topk_order",
                "topk_order 'topk_then_score' only differs from 'score_then_topk' for softmax; with "
                f"score '{self.score}' use topk_order: score_then_topk"
            )
        if self.normalize and score_can_be_negative(self.score):
            raise field_error("normalize", _normalize_negative(self.score))
        for i, loss in enumerate(self.aux_losses):
            if loss.kind in BALANCE_LOSSES and score_can_be_negative(self.score):
                raise field_error(
                    f"aux_losses.{i}.kind",
                    f"aux loss '{loss.kind}' shares each token among the experts by its scores, which must be >= 0; "
                    f"score '{self.score}' {_scores.negative_score_words(self.score)}, so the loss would have no "
                    "lower bound; use a non-negative score (softmax, sigmoid, softplus, or e.g. relu(...) of an "
                    "expression) or drop the loss",
                )
        if self.sparsemixer is not None:
            problems = _Problems()
            for key, unset, why in (
                ("score", "softmax", "its weights are masked softmaxes of the logits"),
                ("topk_order", "score_then_topk", "it picks the largest logits one by one"),
                ("normalize", False, "its weights are its own"), ("groups", None, "it picks among all experts"),
                ("expert_bias", None, "it picks by the logits alone"), ("capacity", None, "it is dropless"),
            ):
                if getattr(self, key) != unset:
                    problems.add(key, f"{key} does not combine with sparsemixer ({why}); drop {key} or sparsemixer")
            problems.raise_any()
        return self


class ExpertChoiceRouter(_Frozen):
    """Expert choice (Zhou et al. 2022): each expert picks its top-C tokens, C = factor * T / E."""

    model_config = _tag_required("type")

    type: Literal["expert_choice"] = "expert_choice"
    capacity_factor: float = Field(2.0, gt=0, le=1024, description="Tokens per expert = factor * T / E.")
    score: str = Field("softmax", description="Score function over experts, as for topk routers.")
    router_bias: bool = False
    aux_losses: tuple[AuxLoss, ...] = Field((), max_length=len(typing.get_args(AuxLossKind)))

    _score_known = field_validator("score")(_check_score)

    @field_validator("aux_losses")
    @classmethod
    def _only_z_loss(cls, v: tuple[AuxLoss, ...]) -> tuple[AuxLoss, ...]:
        for i, loss in enumerate(v):
            if loss.kind != "z_loss":
                raise field_error(
                    f"{i}.kind",
                    f"expert-choice routing is balanced by construction; aux loss '{loss.kind}' does not apply "
                    "(only z_loss does); drop it",
                )
        return v


class HashRouter(_Frozen):
    """Hash routing (Roller et al. 2021): expert(s) fixed by the token id.

    The experts come from the token id alone (a formula, a seeded table, or a table shipped with
    the weights as DeepSeek-V4's hash layers do); their weights are 1/K each, or (with ``score``)
    the scores a learned router gives the chosen experts, as for top-k routing.
    """

    model_config = _tag_required("type")

    type: Literal["hash"] = "hash"
    top_k: int = Field(1, gt=0, le=16, description="Number of hash functions / experts per token.")
    method: Literal["modulo", "random", "table"] = Field(
        "random", description="'modulo': (id + k * E // K) mod E; 'random': a seeded random table over the vocab; "
        "'table': a [vocab_size, top_k] table of expert ids loaded with the weights (router.hash_table)."
    )
    vocab_size: int | None = Field(
        None, gt=0, le=1 << 24, description="Vocabulary size, needed by methods 'random' and 'table'."
    )
    seed: int = Field(0, ge=0, lt=1 << 63, description="Seed of the 'random' table (and of a 'table' before loading).")
    score: str | None = Field(
        None, description="None: weight 1/K per expert. Otherwise the chosen experts are weighted by this score of a "
        "learned router's logits ('softmax', a named function or an expression of x, as for topk routers).",
    )
    normalize: bool = Field(False, description="Divide the chosen experts' scores by their sum (needs score).")
    scaling_factor: float = Field(1.0, gt=0, le=1e4, description="Multiply the scored weights by this (needs score).")
    router_bias: bool = Field(False, description="Whether the scoring router linear has a bias (needs score).")
    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"score": None, "normalize": False, "scaling_factor": 1.0,
                                               "router_bias": False}

    @field_validator("score")
    @classmethod
    def _score_known(cls, v: str | None) -> str | None:
        return None if v is None else _check_score(v)

    @model_validator(mode="after")
    def _random_needs_vocab(self) -> HashRouter:
        problems = _Problems()
        if self.method in ("random", "table") and self.vocab_size is None:
            problems.add(
                "vocab_size",
                f"hash method '{self.method}' needs vocab_size (the table has one row per token id); set vocab_size "
                "or use method: modulo",
            )
        if self.score is not None and self.normalize and score_can_be_negative(self.score):
            problems.add("normalize", _normalize_negative(self.score))
        if self.score is None:
            for key, unset in (("normalize", False), ("scaling_factor", 1.0), ("router_bias", False)):
                if getattr(self, key) != unset:
                    problems.add(key, f"{key} weights the router's scores, but score is not set (weights are 1/K); "
                                      f"set score (e.g. softmax) or drop {key}")
        problems.raise_any()
        return self


Router = Annotated[
    Union[
        Annotated[TopKRouter, Tag("topk")],
        Annotated[ExpertChoiceRouter, Tag("expert_choice")],
        Annotated[HashRouter, Tag("hash")],
    ],
    Discriminator(lambda v: _tag_of(v, "type", "topk")),
]


# --------------------------------------------------------------------------------------------
# Quantization (FP8 experts, as DeepSeek-V3 trains and ships them)
# --------------------------------------------------------------------------------------------


class QuantizationSpec(_Frozen):
    """FP8 expert weights with one scale per weight block, activations quantized per 1 x N tile.

    The layout is DeepSeek-V3's: a weight [out, in] is cut into ``weight_block`` = [block_out,
    block_in] blocks, each stored as FP8 with one float32 ``weight_scale_inv`` (the value the FP8
    block is multiplied by to recover the weight). Activations entering an expert GEMM are quantized
    per token and per ``activation_tile[1]`` columns. Blocks and tiles must divide the GEMM sizes
    (no ragged edge), so that the fused gate/up projection holds whole blocks of each half.
    """

    format: Literal["fp8_e4m3", "fp8_e5m2"] = Field(
        "fp8_e4m3", description="FP8 format of expert weights and activations (e4m3: DeepSeek-V3's choice)."
    )
    weight_block: tuple[int, int] = Field(
        (128, 128), description="[rows, cols] of one weight block sharing a scale (output dim, input dim)."
    )
    activation_tile: tuple[int, int] = Field(
        (1, 128), description="[1, cols]: activations get one scale per token and per cols input columns."
    )
    scale_format: Literal["float32", "ue8m0"] = Field(
        "float32", description="float32 scales, or 'ue8m0': powers of two (stored as float32), as newer checkpoints use."
    )
    dispatch: Literal["fp8", "dtype"] = Field(
        "fp8", description="Precision of the expert-parallel dispatch: 'fp8' tiles with their scales, or the layer dtype."
    )
    shared_experts: bool = Field(False, description="Quantize the shared experts too (DeepSeek-V3 does).")

    @model_validator(mode="after")
    def _sizes(self) -> QuantizationSpec:
        problems = _Problems()
        for i, v in enumerate(self.weight_block):
            if not 1 <= v <= 4096:
                problems.add(f"weight_block.{i}", f"weight block size {v} is out of range; use 1..4096 (128 as DeepSeek-V3)")
        if self.activation_tile[0] != 1:
            problems.add("activation_tile.0", f"activation tiles are one token tall; write activation_tile: [1, "
                                              f"{self.activation_tile[1]}]")
        if not 1 <= self.activation_tile[1] <= 4096:
            problems.add("activation_tile.1", f"activation tile width {self.activation_tile[1]} is out of range; "
                                              "use 1..4096 (128 as DeepSeek-V3)")
        problems.raise_any()
        return self


def _quantization_problems(quant: QuantizationSpec, d: int, f: int, shared_f: int | None, problems: _Problems) -> None:
    """Blocks and tiles that do not divide the expert GEMM sizes (D and F, and the shared size)."""
    sizes = [("hidden_size", d), ("experts.intermediate_size", f)]
    if shared_f is not None:
        sizes.append(("shared_experts.intermediate_size", shared_f))
    bo, bi = quant.weight_block
    tile = quant.activation_tile[1]
    for field, what, v in (("quantization.weight_block.0", "weight block rows", bo),
                           ("quantization.weight_block.1", "weight block columns", bi),
                           ("quantization.activation_tile.1", "activation tile width", tile)):
        bad = [(name, n) for name, n in sizes if n % v]
        if bad:
            gcd = math.gcd(*[n for _, n in sizes])
            fits = [b for b in (128, 64, 32, 16, 8, 4, 2, 1) if gcd % b == 0][0]
            problems.add(field, f"{what} ({v}) must divide {', '.join(f'{name} ({n})' for name, n in bad)}; "
                                f"use a divisor of every expert size, e.g. {fits}")


def triton_fp8_problems(moe: MoELayerSpec, torch_fix: str) -> list[tuple[str, str]]:
    """What the Triton FP8 kernels cannot run in ``moe``'s quantized experts: (field path, message) pairs.

    The kernels take one K step per weight block (the activation tile is the block's width) and tile a
    block's output rows by BLOCK_N = min(rows, 64); Triton's ``tl.arange`` needs a power of two and
    ``tl.dot`` 16 or more, so both block sizes are powers of two of at least 16. ``torch_fix`` says how to
    choose the torch backend where the spec is read ("codegen.backend: torch" in a spec file,
    "compile with backend='torch'" for a backend chosen at compile time). Used by ``MoESpec`` and, for the
    backend given to ``compile``, by ``codegen.render``.
    """
    quant = moe.quantization
    if quant is None:
        return []
    problems = []
    bo, bi = quant.weight_block
    sizes = [moe.hidden_size, moe.experts.intermediate_size]
    if quant.shared_experts and moe.shared_experts.count:
        sizes.append(moe.shared_experts.count * moe.shared_intermediate_size)
    fits = [b for b in (128, 64, 32, 16) if math.gcd(*sizes) % b == 0]
    for i, what, v in ((0, "rows (output size)", bo), (1, "columns (input size)", bi)):
        if v < 16 or v & (v - 1):
            use = f"use {fits[0]} (a power of two of 16 or more dividing the expert sizes) or " if fits else ""
            problems.append((f"moe.quantization.weight_block.{i}",
                             f"the Triton FP8 kernels need weight block {what} a power of two of 16 or more (one "
                             f"Triton tile per block), got {v}; {use}{torch_fix}"))
    if quant.activation_tile[1] != bi:
        problems.append(("moe.quantization.activation_tile.1",
                         f"the Triton FP8 kernels need moe.quantization.activation_tile [1, {quant.activation_tile[1]}] "
                         f"as wide as the weight block's input size ({bi}): both are one K step; set "
                         f"activation_tile: [1, {bi}] or {torch_fix}"))
    if moe.experts.bias:
        problems.append(("moe.experts.bias", f"the Triton FP8 kernels have no expert biases; drop the biases or "
                                             f"{torch_fix}"))
    return problems


# --------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------


class OutputNorm(_Frozen):
    """A norm of the layer output (routed + shared experts), with a learned per-channel weight (AXK1)."""

    kind: Literal["rms"] = Field("rms", description="rms: weight * y / sqrt(mean(y^2) + eps), computed in float32.")
    eps: float = Field(1e-6, gt=0, le=1.0, description="Added to the mean square before the square root.")


class ExpertProjection(_Frozen):
    """The routed experts work in a space of their own (Muse Spark): the layer projects its input D -> size
    (``pre_expert_proj.weight`` [size, D]), runs the experts there (``experts.input_norm`` normalises what they
    see), and projects their weighted sum back size -> D (``post_expert_proj.weight`` [D, size]). The router
    sees the layer input."""

    size: int = Field(gt=0, le=1 << 20, description="Width of the experts' space (their input and output size).")


class MoELayerSpec(_Frozen):
    """One MoE layer: router + E routed experts + optional shared experts."""

    hidden_size: int = Field(gt=0, le=1 << 20, description="Model dimension D.")
    experts: ExpertsSpec
    shared_experts: SharedExpertsSpec = SharedExpertsSpec()
    router: Router
    dtype: DType = Field("float32", description="Parameter dtype of the layer.")
    router_dtype: DType = Field("float32", description="Dtype the router logits and scores are computed in.")
    quantization: QuantizationSpec | None = Field(
        None, description="FP8 routed (optionally shared) experts with block scales; None = experts in dtype."
    )

    output_norm: OutputNorm | None = Field(
        None, description="A norm applied to the layer output (routed + shared experts); None = no norm."
    )

    output_bias: bool = Field(
        False, description="A learned bias [D] added to the layer output, after the output norm if any (JetMoE)."
    )

    expert_projection: ExpertProjection | None = Field(
        None, description="Projections around the routed experts, which then work in a space of their own; None = "
        "the experts see the layer input.",
    )

    _LATER_FIELDS: ClassVar[dict[str, Any]] = {"quantization": None, "output_norm": None, "output_bias": False,
                                               "expert_projection": None}

    @model_validator(mode="after")
    def _routing_fits_experts(self) -> MoELayerSpec:
        problems = _Problems()
        if self.quantization is not None:
            shared = self.quantization.shared_experts
            if shared and self.shared_experts.count == 0:
                problems.add("quantization.shared_experts", "quantization.shared_experts is true but the layer has no "
                                                            "shared expert; set it false or add shared_experts.count")
            shared_f = self.shared_experts.count * self.shared_intermediate_size if shared and self.shared_experts.count else None
            _quantization_problems(self.quantization, self.hidden_size, self.experts.intermediate_size, shared_f, problems)
            if self.experts.routing_weight == "input":
                problems.add("experts.routing_weight", "FP8 experts weight each expert's output (the FP8 op scales rows "
                             "after the down projection); set routing_weight: output or drop quantization")
        self._expert_space_problems(problems)
        r, e = self.router, self.experts.router_choices
        k = getattr(r, "top_k", None)
        if self.shared_experts.gate == "router":
            if r.type != "topk":
                problems.add("shared_experts.gate", f"shared_experts.gate: router gives the shared experts router rows "
                             f"beside a topk router's choices; router type is '{r.type}': use type: topk or another gate")
            if e != self.experts.num_experts:
                problems.add("shared_experts.gate", "shared_experts.gate: router with identity/zero experts is not "
                             "defined (whose router rows come first?); drop one of them")
            if self.quantization is not None and self.quantization.shared_experts:
                problems.add("quantization.shared_experts", "FP8 shared experts are one MLP; shared_experts.gate: "
                             "router keeps them one by one: set quantization.shared_experts false")
        if e != self.experts.num_experts:
            if r.type != "topk":
                problems.add("experts.identity_experts", f"identity/zero experts are router choices of a topk router; "
                                                         f"router type is '{r.type}': drop them or use type: topk")
            if getattr(r, "capacity", None) is not None:
                problems.add("router.capacity", "expert capacity with identity/zero experts is not defined (do they "
                                                "count against it?); drop capacity or those experts")
            for i, loss in enumerate(getattr(r, "aux_losses", ())):
                if loss.kind in ("device_balance", "comm_balance"):
                    problems.add(f"router.aux_losses.{i}.kind", f"aux loss '{loss.kind}' splits experts over devices; "
                                 "identity/zero experts live on no device: drop the loss or those experts")
        if k is not None and k > e:
            problems.add(
                "router.top_k", f"router.top_k ({k}) exceeds experts.num_experts ({e}); choose top_k <= {e}"
            )
        g = getattr(r, "groups", None)
        if g is not None:
            if e % g.num_groups:
                divisors = [d for d in range(1, e + 1) if e % d == 0]
                problems.add(
                    "router.groups.num_groups",
                    f"router.groups.num_groups ({g.num_groups}) must divide experts.num_experts ({e}); "
                    f"choose one of {divisors}"
                )
            per_group = e // g.num_groups
            if g.group_score == "sum_topn" and g.top_n > per_group:
                problems.add(
                    "router.groups.top_n",
                    f"router.groups.top_n ({g.top_n}) exceeds the {per_group} experts per group; "
                    f"use top_n <= {per_group} or fewer groups"
                )
            if k is not None and g.topk_groups * per_group < k:
                problems.add(
                    "router.groups.topk_groups",
                    f"router.groups keeps {g.topk_groups} groups of {per_group} experts = "
                    f"{g.topk_groups * per_group} candidates, fewer than top_k ({k}); raise topk_groups"
                )
        problems.raise_any()
        return self

    def _expert_space_problems(self, problems: _Problems) -> None:
        """What an expert projection or expert norms cannot be combined with (not defined or not built)."""
        ex, proj = self.experts, self.expert_projection
        # Experts beside the routed ones, or inputs the layer scales itself: which input would they see?
        beside = {"shared_experts.count": self.shared_experts.count > 0 and "shared experts",
                  "experts.identity_experts": ex.router_choices != ex.num_experts and "identity/zero experts",
                  "experts.routing_weight": ex.routing_weight == "input" and "routing_weight: input"}
        owner = "expert_projection" if proj is not None else "experts.input_norm" if ex.input_norm is not None else None
        if owner is not None:
            for field, name in beside.items():
                if name:
                    problems.add(field, f"{owner} with {name} is not defined (which input would they see?); drop "
                                 f"{field} or {owner}")
        if self.quantization is not None and (proj is not None or ex.input_norm is not None):
            problems.add("quantization", "FP8 experts quantize the layer input inside their op, so it cannot be "
                         "projected or normalised for them; drop quantization, or expert_projection and "
                         "experts.input_norm")
        if ex.output_norm is not None:
            if self.quantization is not None:
                problems.add("experts.output_norm", "FP8 experts weigh and sum their outputs inside one op, so no norm "
                             "can go between an expert and its weight; drop quantization or experts.output_norm")
            if ex.routing_weight == "input":
                problems.add("experts.output_norm", "an expert output norm with routing_weight: input would undo the "
                             "weight it scaled the input by; set routing_weight: output or drop experts.output_norm")

    @property
    def expert_width(self) -> int:
        """Input and output width of the routed experts: expert_projection.size, or the hidden size."""
        return self.expert_projection.size if self.expert_projection is not None else self.hidden_size

    @property
    def rows_per_assignment(self) -> bool:
        """Whether the routed experts take one input row per assignment instead of one per token: the routing
        weight scales their input (expert(w * x)), or each expert's output is normalised before its weight. The
        expert-parallel dispatch then sends one row per assignment (``planner.dispatch`` counts so)."""
        return self.experts.routing_weight == "input" or self.experts.output_norm is not None

    @property
    def top_k(self) -> int:
        """Experts per token (for expert choice: the average, capacity_factor, at most every expert: a factor above
        the expert count gives every expert every token)."""
        r = self.router
        return r.top_k if hasattr(r, "top_k") else min(self.experts.num_experts, max(1, round(r.capacity_factor)))

    @property
    def router_rows(self) -> int:
        """Rows of the router weight: the router choices, then one per shared expert when they are routed."""
        routed_shared = self.shared_experts.count if self.shared_experts.gate == "router" else 0
        return self.experts.router_choices + routed_shared

    @property
    def shared_intermediate_size(self) -> int:
        s = self.shared_experts
        return s.intermediate_size if s.intermediate_size is not None else self.experts.intermediate_size


# --------------------------------------------------------------------------------------------
# The surrounding model (layer pattern and non-MoE sizes for parameter counts)
# --------------------------------------------------------------------------------------------


class MHAttention(_Frozen):
    """Multi-head / grouped-query attention (Mixtral, Qwen)."""

    model_config = _tag_required("kind")

    kind: Literal["mha"] = "mha"
    num_heads: int = Field(gt=0, le=1 << 16)
    num_kv_heads: int | None = Field(None, gt=0, le=1 << 16, description="Defaults to num_heads (plain MHA).")
    head_dim: int | None = Field(None, gt=0, le=1 << 16, description="Defaults to hidden_size / num_heads.")
    qkv_bias: bool = False


class MLAttention(_Frozen):
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    model_config = _tag_required("kind")

    kind: Literal["mla"] = "mla"
    num_heads: int = Field(gt=0, le=1 << 16)
    q_lora_rank: int | None = Field(None, gt=0, le=1 << 20, description="None = a plain q projection (V2-Lite).")
    kv_lora_rank: int = Field(gt=0, le=1 << 20)
    qk_nope_head_dim: int = Field(gt=0, le=1 << 16)
    qk_rope_head_dim: int = Field(gt=0, le=1 << 16)
    v_head_dim: int = Field(gt=0, le=1 << 16)


def _attention_kind_named(v: Any) -> Any:
    # pydantic formats a discriminator value it does not know with str(): a list there (an alias bomb: billions
    # of entries) would never finish; refused as a missing tag instead, which the loader words without the value
    if isinstance(v, dict) and "kind" in v and not isinstance(v["kind"], str):
        raise PydanticCustomError("union_tag_not_found", "'kind' must be a string")
    return v


Attention = Annotated[Annotated[Union[MHAttention, MLAttention], Field(discriminator="kind")],
                      BeforeValidator(_attention_kind_named)]


#: the most decoder layers a model spec describes
MAX_LAYERS = 10000


class ModelSpec(_Frozen):
    """The layer pattern of the model and, optionally, non-MoE sizes for whole-model counts."""

    num_layers: int = Field(1, gt=0, le=MAX_LAYERS, description="Decoder layers in the model.")
    first_k_dense: int = Field(0, ge=0, le=10000, description="The first k layers are dense (DeepSeek).")
    moe_layer_freq: int = Field(1, gt=0, le=10000, description="Every n-th layer after first_k_dense is MoE.")
    layer_types: tuple[Literal["dense", "moe"], ...] | None = Field(
        None, max_length=MAX_LAYERS, description="Explicit per-layer pattern; overrides first_k_dense/moe_layer_freq."
    )
    dense_intermediate_size: int | None = Field(None, gt=0, le=1 << 22, description="FFN size of dense layers.")
    vocab_size: int | None = Field(None, gt=0, le=1 << 26)
    tie_word_embeddings: bool = False
    attention: Attention | None = None

    @model_validator(mode="after")
    def _pattern(self) -> ModelSpec:
        problems = _Problems()
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                problems.add(
                    "layer_types",
                    f"layer_types lists {len(self.layer_types)} layers but num_layers is {self.num_layers}; "
                    "make them agree",
                )
            if "moe" not in self.layer_types:
                problems.add("layer_types", "layer_types has no 'moe' layer; mark at least one layer 'moe'")
            # Compare with the defaults rather than ask what was set: dump_spec spells defaults out.
            ignored = [k for k, default in (("first_k_dense", 0), ("moe_layer_freq", 1)) if getattr(self, k) != default]
            if ignored:
                problems.add(
                    ignored[0],
                    f"{' and '.join(ignored)} would be ignored because layer_types lists every layer; "
                    "give either layer_types or first_k_dense/moe_layer_freq",
                )
        elif self.first_k_dense >= self.num_layers:
            problems.add(
                "first_k_dense",
                f"first_k_dense ({self.first_k_dense}) leaves no MoE layer of num_layers ({self.num_layers}); "
                "lower it"
            )
        if "dense" in self.resolved_layer_types() and self.dense_intermediate_size is None and (
            self.attention is not None or self.vocab_size is not None
        ):
            problems.add(
                "dense_intermediate_size",
                "the model has dense layers and non-MoE sizes but no dense_intermediate_size; set it so "
                "whole-model parameter counts are complete"
            )
        problems.raise_any()
        return self

    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is not None:
            return self.layer_types
        return tuple(
            "moe" if i >= self.first_k_dense and (i - self.first_k_dense) % self.moe_layer_freq == 0 else "dense"
            for i in range(self.num_layers)
        )

    @property
    def moe_layer_indices(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.resolved_layer_types()) if t == "moe")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_indices)


# --------------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------------


class UniformTopology(_Frozen):
    """A uniform cluster: ``nodes`` x ``gpus_per_node`` with one link class inside and one across nodes."""

    kind: Literal["uniform"] = "uniform"
    nodes: int = Field(1, gt=0, le=4096)
    gpus_per_node: int = Field(1, gt=0, le=64)
    intra_node_bandwidth_gbps: float = Field(400.0, ge=1e-6, le=1e9, description="GB/s per GPU inside a node (NVLink).")
    inter_node_bandwidth_gbps: float = Field(50.0, ge=1e-6, le=1e9, description="GB/s per GPU across nodes (RDMA NIC).")
    intra_node_latency_us: float = Field(2.0, ge=0, le=1e9)
    inter_node_latency_us: float = Field(8.0, ge=0, le=1e9)
    gpu_memory_gib: float = Field(80.0, gt=0, le=1e9)

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class Device(_Frozen):
    name: str = Field(min_length=1, max_length=200)
    node: str = Field(min_length=1, max_length=200, description="Node (host) the device sits in.")
    memory_gib: float = Field(80.0, gt=0, le=1e9)


class Link(_Frozen):
    a: str = Field(max_length=200)
    b: str = Field(max_length=200)
    bandwidth_gbps: float = Field(ge=1e-6, le=1e9)
    latency_us: float = Field(0.0, ge=0, le=1e9)


class ExplicitTopology(_Frozen):
    """An irregular cluster as a list of devices and (undirected) links between them."""

    kind: Literal["explicit"] = "explicit"
    devices: tuple[Device, ...] = Field(min_length=1, max_length=65536)
    links: tuple[Link, ...] = Field((), max_length=1 << 20)

    @model_validator(mode="after")
    def _links_known(self) -> ExplicitTopology:
        problems = _Problems()
        first: dict[str, int] = {}  # device name -> index of the first device of that name
        for i, d in enumerate(self.devices):
            if first.setdefault(d.name, i) != i:
                problems.add(
                    f"devices.{i}.name",
                    f"device name {d.name!r} is used by devices {first[d.name]} and {i}; give every device a "
                    "unique name",
                )
        shown = f"{list(first)[:8]}" + (f" and {len(first) - 8} more" if len(first) > 8 else "")
        for i, link in enumerate(self.links):
            for end_key, end in (("a", link.a), ("b", link.b)):
                if end not in first:
                    close = close_names(end, first)
                    hint = f"did you mean {close[0]!r}? Otherwise " if close else ""
                    problems.add(
                        f"links.{i}.{end_key}",
                        f"link names unknown device {end!r}; {hint}use one of the devices: {shown}",
                    )
            if link.a == link.b:
                problems.add(f"links.{i}.b", f"link connects {link.a!r} to itself; drop it")
        problems.raise_any()
        return self

    @property
    def num_gpus(self) -> int:
        return len(self.devices)


Topology = Annotated[
    Union[Annotated[UniformTopology, Tag("uniform")], Annotated[ExplicitTopology, Tag("explicit")]],
    Discriminator(lambda v: _tag_of(v, "kind",
                                    ("explicit" if "devices" in v else "uniform") if isinstance(v, dict) else None)),
]


# --------------------------------------------------------------------------------------------
# Placement and codegen settings
# --------------------------------------------------------------------------------------------


class PlacementObjective(_Frozen):
    """Not weights the planner reads: it minimises the predicted all-to-all with every GPU's load held within
    ``placement.max_imbalance`` (balance is a bound, not a term traded against communication). The section stays
    in the format so that spec files and the plan files made for them keep matching (a spec's hash covers it);
    a value other than 1 is warned about, not refused, for the same reason."""

    communication: float = Field(1.0, ge=0, le=1e6, description="Always 1: the planner minimises the predicted "
                                 "all-to-all (within placement.max_imbalance).")
    balance: float = Field(1.0, ge=0, le=1e6, description="Always 1: GPU balance is bounded by "
                           "placement.max_imbalance, not weighed.")

    @model_validator(mode="after")
    def _not_weights(self) -> PlacementObjective:
        for key in ("communication", "balance"):
            if getattr(self, key) != 1.0:
                warnings.warn(f"placement.objective.{key} = {getattr(self, key):g} is ignored: the planner minimises "
                              "the all-to-all with every GPU within placement.max_imbalance (to trade balance for "
                              "communication, change max_imbalance); drop the objective section", stacklevel=2)
        return self


class PlacementSpec(_Frozen):
    """Planner settings."""

    redundant_slots: int = Field(0, ge=0, le=1 << 20, description="Extra expert slots (in total) for replicas of hot experts.")
    objective: PlacementObjective = PlacementObjective()
    max_imbalance: float = Field(1.05, ge=1.0, le=1e6, description="Target max/mean GPU load.")
    traces: tuple[str, ...] = Field((), max_length=1024, description="Routing trace files or folders to plan from.")
    seed: int = Field(0, ge=0, lt=1 << 63)


class CodegenSpec(_Frozen):
    backend: Literal["torch", "triton"] = "torch"
    block_m: int | None = Field(
        None, ge=16, le=256,
        description="Rows per block of the Triton grouped expert GEMMs (a power of two, 16-256), over what the tuned "
                    "table or the default chooses; each expert's rows are padded to it. Under torch.compile the "
                    "layer's forward breaks the graph to apply it (fullgraph=True refuses such a layer).")

    @field_validator("block_m")
    @classmethod
    def _power_of_two(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError(f"must be a power of two (Triton block sizes are; tl.dot needs 16 or more): 16, 32, 64, "
                             f"128 or 256, got {v}")
        return v


# --------------------------------------------------------------------------------------------
# The whole spec
# --------------------------------------------------------------------------------------------


class MoESpec(_Frozen):
    """A whole spec file."""

    name: str = Field("unnamed", min_length=1, max_length=200)
    description: str = Field("", max_length=100_000)
    source: str = Field("", max_length=100_000, description="Where the numbers come from (paper, config).")
    model: ModelSpec = ModelSpec()
    moe: MoELayerSpec
    topology: Topology = UniformTopology()
    placement: PlacementSpec = PlacementSpec()
    codegen: CodegenSpec = CodegenSpec()

    @field_validator("name")
    @classmethod
    def _one_line_name(cls, v: str) -> str:
        # The name heads generated files and reports: one printable line (use description for more).
        if not v.isprintable() or v != v.strip():
            raise ValueError(f"name {v!r} holds a line break, control character or surrounding spaces; "
                             "use one line of printable text (put more in description)")
        return v

    @model_validator(mode="after")
    def _cross_sections(self) -> MoESpec:
        problems = _Problems()
        g = getattr(self.moe.router, "groups", None)
        topo = self.topology
        if g is not None and g.tie_to != "none":
            if g.tie_to == "device":
                count = topo.num_gpus
            elif isinstance(topo, UniformTopology):
                count = topo.nodes
            else:
                count = len({d.node for d in topo.devices})
            if g.num_groups != count:
                problems.add(
                    "moe.router.groups.num_groups",
                    f"moe.router.groups.tie_to is '{g.tie_to}' so num_groups ({g.num_groups}) must equal the "
                    f"topology's {g.tie_to} count ({count}); change one of them or set tie_to: none"
                )
        # Rules the code generator relies on: validate refuses what compile would.
        e = self.moe.experts.num_experts
        for i, loss in enumerate(getattr(self.moe.router, "aux_losses", ())):
            if loss.kind in ("device_balance", "comm_balance") and e % topo.num_gpus:
                problems.add(
                    f"moe.router.aux_losses.{i}.kind",
                    f"aux loss '{loss.kind}' needs experts ({e}) to split evenly over the topology's "
                    f"{topo.num_gpus} devices; change the topology or drop the loss",
                )
        if self.codegen.backend == "triton":
            for field, message in triton_fp8_problems(self.moe, "set codegen.backend: torch"):
                problems.add(field, message)
        slots = _slots_problem(self.moe.experts, self.placement, topo)
        if slots:
            problems.add(*slots)
        a = self.model.attention
        if isinstance(a, MHAttention) and a.head_dim is None and a.num_heads > self.moe.hidden_size:
            problems.add("model.attention.num_heads",
                         f"{a.num_heads} heads of hidden_size {self.moe.hidden_size} leave no width per head (head_dim "
                         "defaults to hidden_size / num_heads); set model.attention.head_dim or use fewer heads")
        problems.raise_any()
        return self

    @model_validator(mode="wrap")
    @classmethod
    def _slots_checked_alone(cls, data: Any, handler: Any) -> MoESpec:
        """Report the slot rule even when another section fails (the rule above then never runs).

        It needs only moe.experts, topology and placement; when those are valid on their own and break
        the rule, the problem joins the others, so a user sees every problem in one run.
        """
        try:
            return handler(data)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            problem = _slots_problem_of_raw(data)
            if problem is None or any(problem[1] in str(e.get("ctx", {})) for e in errors):
                raise
            line_errors = _as_line_errors(errors)
            line_errors.append({"type": field_error(*problem), "loc": (), "input": data})
            raise ValidationError.from_exception_data(exc.title, line_errors) from None

    def hash(self) -> str:
        """Canonical sha256 of the spec: stable across key order and file format."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.hash()[:12]

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def differences(self, other: MoESpec, sections: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
        """Where this spec and ``other`` differ: (dotted field, this value, other's value) for each leaf field of
        ``sections`` (top-level fields such as "model", "moe"; default: all, so every field the hash covers),
        values as JSON shortened to 40 characters, in field order."""
        out: list[tuple[str, str, str]] = []

        def walk(key: str, x: Any, y: Any) -> None:
            if isinstance(x, dict) and isinstance(y, dict):
                for k in list(x) + [k for k in y if k not in x]:
                    walk(f"{key}.{k}", x.get(k), y.get(k))
            elif x != y:
                out.append((key, json.dumps(x)[:40], json.dumps(y)[:40]))

        mine, theirs = self.to_dict(), other.to_dict()
        for section in sections or list(mine):
            walk(section, mine.get(section), theirs.get(section))
        return out

    def differences_shown(self, other: MoESpec, sections: tuple[str, ...] | None = None, limit: int = 3,
                          labels: tuple[str, str] | None = None) -> str:
        """``differences`` in one line for a message, at most ``limit`` of them and how many more:
        "moe.top_k: 6 vs 8; ..." (this spec's value first), or with ``labels`` ("in the given spec", "in the
        plan's") "moe.top_k: 6 in the given spec, 8 in the plan's; ...". "nothing" where they are alike."""
        diff = self.differences(other, sections)
        if not diff:
            return "nothing"
        one = (lambda x, y: f"{x} vs {y}") if labels is None else (lambda x, y: f"{x} {labels[0]}, {y} {labels[1]}")
        shown = "; ".join(f"{key}: {one(x, y)}" for key, x, y in diff[:limit])
        return shown + (f" (and {len(diff) - limit} more)" if len(diff) > limit else "")


def _slots_problem(experts: ExpertsSpec, placement: PlacementSpec, topo: Any) -> tuple[str, str] | None:
    """(field, message) when experts + redundant slots do not split evenly over the GPUs, or give a GPU more
    slots than there are experts (it would hold one expert twice; the planner refuses that too)."""
    e, g = experts.num_experts, topo.num_gpus
    slots = e + placement.redundant_slots
    if slots % g:
        return ("placement.redundant_slots",
                f"experts + placement.redundant_slots = {slots} slots do not split evenly over "
                f"{g} GPUs; choose redundant_slots so the total is a multiple of {g}")
    if slots // g > e:
        return ("placement.redundant_slots",
                f"experts + placement.redundant_slots = {slots} slots over {g} GPU{'s' if g > 1 else ''} are "
                f"{slots // g} per GPU but there are only {e} experts: a GPU would hold one expert twice; "
                + (f"lower redundant_slots to at most {e * g - e}" if g > 1 else "drop redundant_slots")
                + " or use more GPUs (topology)")
    return None


def _slots_problem_of_raw(data: Any) -> tuple[str, str] | None:
    """``_slots_problem`` of a raw spec dict whose three sections are valid on their own, else None."""
    if not isinstance(data, dict) or not isinstance(data.get("moe"), dict) or "experts" not in data["moe"]:
        return None
    try:
        experts = ExpertsSpec.model_validate(data["moe"]["experts"])
        placement = PlacementSpec.model_validate(data.get("placement", {}))
        topo = TypeAdapter(Topology).validate_python(data.get("topology", {}))
    except ValidationError:
        return None
    return _slots_problem(experts, placement, topo)
