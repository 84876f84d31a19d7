"""Instruction and chat tuning: conversations in any common format, loss on the responses only.

Rows are normalised to messages when loaded (chat.py: alpaca, prompt_completion, messages, sharegpt),
rendered with the run's chat template and labelled on the responses only when tokenized. Metrics: loss,
perplexity and next-token accuracy over response tokens; greedy answers to held-out prompts scored with ROUGE-L
(the `rouge-score` package) and exact match, tuned vs base, in `reports/predictions.jsonl` and the report.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import tasks.objectives.causal_lm as causal_lm
from adapters_impl.model_heads import CAUSAL_LM
from tasks.objectives.base import Encode, Encoding, Objective, ReportInput, row_layout_key
from tasks.objectives.instruction.settings import InstructionDataSettings, InstructionSettings, section
from tasks.process_cache import ProcessCache

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from datasets import Dataset
    from torch import nn

    from tasks.config import RunConfig
    from tasks.load import DataRef
    from tasks.modeling import ModelSource
    from tasks.objectives.instruction.chat import ChatTemplate
    from tasks.probe.suites import Suite
    from tasks.settings import DataSettings, ProbeSettings
    from tasks.tokenization import TokenizedRef

log = logging.getLogger("adaptflow.instruction")

REPORTED = 8  # answers shown side by side in the Markdown report (all are in predictions.jsonl)


def options(config: RunConfig) -> dict[str, Any]:
    """The `instruction:` section (its defaults when absent), with the content fingerprint of a template file: an
    edited .jinja file tokenizes, evaluates and registers anew although its path did not change."""
    settings = section(config).model_dump(mode="json")
    return settings | ({"template_sha256": digest} if (digest := files(config).get("instruction.template")) else {})


def files(config: RunConfig) -> dict[str, str]:
    """`instruction.template`'s content fingerprint when it names a file."""
    return section(config).template_file("instruction.template")


def check(config: RunConfig) -> list[str]:
    """A template file that is missing or empty, named before anything opens."""
    return section(config).template_problems("instruction.template")


def metric_names(config: RunConfig) -> tuple[str, ...]:
    """Loss, perplexity and token accuracy over responses; ROUGE-L and exact match need generated answers."""
    generations = section(config).eval_generations
    scored = ("eval_rouge_l", "eval_exact_match") if generations else ()
    return ("eval_loss", "eval_perplexity", "eval_token_accuracy", *scored)


def metric_hint(metric: str, key: str) -> str:
    if metric in ("eval_rouge_l", "eval_exact_match"):
        generations = "train" if key == "train.best.metric" else "instruction"  # while training, or after it
        return f" (ROUGE-L and exact match need {generations}.eval_generations above 0)"
    return ""


def prepare_rows(table: Dataset, settings: DataSettings, label_column: str | None, key: str, value: str) -> Dataset:
    """Every row as a validated conversation (column `messages`); errors name the file, row and format."""
    from datasets import Dataset

    from tasks.objectives.instruction.chat import to_messages

    fmt, conversations = to_messages(table.to_list(), settings, f"{key} ({value})")
    log.info("%s: %d %s rows", key, len(conversations), fmt)
    return Dataset.from_dict({"messages": conversations})


def template_of(tokenizer: Any, settings: dict[str, Any]) -> ChatTemplate:
    """The run's template: the one already resolved (`chat`, e.g. a registered model's), else `template`'s (which
    may add tokens to `tokenizer`: chatml)."""
    from tasks.objectives.instruction.chat import ChatTemplate, resolve_template

    if "chat" in settings:
        return ChatTemplate(**settings["chat"])
    return resolve_template(tokenizer, InstructionSettings(template=settings.get("template", "tokenizer")))


def use_template(tokenizer: Any, settings: dict[str, Any], encoding: Encoding, param: str) -> ChatTemplate:
    """The run's template (`template_of`), recorded for the later stages (`settings["chat"]`), for the package
    (with the generation length) and as the run param `param`; the tokens it added to `tokenizer` go to
    `encoding.added_tokens` (every later stage adds them again and trains their rows)."""
    size = len(tokenizer)
    template = template_of(tokenizer, settings)
    added = [t for t in template.added_tokens if tokenizer.convert_tokens_to_ids(t) >= size]
    if added:
        encoding.added_tokens = added
    chat = {"name": template.name, "source": template.source, "end_of_turn": template.end_of_turn}
    settings["chat"] = chat
    encoding.params = {param: template.name}
    encoding.package = {"chat": chat, "generation": {"max_new_tokens": settings.get("max_new_tokens", 128)}}
    return template


