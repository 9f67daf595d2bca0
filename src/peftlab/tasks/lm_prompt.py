"""What the causal-LM tasks share (lm_multiple_choice, lm_generation, lm_text): the model, and prompts.

`CausalLmTask` is their base: a causal LM scored and trained through its pretrained LM head (no task
head), left-padded batches with logits only where answers are (`LeftPadCollator`).

A prompt is a template with named placeholders ({question}, {context}, {options}, ...). When the
tokenizer has a chat template (and the task does not turn it off) the template is wrapped as one user
message, with an optional system message, and the assistant's turn is opened: the answer follows
directly. Without one, the answer follows after a space (unless the prompt ends in whitespace).

The chat wrapping is rendered once with the placeholders in place and the values substituted
afterwards, so the (slow) Jinja template runs once per task, not once per example. Values are
substituted in one pass: a value that itself contains "{question}" is not expanded again.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from peftlab.errors import InputError
from peftlab.models import ModelSource, instantiate
from peftlab.tasks.base import Task

if TYPE_CHECKING:
    from torch import nn

ChatSetting = bool | Literal["auto"]
# Llama 3.x chat templates print today's date into every prompt unless given one (their own default
# is this date): a fixed date keeps prompts, and so scores, the same from one day to the next
TEMPLATE_DATE = "26 Jul 2024"


def placeholders(template: str) -> set[str]:
    """The {name} placeholders a template uses (doubled braces are not placeholders)."""
    return set(re.findall(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})", template))


def check_template(template: str, required: tuple[str, ...], known: tuple[str, ...], key: str = "prompt") -> None:
    """ValueError (pydantic shows it with the key) when a required placeholder is missing or one is unknown."""
    found = placeholders(template)
    missing = [name for name in required if name not in found]
    if missing:
        raise ValueError(
            f"the {key} has no {{{missing[0]}}} placeholder: it would show the model no "
            f"{missing[0].replace('_', ' ')}; placeholders: {', '.join('{' + k + '}' for k in known)}"
        )
    unknown = sorted(found - set(known))
    if unknown:
        raise ValueError(
            f"the {key} has an unknown placeholder {{{unknown[0]}}}; known: {', '.join('{' + k + '}' for k in known)}"
        )


class PromptFormat:
    """One task's prompt for one tokenizer: text rendering, tokenization, room for the answer."""

    def __init__(
        self, template: str, tokenizer: Any, *, chat: ChatSetting = "auto", system_prompt: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.names = placeholders(template)
        self.chat = use_chat(tokenizer, chat)
        if self.chat:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages.append({"role": "user", "content": template})
            self.template = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, date_string=TEMPLATE_DATE
            )
            self.separator = ""
        else:
            self.template = template
            self.separator = "" if template[-1:].isspace() else " "
        names = "|".join(map(re.escape, sorted(self.names)))
        self._pattern = re.compile(r"\{(" + names + r")\}") if names else None
        self._end_ids = {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}

    def render(self, values: dict[str, str]) -> str:
        if self._pattern is None:
            return self.template
        return self._pattern.sub(lambda m: str(values.get(m.group(1), "")), self.template)

    def encode(self, values: dict[str, str]) -> list[int]:
        """The prompt's token ids: a leading BOS kept, trailing end markers ([SEP], EOS) dropped."""
        if self.chat:  # the chat template already holds the special tokens as text
            return self.tokenizer(self.render(values), add_special_tokens=False)["input_ids"]
        ids = self.tokenizer(self.render(values))["input_ids"]
        while ids and ids[-1] in self._end_ids:
            ids = ids[:-1]
        return ids

    def answer_ids(self, text: str, *, eos: bool = False) -> list[int]:
        """The tokens of an answer as it follows the prompt (after the separator); + EOS when asked."""
        ids = self.tokenizer(self.separator + text.strip(), add_special_tokens=False)["input_ids"]
        if eos and self.tokenizer.eos_token_id is not None:
            ids = [*ids, self.tokenizer.eos_token_id]
        return ids

    def fit(
        self,
        values: dict[str, str],
        shorten: str,
        budget: int,
        what: str = "data.max_length",
        keep: Literal["start", "end"] = "start",
    ) -> list[int]:
        """The prompt's tokens in at most `budget` tokens, shortening `values[shorten]` (a question, a
        context) and never the template or the other fields. keep="start" cuts the field's end;
        keep="end" cuts its beginning (an exam vignette asks its question in the last sentence)."""
        ids = shorten_to_fit(
            lambda text: self.encode({**values, shorten: text}), self.tokenizer, values.get(shorten, ""), budget, keep
        )
        if len(ids) > budget:
            raise InputError(
                f"{what}: {budget} tokens for the prompt leave no room for the {shorten}: without it the prompt "
                f"takes {len(self.encode({**values, shorten: ''}))} tokens; raise data.max_length"
            )
        return ids


def shorten_to_fit(
    encode: Callable[[str], list[int]], tokenizer: Any, text: str, budget: int, keep: Literal["start", "end"] = "start"
) -> list[int]:
    """`encode(text)` in at most `budget` tokens, shortening `text` (its end, or its start with keep="end").

    Tokenization is not additive, so: cut the excess, re-encode, check again (a few rounds). Returns
    the last encoding, still over budget when even an empty text does not fit: the caller says why."""
    ids = encode(text)
    for _ in range(8):
        excess = len(ids) - budget
        if excess <= 0:
            return ids
        words = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not words:
            break
        kept = words[: max(0, len(words) - excess)] if keep == "start" else words[min(len(words), excess) :]
        text = tokenizer.decode(kept, skip_special_tokens=True)
        ids = encode(text)
    return ids


def use_chat(tokenizer: Any, setting: ChatSetting) -> bool:
    """Whether to wrap prompts in the tokenizer's chat template (auto: when it has one)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if setting is True and not has:
        raise InputError("task.chat_template: true, but the model's tokenizer has no chat template")
    return has if setting == "auto" else bool(setting)


class CausalLmTask(Task):
    """Base of the tasks that train and score a causal LM through its pretrained LM head."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._keeps_logits = True  # whether the model takes `logits_to_keep` (set when it is built)

    def build_model(
        self, source: ModelSource, tokenizer: Any, *, weights: bool = True, **load_kwargs: Any
    ) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = instantiate(AutoModelForCausalLM, source, tokenizer=tokenizer, weights=weights, **load_kwargs)
        self._keeps_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters
        return model

    def head_modules(self, model: nn.Module) -> list[str]:
        """The LM head is pretrained (and usually tied to the input embeddings): not a task head."""
        return []

    def needs_data_to_build(self) -> bool:
        return False  # the vocabulary is the output: no label count to fit

    def collator(self, tokenizer: Any) -> Callable:
        from peftlab.tasks.causal_classification import LeftPadCollator

        return LeftPadCollator(tokenizer.pad_token_id, lm=True, keep=lambda: self._keeps_logits)
