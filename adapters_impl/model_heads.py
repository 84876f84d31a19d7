"""The kinds of model an objective trains, named by the head on the base.

A head gives the transformers auto class, the arguments of a new head and the class-name suffix of a plain
folder's models. A registered package records its head's `kind`, so serving loads the class that was trained
without asking the objectives (tasks/objectives), which sit above this package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelHead:
    kind: str
    auto_class_name: str
    architecture: str  # the suffix of its models' class names: LlamaForCausalLM
    labelled: bool = False  # one output per label name

    def auto_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class_name)

    def options(self, label_names: list[str] | None) -> dict[str, Any]:
        """The extra `from_pretrained` arguments of a new head: one output per label, named."""
        if not self.labelled:
            return {}
        assert label_names, f"a {self.kind} head needs label names"
        return {
            "num_labels": len(label_names),
            "id2label": dict(enumerate(label_names)),
            "label2id": {name: i for i, name in enumerate(label_names)},
        }


CAUSAL_LM = ModelHead("causal_lm", "AutoModelForCausalLM", "ForCausalLM")
SEQUENCE_CLASSIFICATION = ModelHead(
    "sequence_classification", "AutoModelForSequenceClassification", "ForSequenceClassification", labelled=True
)
HEADS = {head.kind: head for head in (CAUSAL_LM, SEQUENCE_CLASSIFICATION)}


def head_of_architectures(architectures: Iterable[str]) -> ModelHead:
    """The head of a plain model folder, by its class names; a causal LM when none matches."""
    for head in HEADS.values():
        if any(a.endswith(head.architecture) for a in architectures):
            return head
    return CAUSAL_LM


def head_of_package(info: Mapping[str, Any]) -> ModelHead:
    """The head a registered package was trained with. Packages registered before the head was recorded name only
    their objective; of those, only classification trained another head than a causal LM."""
    kind = info.get("head") or ("sequence_classification" if info.get("task") == "classification" else "causal_lm")
    return HEADS[kind]
