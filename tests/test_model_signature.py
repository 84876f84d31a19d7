"""The registered pyfunc's signature (tasks/registry.py `model_signature`): every request shape the README
documents passes MLflow's enforcement of it, and reaches the pyfunc (tasks/pyfunc_model.py) as the requests it
answers. A model that hands back what MLflow gave it stands in for the network; the end-to-end runs
(test_instruction_task, test_e2e_run) check the real versions' signatures and answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from adapters_impl.model_heads import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from tasks.pyfunc_model import _chat_requests, _conversations, _texts
from tasks.registry import model_signature

CHAT_INFO = {"head": CAUSAL_LM.record(), "chat": {"end_of_turn": "</s>"}}
TEXT_INFO = {"head": CAUSAL_LM.record(), "generation": {"max_new_tokens": 40}}
LABEL_INFO = {"head": SEQUENCE_CLASSIFICATION.record(), "label_names": ["neg", "pos"]}
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


class Echo(PythonModel):
    """What MLflow hands to `predict` after enforcing the signature, with the params."""

    _skip_type_hint_validation = True

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return [{"input": model_input, "params": params}]


def saved(info: dict[str, Any], folder: Path) -> Any:
    signature, example = model_signature(info)
    mlflow.pyfunc.save_model(str(folder), python_model=Echo(), signature=signature, input_example=example)
    return mlflow.pyfunc.load_model(str(folder))


def served_example(folder: Path) -> tuple[Any, dict[str, Any]]:
    """The input example as `mlflow models serve` receives and parses it (what MLflow checks when logging)."""
    from mlflow.models import Model, validate_serving_input

    serving_input = Model.load(str(folder)).get_serving_input(str(folder))
    echoed = validate_serving_input(str(folder), serving_input)[0]
    return echoed["input"], echoed["params"]


def received(model: Any, data: Any, params: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    echoed = model.predict(data, params)[0]
    return echoed["input"], echoed["params"]


def test_a_chat_models_signature_takes_chat_requests_dataframes_of_messages_and_prompts(tmp_path: Path) -> None:
    from mlflow.models import Model

    model = saved({**CHAT_INFO, "generation": {"max_new_tokens": 12}}, tmp_path / "chat")
    signature = Model.load(str(tmp_path / "chat")).signature
    assert signature.inputs.input_names() == ["messages", "prompt", "max_tokens"]
    assert [(p.name, p.default) for p in signature.params.params] == [("max_new_tokens", 12)]

    data, params = received(model, {"messages": CONVERSATION, "max_tokens": 3})  # the served JSON body
    assert _chat_requests(data) == [{"messages": CONVERSATION, "max_tokens": 3}]
    assert params == {"max_new_tokens": 12}, "the registered length is the default"
    data, params = received(model, pd.DataFrame({"messages": [CONVERSATION, CONVERSATION[1:]]}), {"max_new_tokens": 5})
    assert _chat_requests(data) == [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:]}]
    assert params == {"max_new_tokens": 5}
    data, _ = received(model, pd.DataFrame({"prompt": ["Hi", "Bye"]}))
    assert _chat_requests(data) is None
    assert _conversations(data) == [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]]
    data, params = served_example(tmp_path / "chat")
    assert _chat_requests(data) == [{"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}]
    with pytest.raises(MlflowException, match="messages"):  # not a list of {role, content}: refused by MLflow
        received(model, {"messages": "not a conversation"})


@pytest.mark.parametrize(("info", "outputs"), [(TEXT_INFO, ["string"]), (LABEL_INFO, ["string"])])
def test_a_text_models_signature_takes_texts_as_a_list_a_string_or_a_text_column(
    tmp_path: Path, info: dict[str, Any], outputs: list[str]
) -> None:
    model = saved(info, tmp_path / "m")
    signature = model.metadata.signature
    assert [c.type.name for c in signature.inputs.inputs] == ["string"] and not signature.inputs.has_input_names()
    assert [c.type.name for c in signature.outputs.inputs] == outputs
    for given in (["Once upon a time", "The cat"], pd.DataFrame({"text": ["Once upon a time", "The cat"]})):
        data, _ = received(model, given)
        assert _texts(data) == ["Once upon a time", "The cat"]
    assert _texts(received(model, "Once upon a time")[0]) == ["Once upon a time"]
    if info is TEXT_INFO:
        assert received(model, ["x"])[1] == {"max_new_tokens": 40}
    data, params = served_example(tmp_path / "m")
    assert _texts(data) == (["Once upon a time"] if info is TEXT_INFO else ["The food was great."])
    assert params == ({"max_new_tokens": 4} if info is TEXT_INFO else None)