def encoder(
    tokenizer: Any,
    data: DataRef,
    train: Dataset,
    eval_: Dataset,
    max_length: int,
    settings: dict[str, Any],
    encoding: Encoding,
) -> tuple[Encode, None]:
    """Conversations rendered with the template, labels on the responses; rows whose last response does not fit
    are dropped and counted (`sft_dropped_rows`). Records the template for the later stages and the package, and
    the tokens it added to the tokenizer (`added_tokens`)."""
    from tasks.errors import UserInputError
    from tasks.objectives.instruction.chat import encode_conversation

    template = use_template(tokenizer, settings, encoding, "sft.template")
    settings["held_out"] = data.eval_dir  # the eval conversations, answered in evaluation
    settings["max_length"] = max_length  # held-out prompts are cut (or dropped) as training cuts its rows
    counts = encoding.metrics = {"sft_dropped_rows": 0}
    loss_on = settings.get("loss_on", "assistant")

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = []
        for messages in batch["messages"]:
            try:
                row = encode_conversation(messages, tokenizer, template, loss_on, max_length)
            except UserInputError as exc:  # rows are shuffled by now: name the conversation by its opening
                raise UserInputError(
                    f"{exc} (in the conversation that opens {messages[0]['content'][:60]!r})"
                ) from None
            if row is None:
                counts["sft_dropped_rows"] += 1
            else:
                rows.append(row.as_dict())
        return {key: [r[key] for r in rows] for key in ("input_ids", "attention_mask", "labels")}

    return encode, None


ANSWERS_FILE = "scored_answers.json"  # in the run's reports folder: the tuned answers evaluation scored


def metrics(
    model: nn.Module, tokenizer: Any, tokenized: TokenizedRef, batch_size: int, keep: Path | None
) -> dict[str, float]:
    """Response loss, perplexity and token accuracy; ROUGE-L and exact match of greedy held-out answers. With
    `keep` (the run's reports folder) the answers scored are kept there, with their prompts, for the report."""
    result, prompts, texts = scored(model, tokenizer, tokenized, batch_size, prefix="")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        kept = [{"prompt": p, "tuned": t} for p, t in zip(prompts, texts, strict=True)]
        (keep / ANSWERS_FILE).write_text(json.dumps(kept, ensure_ascii=False))
    return result


def base_model(source: ModelSource, tokenized: TokenizedRef) -> tuple[nn.Module, Any]:
    """The untouched base, with the tokens the template added (their rows untrained, around the mean of the others):
    it reads the same ids and template as the tuned model."""
    return causal_lm.base_model(tokenized.model_source(source))


# The base answers the last base evaluation in this process scored, by base, eval split and prompts: the report's
# base answers (`base_generations`) are those, not generated again (both stages are cached across processes).
_BASE_ANSWERS: ProcessCache[str, list[str]] = ProcessCache()


def _base_key(source: ModelSource, tokenized: TokenizedRef, prompts: list[str]) -> str:
    return json.dumps([source.model_dump(mode="json"), tokenized.eval_dir, prompts])


def base_metrics(source: ModelSource, tokenized: TokenizedRef, batch_size: int) -> dict[str, float]:
    """The same metrics for the untouched base model on the same eval set."""
    model, tokenizer = base_model(source, tokenized)
    result, prompts, texts = scored(model, tokenizer, tokenized, batch_size, prefix="base_")
    _BASE_ANSWERS.clear()
    _BASE_ANSWERS[_base_key(source, tokenized, prompts)] = texts
    return result


def scored(
    model: nn.Module, tokenizer: Any, tokenized: TokenizedRef, batch_size: int, prefix: str
) -> tuple[dict[str, float], list[str], list[str]]:
    """The metrics, and the held-out prompts and the answers they were scored on."""
    from tasks.measuring import response_metrics
    from tasks.objectives.instruction.chat import split_reference

    _, eval_split = tokenized.splits()
    result = response_metrics(model, eval_split, causal_lm.collator(tokenizer), batch_size, prefix=prefix)
    conversations = held_out(tokenized, tokenizer)
    references = [split_reference(c)[1] for c in conversations]
    texts = answers(model, tokenizer, tokenized, conversations, batch_size)
    scores = answer_scores(texts, references)
    return (
        result | {f"{prefix}{k}": v for k, v in scores.items()},
        prompts_of(tokenizer, tokenized, conversations),
        texts,
    )


