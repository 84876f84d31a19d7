"""The kinds of model an objective trains, named by the head on the base.

A head gives the transformers auto class, the arguments of a new head, the class-name suffix of a plain folder's
models and what a served model answers (`output`: generated text, a label name, or a score). A registered package
records its head whole (`record()`), so serving loads the class that was trained and answers as it should
without asking the objectives (tasks/objectives, which sit above this package; an objective from another package
brings its own head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Output = Literal["text", "label", "score"]


@dataclass(frozen=True)
class ModelHead:
    kind: str
    auto_class_name: str
    architecture: str  # the suffix of its models' class names: LlamaForCausalLM
    labelled: bool = False  # one output per label name
    output: Output = "text"  # what serving answers: generated text, the top label's name, the raw score(s)
    extra: Mapping[str, Any] = field(default_factory=dict)  # more `from_pretrained` arguments of a new head

    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)

    def options(self, label_names: list[str] | None) -> dict[str, Any]:
        """The extra `from_pretrained` arguments of a new head: one output per label, named."""
        if not self.labelled:
            return dict(self.extra)
        assert label_names, f"a {self.kind} head needs label names"
        return {
            **self.extra,
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }

    def record(self) -> dict[str, Any]:
        """The head as a registered package records it (JSON)."""
        return {**asdict(self), "extra": dict(self.extra)}


CAUSAL_LM = ModelHead("causal_lm", "AutoModelForCausalLM", "ForCausalLM")
SEQUENCE_CLASSIFICATION = ModelHead(
    "sequence_classification",
    "AutoModelForSequenceClassification",
    "ForSequenceClassification",
    labelled=True,
    output="label",
)
HEADS = {head.kind: head for head in (CAUSAL_LM, SEQUENCE_CLASSIFICATION)}


def head_of_architectures(architectures: Iterable[str]) -> ModelHead:
    """The head of a plain model folder, by its class names; a causal LM when none matches."""
    for head in HEADS.values():
        if any(a.endswith(head.architecture) for a in architectures):
            return head
    return CAUSAL_LM


def head_of_package(info: Mapping[str, Any]) -> ModelHead:
    """The head a registered package was trained with, as it recorded it. Packages registered before the head was
    recorded name only their objective; of those, only classification trained another head than a causal LM."""
    recorded = info.get("head")
    if isinstance(recorded, dict):
        return ModelHead(**recorded)
    return SEQUENCE_CLASSIFICATION if info.get("task") == "classification" else CAUSAL_LM
