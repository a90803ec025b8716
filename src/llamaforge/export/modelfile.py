"""An Ollama `Modelfile` beside a GGUF export: `ollama create NAME -f Modelfile` then `ollama run NAME`.

Ollama templates are Go templates, not Jinja, so the run's chat template is mapped by name
(llama3, chatml, alpaca, raw; detected from the Jinja text when no name is given) to the Go
template that renders the same prompt. llama.cpp adds BOS itself (the GGUF says so), so the
templates do not write it. Stop strings: the template's own, the GGUF's eos/eot/eom tokens and any
the run adds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llamaforge.export.manifest import ExportError, atomic_file

MODELFILE_NAME = "Modelfile"

_LLAMA3 = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)
_CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
)
_ALPACA = (  # as templates.ALPACA_JINJA: the standard preamble unless a system prompt replaces it
    "{{ if .System }}{{ .System }}{{ else }}Below is an instruction that describes a task. Write a response that "
    "appropriately completes the request.{{ end }}\n\n{{ if .Prompt }}### Instruction:\n{{ .Prompt }}\n\n{{ end }}"
    "### Response:\n{{ .Response }}"
)

# template name -> (Ollama Go template, stop strings it needs)
OLLAMA_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama3": (_LLAMA3, ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|start_header_id|>")),
    "chatml": (_CHATML, ("<|im_end|>", "<|im_start|>")),
    "alpaca": (_ALPACA, ("### Instruction:",)),
    "raw": ("{{ .Prompt }}{{ .Response }}", ()),
}


def detect_template(chat_template: str | None) -> str | None:
    """The template name a Jinja chat template corresponds to, when it is one we know."""
    if not chat_template:
        return None
    if "<|start_header_id|>" in chat_template and "<|eot_id|>" in chat_template:
        return "llama3"
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        return "chatml"
    if "### Instruction:" in chat_template and "### Response:" in chat_template:
        return "alpaca"
    return None


def _quote_block(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f'the {what} contains \'"""\', which a Modelfile cannot hold')
    return f'"""{text}"""'


def render_modelfile(
    gguf_name: str,
    *,
    template: str | None = None,
    chat_template: str | None = None,
    stop: Sequence[str] = (),
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> str:
    """Modelfile text for the GGUF file `gguf_name` lying in the same directory.

    `template`: a llamaforge template name (llama3, chatml, alpaca, raw); None, "auto" or "model"
    (the model's own Jinja template) mean: detect it from `chat_template`.
    """
    if template in (None, "auto", "model"):
        name = detect_template(chat_template)
    elif template in OLLAMA_TEMPLATES:
        name = template
    else:
        raise ExportError(
            f"no Ollama template for chat template {template!r}; known: {', '.join(OLLAMA_TEMPLATES)}"
        )
    lines = ["# Made by llamaforge. Use: ollama create <name> -f Modelfile", f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    if name is not None:
        go_template, template_stops = OLLAMA_TEMPLATES[name]
        lines.append(f"TEMPLATE {_quote_block(go_template, 'template')}")
        stops += template_stops
    else:
        lines.append("# no TEMPLATE: Ollama derives one from the chat template stored in the GGUF")
    for s in stop:
        if s and s not in stops:
            stops.append(s)
    if system:
        lines.append(f"SYSTEM {_quote_block(system, 'system prompt')}")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    for key, value in (parameters or {}).items():
        if key == "stop":
            raise ExportError("pass stop strings with stop=, not parameters")
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def gguf_chat_info(gguf_path: Path) -> tuple[str | None, list[str]]:
    """(chat template, texts of the eos/eot/eom tokens) stored in a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.get_field("tokenizer.chat_template")
    chat_template = field.contents() if field else None
    tokens = reader.get_field("tokenizer.ggml.tokens")
    stops = []
    for kind in ("eos", "eot", "eom"):
        f = reader.get_field(f"tokenizer.ggml.{kind}_token_id")
        if f is not None and tokens is not None:
            text = tokens.contents(int(f.contents()))
            if text not in stops:
                stops.append(text)
    return chat_template, stops


def write_modelfile(
    gguf_path: Path,
    out_path: Path | None = None,
    *,
    template: str | None = None,
    stop: Sequence[str] = (),
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Modelfile beside `gguf_path` (or at `out_path`, which must be in the same folder).

    `template` is the run's template name; when None it is detected from the GGUF's chat
    template. Stops: the template's, the GGUF's eos/eot/eom tokens, then `stop`.
    """
    gguf_path = Path(gguf_path)
    out_path = Path(out_path) if out_path is not None else gguf_path.with_name(MODELFILE_NAME)
    if out_path.resolve().parent != gguf_path.resolve().parent:
        raise ExportError("the Modelfile must lie in the same folder as the GGUF it names (FROM ./file)")
    chat_template, token_stops = gguf_chat_info(gguf_path)
    text = render_modelfile(
        gguf_path.name,
        template=template,
        chat_template=chat_template,
        stop=[*token_stops, *stop],
        system=system,
        parameters=parameters,
    )
    with atomic_file(out_path, overwrite=overwrite, required_bytes=len(text.encode())) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out_path