def prompts_of(tokenizer: Any, tokenized: TokenizedRef, conversations: list[list[dict[str, str]]]) -> list[str]:
    """The conversations' generation prompts as text, rendered with the run's template."""
    from tasks.objectives.instruction.chat import prompt_for_generation

    template = template_of(tokenizer, tokenized.options)
    return [prompt_for_generation(c, tokenizer, template) for c in conversations]


def held_out(tokenized: TokenizedRef, tokenizer: Any) -> list[list[dict[str, str]]]:
    """The eval conversations whose last response is generated and scored: the first `eval_generations` of those
    training would keep (a conversation whose last response does not fit in data.max_length is dropped, as from
    the loss)."""
    from datasets import load_from_disk

    count = int(tokenized.options.get("eval_generations", 64))
    if not count:
        return []
    kept = []
    for conversation in load_from_disk(tokenized.options["held_out"])["messages"]:
        if _prompt(conversation, tokenizer, tokenized) is not None:
            kept.append(conversation)
            if len(kept) == count:
                break
    return kept


def _prompt(conversation: list[dict[str, str]], tokenizer: Any, tokenized: TokenizedRef) -> list[int] | None:
    """The conversation's generation prompt cut as training cuts its row (None: training drops it)."""
    from tasks.objectives.instruction.chat import encode_prompt, fitting_prompt

    template = template_of(tokenizer, tokenized.options)
    max_length = tokenized.options.get("max_length")
    if max_length is None:  # tokenized before the length was recorded
        return encode_prompt(conversation, tokenizer, template)
    return fitting_prompt(conversation, tokenizer, template, tokenized.options.get("loss_on", "assistant"), max_length)


def answers(
    model: nn.Module,
    tokenizer: Any,
    tokenized: TokenizedRef,
    conversations: list[list[dict[str, str]]],
    batch_size: int,
) -> list[str]:
    """Greedy answers to the conversations' prompts: rendered with the run's template, stopped at its end of turn."""
    from tasks.generation import generate_from_ids
    from tasks.objectives.instruction.chat import response_only, stop_token_ids

    if not conversations:
        return []
    template = template_of(tokenizer, tokenized.options)
    stops = stop_token_ids(tokenizer, template)
    limit = int(tokenized.options.get("max_new_tokens", 128))
    prompts = [_prompt(c, tokenizer, tokenized) for c in conversations]  # held_out's: none is dropped
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [p for p in prompts[start : start + batch_size] if p is not None]
        generated = generate_from_ids(model, tokenizer.pad_token_id, batch, limit, stops)
        texts = tokenizer.batch_decode(generated, skip_special_tokens=False)
        out += [response_only(text, tokenizer, template) for text in texts]
    return out


def base_generations(source: ModelSource, data: DataRef, tokenized: TokenizedRef) -> list[str]:
    """The untouched base model's answers to the held-out prompts (deterministic; cached per base model): those the
    base evaluation scored when it ran in this process."""
    from tasks.measuring import EVAL_BATCH_SIZE
    from tasks.modeling import load_tokenizer

    tokenizer = load_tokenizer(tokenized.model_source(source))
    conversations = held_out(tokenized, tokenizer)
    prompts = prompts_of(tokenizer, tokenized, conversations)
    scored_here = _BASE_ANSWERS.get(_base_key(source, tokenized, prompts))
    if scored_here is not None:
        return list(scored_here)
    model, tokenizer = base_model(source, tokenized)
    return answers(model, tokenizer, tokenized, conversations, EVAL_BATCH_SIZE)


def normalized(text: str) -> str:
    """Whitespace collapsed: exact match ignores line breaks and spacing, nothing else."""
    return " ".join(text.split())


