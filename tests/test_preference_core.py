"""The preference-tuning core (tasks/objectives/preference): formats, encoding, losses against TRL's own code on
the same log-probs, and a tiny LoRA model that learns its preferences (fast; no Prefect or MLflow)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tasks.errors import UserInputError
from tasks.labels import IGNORE_INDEX
from tasks.objectives.preference import (
    DataOptions,
    PreferenceEncoder,
    PreferenceLoss,
    PreferenceSettings,
    Reference,
    collator,
    encode_all,
    evaluate_preferences,
    kto_loss,
    loss_format_problem,
    normalize,
    pair_loss,
)
from tasks.objectives.preference.losses import PairLogps, kto_kl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference"
Q = [{"role": "user", "content": "What color is the sky?"}]


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- formats


def test_explicit_strings_and_messages() -> None:
    rows = [
        {"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": Q, "chosen": answer("Blue."), "rejected": answer("Green.")},
        {"prompt": "What color is the sky?", "chosen": answer("Blue."), "rejected": answer("Green.")},
        # TRL's rule: a text prompt beside whole dialogues is ignored, the dialogues' shared turns are the prompt
        {"prompt": "ignored", "chosen": [*Q, *answer("Blue.")], "rejected": [*Q, *answer("Green.")]},
    ]
    out = normalize(rows, DataOptions())
    assert out.format == "explicit" and out.paired
    assert out.rows == [{"prompt": Q, "chosen": answer("Blue."), "rejected": answer("Green.")}] * 4


def test_implicit_conversations_hh_text_and_plain_text() -> None:
    conv = {"chosen": [*Q, *answer("Blue.")], "rejected": [*Q, *answer("Green.")]}
    hh = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What color is the sky?\n\nAssistant: It is blue.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What color is the sky?\n\nAssistant: It is green.",
    }
    text = {"chosen": "The sky is blue", "rejected": "The sky is black"}
    assert normalize([conv], DataOptions()).rows == [
        {"prompt": Q, "chosen": answer("Blue."), "rejected": answer("Green.")}
    ]
    (row,) = normalize([hh], DataOptions()).rows
    assert row["prompt"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, *Q
    ]  # fmt: skip
    assert (row["chosen"], row["rejected"]) == (answer("It is blue."), answer("It is green."))
    (row,) = normalize([text], DataOptions()).rows  # "bl" is shared but no word is split
    assert row["prompt"] == [{"role": "user", "content": "The sky is"}]
    assert (row["chosen"], row["rejected"]) == (answer("blue"), answer("black"))


def test_sharegpt_pairs_with_role_map_and_renamed_columns() -> None:
    rows = [
        {"dialog": [{"from": "asker", "value": "What color is the sky?"}],
         "good": {"from": "gpt", "value": "Blue."}, "bad": [{"from": "gpt", "value": "Green."}]}
    ]  # fmt: skip
    options = DataOptions(
        columns={"conversations": "dialog", "chosen": "good", "rejected": "bad"}, role_map={"asker": "user"}
    )
    out = normalize(rows, options)
    assert out.format == "sharegpt"
    assert out.rows == [{"prompt": Q, "chosen": answer("Blue."), "rejected": answer("Green.")}]


def test_unpaired_messages_and_prompt_completion() -> None:
    rows = [{"messages": [*Q, *answer("Blue.")], "label": True}, {"messages": [*Q, *answer("Red.")], "label": False}]
    out = normalize(rows, DataOptions())
    assert out.format == "unpaired" and not out.paired
    assert out.rows[1] == {"prompt": Q, "completion": answer("Red."), "label": False}
    out = normalize([{"prompt": "What color is the sky?", "completion": "Blue.", "label": True}], DataOptions())
    assert out.rows == [{"prompt": Q, "completion": answer("Blue."), "label": True}]


def test_equal_pairs_are_dropped_and_counted() -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    out = normalize(rows, DataOptions())
    assert (len(out.rows), out.equal_dropped) == (1, 1)
    with pytest.raises(UserInputError, match="chosen equals rejected"):
        normalize(rows[:1], DataOptions())


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": "q", "chosen": "a"}], r"'rejected' column beside 'chosen'.*The formats: explicit"),
        ([{"text": "q"}], r"'chosen' and 'rejected' columns \(pairs\) or a 'label' column.*sharegpt"),
        ([{"messages": [*Q, *answer("a")]}], r"'label'.*unpaired"),
        (
            [{"chosen": "", "rejected": ""}, {"chosen": "Sky: blue", "rejected": "Grass: green"}],
            "row 2: chosen and rejected share no prompt",
        ),
        ([{"messages": [*Q, *answer("a")], "label": "yes"}], r"row 1: 'label' must be true or false"),
        ([{"messages": [*Q, *answer("a")], "label": 1}], r"row 1: 'label' must be true or false"),
        ([{"prompt": Q, "chosen": [*Q, *answer("a")], "rejected": answer("b")}], "row 1: .*the prompt must end"),
    ],
)
def test_bad_rows_name_the_column_or_row(rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        normalize(rows, DataOptions())


def test_forced_format_names_its_missing_column() -> None:
    with pytest.raises(UserInputError, match=r"no column 'conversations', which format sharegpt needs \(data.format\)"):
        normalize([{"prompt": "q", "chosen": "a", "rejected": "b"}], DataOptions(format="sharegpt"))
    assert DataOptions(format="alpaca", columns={"output": "x"}).problems() == [
        "data.format: 'alpaca' is not a preference format; expected auto or one of ['explicit', 'implicit', 'sharegpt', 'unpaired']",
        "data.columns: unknown column(s) ['output']; the preference formats' columns are ['prompt', 'chosen', 'rejected', "
        "'conversations', 'messages', 'completion', 'label']",
    ]


def test_each_loss_names_the_format_it_takes() -> None:
    assert loss_format_problem("sigmoid", "sharegpt") is None and loss_format_problem("kto", "unpaired") is None
    assert "kto takes unpaired rows" in str(loss_format_problem("kto", "explicit"))
    assert "simpo takes pairs" in str(loss_format_problem("simpo", "unpaired"))


# ---------------------------------------------------------------- losses against TRL


def settings(**kw: Any) -> PreferenceSettings:
    return PreferenceSettings.model_validate(kw)


def test_dpo_by_hand() -> None:
    """logratios +1 and -1 at beta 0.1: loss = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139."""
    logps = PairLogps(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([4]), torch.tensor([5]),
                      torch.tensor([-11.0]), torch.tensor([-11.0]))  # fmt: skip
    out = pair_loss(settings(loss="sigmoid", beta=0.1), logps)
    assert float(out.loss) == pytest.approx(0.5981388693, abs=1e-7)
    assert (float(out.chosen_rewards), float(out.rejected_rewards)) == pytest.approx((0.1, -0.1))


class FakeLM(torch.nn.Module):
    """Stands in for a TRL-patched model: returns given per-token log-probs (TRL's fused LM head output)."""

    is_gradient_checkpointing = False

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        shape = self.per_token.shape
        return SimpleNamespace(log_probs=self.per_token, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                               is_top1=torch.zeros(shape, dtype=torch.bool))  # fmt: skip


def per_token(sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs (shifted, as TRL's) that add up to `sums` over each row's completion tokens."""
    shifted = mask[:, 1:].float()
    return shifted * (sums / shifted.sum(1)).unsqueeze(1)


def accelerator() -> SimpleNamespace:
    same = lambda t: t  # noqa: E731
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same, unwrap_model=same)


def random_pairs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy and reference summed log-probs of n pairs ([chosen..., rejected...]) and completion masks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (2 * n,), generator=g)
    width = int(lengths.max()) + 4
    mask = torch.zeros(2 * n, width, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        mask[i, 3 : 3 + length] = 1
    policy = -torch.rand(2 * n, generator=g) * 30 - 1
    ref = policy + torch.randn(2 * n, generator=g) * 3
    return policy, ref, mask


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_matches_trl(loss: str, beta: float) -> None:
    from trl.trainer.dpo_trainer import DPOTrainer

    policy, ref, mask = random_pairs(6, seed=int(beta * 10))
    policy.requires_grad_(True)
    trl_self = SimpleNamespace(
        model=FakeLM(per_token(policy, mask)), ref_model=FakeLM(per_token(ref, mask)), accelerator=accelerator(),
        aux_loss_enabled=False, precompute_ref_logps=False, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    expected = DPOTrainer._compute_loss(trl_self, trl_self.model, inputs, False)
    (expected_grad,) = torch.autograd.grad(expected, policy)
    tokens = mask.sum(1)
    logps = PairLogps(*policy.chunk(2), *tokens.chunk(2), *ref.chunk(2))
    out = pair_loss(settings(loss=loss, beta=beta), logps)
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(grad, expected_grad)
    metrics = trl_self._metrics["train"]
    assert float(out.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"][0], rel=1e-5)
    assert float((out.chosen_rewards > out.rejected_rewards).float().mean()) == metrics["rewards/accuracies"][0]


@pytest.mark.parametrize(("beta", "gamma"), [(2.0, 0.5), (0.1, 1.4)])
def test_simpo_matches_trl_cpo(beta: float, gamma: float) -> None:
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    policy, _, mask = random_pairs(6, seed=3)
    tokens = mask.sum(1)
    trl_self = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                               accelerator=accelerator())  # fmt: skip
    mean = policy / tokens
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trl_self, *mean.chunk(2))
    out = pair_loss(settings(loss="simpo", beta=beta, gamma=gamma), PairLogps(*policy.chunk(2), *tokens.chunk(2)))
    torch.testing.assert_close(out.losses, losses)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards)


def test_orpo_matches_trl_odds_ratio() -> None:
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    policy, _, mask = random_pairs(6, seed=4)
    policy = policy / 10  # mean log-probs near 0 as well as far below
    tokens = mask.sum(1)
    nll = torch.tensor(1.7)
    trl_self = SimpleNamespace(beta=0.25, accelerator=accelerator())
    mean = policy / tokens
    ratio_losses, chosen_rewards, _, _, _ = ORPOTrainer.odds_ratio_loss(trl_self, *mean.chunk(2))
    expected = nll - ratio_losses.mean()  # TRL's get_batch_loss_metrics
    out = pair_loss(
        settings(loss="orpo", **{"lambda": 0.25}), PairLogps(*policy.chunk(2), *tokens.chunk(2), chosen_nll=nll)
    )
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards)


@pytest.mark.parametrize(("desirable", "undesirable"), [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_trl(desirable: float, undesirable: float) -> None:
    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(5)
    n, width = 6, 10
    mask = torch.zeros(n, width, dtype=torch.long)
    mask[:, 4:9] = 1
    labels = torch.tensor([True, False, True, True, False, False])
    policy = (-torch.rand(n, generator=g) * 20).requires_grad_(True)
    ref = policy.detach() + torch.randn(n, generator=g)
    policy_kl, ref_kl = -torch.rand(n, generator=g) * 20, -torch.rand(n, generator=g) * 20 - 1

    class KTOFake(FakeLM):
        def __init__(self, main: torch.Tensor, kl: torch.Tensor) -> None:
            super().__init__(per_token(main, mask))
            self.main, self.kl = per_token(main, mask), per_token(kl, mask)

        def forward(self, **kwargs: Any) -> SimpleNamespace:
            self.per_token = self.kl if kwargs["input_ids"] is kl_ids else self.main
            return super().forward(**kwargs)

    kl_ids = torch.full_like(mask, 2)
    trl_self = SimpleNamespace(
        model=KTOFake(policy, policy_kl), ref_model=KTOFake(ref, ref_kl), accelerator=accelerator(),
        calculate_KL=True, aux_loss_enabled=False, precompute_ref_logps=False, loss_type="kto", beta=0.1,
        desirable_weight=desirable, undesirable_weight=undesirable, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    trl_self._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trl_self, model, batch)
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(mask), "KL_completion_mask": mask,
              "label": labels}  # fmt: skip
    expected = KTOTrainer._compute_loss(trl_self, trl_self.model, inputs, False)
    (expected_grad,) = torch.autograd.grad(expected, policy)
    s = settings(loss="kto", beta=0.1, desirable_weight=desirable, undesirable_weight=undesirable)
    out = kto_loss(s, policy, ref, labels, kto_kl(policy_kl, ref_kl))
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-6)
    torch.testing.assert_close(grad, expected_grad)
    assert float(out.extra["kl"]) == pytest.approx(trl_self._metrics["train"]["kl"][0], rel=1e-6)


def test_settings_section() -> None:
    s = PreferenceSettings.model_validate({"loss": "orpo", "lambda": 0.3})
    assert (s.lambda_, s.beta, s.uses_reference) == (0.3, 0.1, False)
    with pytest.raises(ValueError, match="loss"):
        PreferenceSettings.model_validate({"loss": "dpo"})
    with pytest.raises(ValueError, match="extra"):
        PreferenceSettings.model_validate({"loss": "sigmoid", "gama": 1})


# ---------------------------------------------------------------- encoding and training on a tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    from tasks.objectives.instruction.chat import resolve_template
    from tasks.objectives.instruction.settings import InstructionSettings

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return tokenizer, resolve_template(tokenizer, InstructionSettings(template="plain"))


def test_encoding_labels_the_responses_only(tiny: tuple[Any, Any]) -> None:
    tokenizer, template = tiny
    rows = normalize(
        [{"prompt": "What color is the sky?", "chosen": "Blue.", "rejected": "It is green."}], DataOptions()
    ).rows
    (row,), dropped = encode_all(rows, tokenizer, template, 64, paired=True)
    assert dropped == 0
    for side, text in (("chosen", "Blue."), ("rejected", "It is green.")):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert ids[: len(row["prompt_input_ids"])] == row["prompt_input_ids"]
        assert all(label == IGNORE_INDEX for label in labels[: len(row["prompt_input_ids"])])
        trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained == f"{text}{tokenizer.eos_token}"  # the response and the plain template's end of turn
    assert tokenizer.decode(row["prompt_input_ids"]).endswith("### Response:\n")


def test_truncation_drops_prompt_first_then_rows(tiny: tuple[Any, Any]) -> None:
    tokenizer, template = tiny
    long_prompt = "once upon a time " * 20
    rows = normalize([{"prompt": long_prompt, "chosen": "Blue.", "rejected": "It is green."}], DataOptions()).rows
    (full,), _ = encode_all(rows, tokenizer, template, 512, paired=True)
    (cut,), dropped = encode_all(rows, tokenizer, template, 40, paired=True)
    assert dropped == 0 and len(cut["rejected_input_ids"]) == 40
    keep = 1 if full["rejected_input_ids"][0] == tokenizer.bos_token_id else 0
    for side in ("chosen", "rejected"):  # the oldest tokens after BOS went, the same number from both
        ids = full[f"{side}_input_ids"]
        cut_by = len(full["rejected_input_ids"]) - 40
        assert cut[f"{side}_input_ids"] == ids[:keep] + ids[keep + cut_by :]
    response = [t for t in full["rejected_labels"] if t != IGNORE_INDEX]
    assert [t for t in cut["rejected_labels"] if t != IGNORE_INDEX] == response
    encoder = PreferenceEncoder(tokenizer, template, len(response), paired=True)  # no room for a prompt token
    assert encoder({k: [v] for k, v in rows[0].items()}) == {k: [] for k in encoder.columns}
    assert encoder.dropped == 1
    with pytest.raises(UserInputError, match=r"data\.max_length"):
        encode_all(rows, tokenizer, template, 4, paired=True)


def test_unpaired_collator_pairs_each_prompt_with_another_completion(tiny: tuple[Any, Any]) -> None:
    tokenizer, template = tiny
    raw = [{"prompt": f"question {i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(3)]
    rows, _ = encode_all(normalize(raw, DataOptions()).rows, tokenizer, template, 64, paired=False)
    batch = collator(tokenizer, False, 64)(rows)
    assert batch["label"].tolist() == [True, False, True]
    first = tokenizer.decode([t for t in batch["kl_input_ids"][0].tolist() if t != tokenizer.pad_token_id])
    assert "question 0" in first and "answer 2" in first
    kl_targets = [t for t in batch["kl_labels"][0].tolist() if t != IGNORE_INDEX]
    assert kl_targets == [t for t in rows[2]["labels"] if t != IGNORE_INDEX]


COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


def synthetic_pairs(n: int) -> list[dict[str, Any]]:
    """The preferred answer repeats the asked colour; the rejected one names another."""
    return [
        {"prompt": f"Say {c}.", "chosen": f"{c} {c}", "rejected": f"{COLORS[(i + 3) % len(COLORS)]} no"}
        for i, c in enumerate(COLORS[:n])
    ]


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def lora_model(path: str, seed: int = 0) -> Any:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora_config())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_training_learns_the_preferences(tiny_model: str, tiny: tuple[Any, Any], tmp_path: Path, loss: str) -> None:
    """A tiny LoRA model trained by the HF Trainer with the mixin: held-out metrics rise from the base's."""
    from transformers import Trainer, TrainingArguments

    from tasks.objectives.preference import PreferenceTrainerMixin

    tokenizer, template = tiny
    raw = synthetic_pairs(8)
    if loss == "kto":
        raw = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
               for r in raw for side in ("chosen", "rejected")]  # fmt: skip
    normal = normalize(raw, DataOptions())
    rows, _ = encode_all(normal.rows, tokenizer, template, 64, paired=normal.paired)
    model = lora_model(tiny_model)
    s = settings(loss=loss, beta=0.5 if loss != "simpo" else 2.0)
    pref = PreferenceLoss(s, Reference() if s.uses_reference else None)
    collate = collator(tokenizer, normal.paired, 64)
    before = evaluate_preferences(model, rows, collate, 4, pref)

    class T(PreferenceTrainerMixin, Trainer):
        pass

    from datasets import Dataset

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=10, report_to="none", use_cpu=True, save_strategy="no", seed=0)  # fmt: skip
    trainer = T(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collate, preference=pref)
    trainer.train()
    after = evaluate_preferences(model, rows, collate, 4, pref)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert "rewards/margins" in logged[-1] and "logps/chosen" in logged[-1]
    assert after["eval_loss"] < before["eval_loss"]
    if loss == "kto":
        assert after["eval_label_accuracy"] > before["eval_label_accuracy"]
    else:
        assert after["eval_pair_accuracy"] > before["eval_pair_accuracy"]
        assert after["eval_reward_accuracy"] >= 0.75 and after["eval_reward_margin"] > before["eval_reward_margin"]


def test_one_dpo_step_matches_trl_dpo_trainer(tiny_model: str, tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """TRL's DPOTrainer and ours on the same tiny LoRA model and the same batch: same loss, same gradients."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, template = tiny
    rows, _ = encode_all(normalize(synthetic_pairs(4), DataOptions()).rows, tokenizer, template, 64, paired=True)
    batch = collator(tokenizer, True, 64)(rows)
    ours = lora_model(tiny_model)
    with torch.no_grad():  # an adapter that already moved: policy and reference differ
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    loss = PreferenceLoss(settings(loss="sigmoid", beta=0.1), Reference())
    out, _ = loss(ours, batch)
    out.loss.backward()

    tokenizer.chat_template = template.source
    data = Dataset.from_list([{"prompt": [*Q], "chosen": answer("Blue."), "rejected": answer("Green.")}] * 2)
    config = DPOConfig(
        output_dir=str(tmp_path), beta=0.1, use_cpu=True, report_to="none", per_device_train_batch_size=4
    )
    # TRL adds the adapter itself (given a PeftModel it would take the starting adapter as the reference); then
    # its weights are set to ours: the reference is the base with the adapter disabled in both.
    from transformers import AutoModelForCausalLM

    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    tokenized = trainer.train_dataset[0]  # TRL's own tokenization of the first pair: the same ids and targets
    (mine,), _ = encode_all(normalize(data.to_list()[:1], DataOptions()).rows, tokenizer, template, 64, paired=True)
    for side in ("chosen", "rejected"):
        assert tokenized["prompt_ids"] + tokenized[f"{side}_ids"] == mine[f"{side}_input_ids"]
        assert [t for t in mine[f"{side}_labels"] if t != IGNORE_INDEX] == tokenized[f"{side}_ids"]
    missing, unexpected = trainer.model.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not [m for m in missing if "lora" in m]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": batch["labels"].ne(IGNORE_INDEX).long()}  # fmt: skip
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, inputs)
    expected.backward()
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in trainer.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_frozen_reference_equals_disabled_adapter(tiny_model: str, tiny: tuple[Any, Any]) -> None:
    """The two reference paths (adapter disabled; a frozen copy of the base, as for method full) agree."""
    from transformers import AutoModelForCausalLM

    tokenizer, template = tiny
    rows, _ = encode_all(normalize(synthetic_pairs(4), DataOptions()).rows, tokenizer, template, 64, paired=True)
    batch = collator(tokenizer, True, 64)(rows)
    model = lora_model(tiny_model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    s = settings(loss="sigmoid", beta=0.1)
    disabled, _ = PreferenceLoss(s, Reference())(model, batch)
    frozen, _ = PreferenceLoss(s, Reference(frozen=AutoModelForCausalLM.from_pretrained(tiny_model)))(model, batch)
    assert float(disabled.loss) == pytest.approx(float(frozen.loss), rel=1e-6)
    assert float(disabled.loss) != pytest.approx(math.log(2), rel=1e-4)  # the adapter counts in the policy
    assert model.training  # the reference pass left the policy in training mode


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt", "prefix"])
def test_peft_methods_reference_is_the_base(tiny_model: str, tiny: tuple[Any, Any], method: str) -> None:
    """With each peft method the reference (adapter disabled) is exactly the base model, and the loss trains the
    method's parameters (prompt and prefix prepend virtual tokens: the rows' own positions are read)."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.objectives.preference.train import sequence_logps

    tokenizer, template = tiny
    rows, _ = encode_all(normalize(synthetic_pairs(2), DataOptions()).rows, tokenizer, template, 64, paired=True)
    batch = collator(tokenizer, True, 64)(rows)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    config = {
        "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        "dora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
        "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
    }[method]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config)
    with Reference().model(model) as ref:
        reference = sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"]).logps
    torch.testing.assert_close(reference, expected)
    out, _ = PreferenceLoss(settings(loss="sigmoid"), Reference())(model, batch)
    out.loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters() if p.requires_grad)


@pytest.mark.shared
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/preference is absent")
def test_real_files_normalize() -> None:
    for name, fmt in (("dpo_en_demo", "sharegpt"), ("kto_en_demo", "unpaired")):
        out = normalize(json.loads((SHARED / f"{name}.json").read_text()), DataOptions(), name)
        assert out.format == fmt and len(out.rows) + out.equal_dropped == 300


def test_ln2_at_start() -> None:
    """A fresh adapter is the reference: every DPO pair starts at log 2."""
    out = pair_loss(
        settings(),
        PairLogps(torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(2), torch.zeros(2)),
    )
    assert float(out.loss) == pytest.approx(math.log(2))
