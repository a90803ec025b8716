"""Chat templates and tokenization with loss masks.

Every template is a Jinja string rendered by the tokenizer's own `apply_chat_template`, at training
and at inference alike, and saved with the run: so what the model was trained on is exactly what it
is prompted with later (Llama 3 correctness item 4). Loss masks come from character spans of the
assistant turns mapped onto token offsets, which works for any prefix-stable template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from llamaforge.data.types import Conversation, Message
from llamaforge.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Meta's Llama 3 Instruct format: one <|begin_of_text|>, headers, each turn ends with <|eot_id|>.
LLAMA3_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# `@BOS@` is replaced by `{{ bos_token }}` only for tokenizers that normally start text with BOS.
ALPACA_JINJA = (
    "@BOS@{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
RAW_JINJA = (
    "@BOS@{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
BUILTIN = {"llama3": LLAMA3_JINJA, "chatml": CHATML_JINJA, "alpaca": ALPACA_JINJA, "raw": RAW_JINJA}

# Tokens that end a turn in the families we know; a template's stop set is the ones it uses.
END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "</s>", "<|end|>")
LLAMA3_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


class ChatTemplate:
    def __init__(self, name: str, jinja: str, tokenizer):
        self.name, self.jinja, self.tokenizer = name, jinja, tokenizer
        self.stop_token_ids = self._stop_ids()

    # ------------------------------------------------------------------ rendering
    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        # transformers' own Jinja renderer (the one apply_chat_template uses), called directly because
        # apply_chat_template refuses an empty conversation, which the loss-mask spans need.
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[{"role": m.role, "content": m.content} for m in messages]],
            chat_template=self.jinja,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )
        return rendered[0]

    def _ids(self, text: str) -> list[int]:
        # The rendered text already holds BOS where the template wants it: adding special tokens
        # again is the classic double-<|begin_of_text|> bug (Llama 3 item 3).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        return self._ids(self.render(messages, add_generation_prompt=True))

    def encode(
        self, conv: Conversation, *, max_length: int | None = None, train_on_prompt: bool = False
    ) -> Encoded:
        """Token ids and labels; prompt tokens masked unless train_on_prompt. Raises DataError."""
        messages = conv.messages
        text = self.render(messages)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            upto = self.render(messages[: i + 1])
            if not text.startswith(upto):
                raise ConfigError(
                    f"template '{self.name}' is not prefix-stable; loss masks cannot be computed"
                )
            spans.append((start, len(upto)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        labels = [IGNORE_INDEX] * len(ids)
        span_idx = 0
        for k, (begin, end) in enumerate(enc["offset_mapping"]):
            if train_on_prompt:
                labels[k] = ids[k]
                continue
            while span_idx < len(spans) and begin >= spans[span_idx][1]:
                span_idx += 1
            if span_idx < len(spans) and spans[span_idx][0] <= begin < spans[span_idx][1] and end > begin:
                labels[k] = ids[k]
        out = Encoded(ids, labels)
        if max_length is not None and len(ids) > max_length:
            raise DataError(
                f"{len(ids)} tokens is over data.max_length={max_length}",
                path=conv.source,
                line=conv.line,
                field="messages",
            )
        if out.num_targets == 0:
            raise DataError(
                "no assistant tokens to train on", path=conv.source, line=conv.line, field="messages"
            )
        return out

    # ------------------------------------------------------------------ stops and persistence
    def _stop_ids(self) -> list[int]:
        tok = self.tokenizer
        vocab = tok.get_vocab()
        names = {t for t in END_TOKENS if t in vocab and (t in self.jinja or t == tok.eos_token)}
        if "<|eot_id|>" in vocab:  # the Llama 3 family: end of turn, end of text, end of message
            names.update(t for t in LLAMA3_STOPS if t in vocab)
        if "eos_token" in self.jinja and tok.eos_token:
            names.add(tok.eos_token)
        ids = sorted(vocab[t] for t in names)
        if not ids and tok.eos_token_id is not None:
            ids = [tok.eos_token_id]
        return ids

    def to_dict(self) -> dict:
        stops = self.tokenizer.convert_ids_to_tokens(self.stop_token_ids)
        return {"name": self.name, "jinja": self.jinja, "stop_tokens": stops}

    def save(self, directory: Path) -> None:
        """Beside the adapter: our own record, and the tokenizer's template so plain transformers agrees."""
        (Path(directory) / "llamaforge_template.json").write_text(json.dumps(self.to_dict(), indent=2))


def _bos_for(tokenizer) -> str:
    ids = tokenizer("a")["input_ids"]
    starts_with_bos = tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id
    return "{{ bos_token }}" if starts_with_bos else ""


def get_template(name: str, tokenizer) -> ChatTemplate:
    """`auto`: the model's own template when it has one, else alpaca (with a warning: a base model)."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            name = "model"
        else:
            log.warning("the tokenizer has no chat template (a base model?): using the alpaca template")
            name = "alpaca"
    if name == "model":
        jinja = getattr(tokenizer, "chat_template", None)
        if not jinja:
            raise ConfigError(
                "data.template=model but the tokenizer has no chat template; pick llama3/chatml/alpaca/raw"
            )
        if isinstance(jinja, dict):
            jinja = jinja.get("default") or next(iter(jinja.values()))
        return ChatTemplate("model", jinja, tokenizer)
    if name not in BUILTIN:
        raise ConfigError(f"unknown template '{name}'; choose auto, model, {', '.join(BUILTIN)}")
    jinja = BUILTIN[name].replace("@BOS@", _bos_for(tokenizer))
    if name in ("llama3", "chatml"):
        marker = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
        if marker not in tokenizer.get_vocab():
            raise ConfigError(
                f"template '{name}' needs the token {marker}, which this tokenizer does not have"
            )
    return ChatTemplate(name, jinja, tokenizer)


def load_template(directory: Path, tokenizer) -> ChatTemplate:
    """The template saved with a run or adapter (the same one training used)."""
    path = Path(directory) / "llamaforge_template.json"
    if not path.is_file():
        return get_template("auto", tokenizer)
    data = json.loads(path.read_text())
    return ChatTemplate(data["name"], data["jinja"], tokenizer)