class WordTokens:
    """rouge-score's tokenization (lowercase; runs of letters and digits; no stemming) for every script: its own
    keeps [a-z0-9] only, so a Chinese, Arabic or Greek answer had no tokens and scored 0 even when exact. ASCII text
    gives the same tokens as rouge-score's; a word keeps its combining marks (Arabic, Devanagari); scripts written
    without spaces (Han, kana, Thai) count one token per character, as multilingual ROUGE does."""

    PATTERN = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}]|(?:[\p{L}\p{N}]\p{M}*)+"

    def tokenize(self, text: str) -> list[str]:
        import regex  # unicode properties; a dependency of transformers' tokenizers

        return list(regex.findall(self.PATTERN, text.lower()))


def answer_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 (rouge-score, no stemming, `WordTokens`) and exact match (after `normalized`)."""
    from rouge_score import rouge_scorer

    if not references:
        return {}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=WordTokens())
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    exact = [normalized(p) == normalized(r) for p, r in zip(predictions, references, strict=True)]
    return {"eval_rouge_l": sum(rouge) / len(rouge), "eval_exact_match": sum(exact) / len(exact)}


def report(given: ReportInput) -> tuple[dict[str, Any], dict[str, float]]:
    """The metrics tuned vs base, and the greedy answers to the held-out prompts, tuned vs base, next to the
    reference (`reports/predictions.jsonl` has every one). The tuned answers are the ones evaluation scored (kept
    in the reports folder); generated here only when none were kept for these prompts."""
    from tasks.objectives.instruction.chat import split_reference

    conversations = held_out(given.tokenized, given.tokenizer)
    prompts = prompts_of(given.tokenizer, given.tokenized, conversations)
    kept_file = given.folder / ANSWERS_FILE
    kept = json.loads(kept_file.read_text()) if kept_file.exists() else []
    if [k["prompt"] for k in kept] == prompts:
        tuned = [k["tuned"] for k in kept]
    else:
        tuned = answers(given.model, given.tokenizer, given.tokenized, conversations, given.batch_size)
    references = [split_reference(c)[1] for c in conversations]
    rows = [
        {"prompt": p, "reference": ref, "base": b, "tuned": t}
        for p, ref, b, t in zip(prompts, references, given.base_texts, tuned, strict=True)
    ]
    with (given.folder / "predictions.jsonl").open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    kept_file.unlink(missing_ok=True)  # predictions.jsonl has them now
    keys = ("eval_loss", "eval_perplexity", "eval_token_accuracy", "eval_rouge_l", "eval_exact_match")
    sections = {
        "metrics": {key: (given.metrics.get(key), given.metrics.get(f"base_{key}")) for key in keys},
        "generations": rows[:REPORTED],
    }
    return sections, {}


def probe(
    model: nn.Module,
    tokenizer: Any,
    suite: Suite,
    settings: ProbeSettings,
    texts: list[str] | None,
    labels: list[int] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The generation checks with each rule prompt asked as a user turn of the run's template and answered until
    its end of turn (an instruction model answers; it does not continue text); pairs are scored as sentences, as
    for any causal LM (CrowS-Pairs' own scoring)."""
    from tasks.generation import PromptStyle
    from tasks.objectives.instruction.chat import encode_prompt, stop_token_ids

    template = template_of(tokenizer, dict(options))
    style = PromptStyle(
        encode=lambda text: encode_prompt([{"role": "user", "content": text}], tokenizer, template),
        stop_ids=tuple(stop_token_ids(tokenizer, template)),
        end_of_turn=template.end_of_turn,
    )
    return causal_lm.generation_checks(model, tokenizer, suite, settings, style)


OBJECTIVE = Objective(
    name="instruction",
    summary="Instruction / chat tuning: loss on responses only; response loss, ROUGE-L and exact match vs the base",
    encoder=encoder,
    collator=causal_lm.collator,
    head=CAUSAL_LM,
    section="instruction",
    settings=InstructionSettings,
    row_layout=InstructionDataSettings,
    metric_hint=metric_hint,
    metrics=metrics,
    eval_loss=causal_lm.eval_loss,
    base_metrics=base_metrics,
    report=report,
    probe=probe,
    prepare_rows=prepare_rows,
    min_tokens=2,
    base_generations=base_generations,
    probes_base=True,
    options=options,
    row_column="messages",
    data_key=row_layout_key,
    metric_names=metric_names,
    files=files,
    check=check,
)
