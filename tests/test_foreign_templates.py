"""Models whose chat template has no ``{% generation %}`` markers: real Qwen2.5- and Llama-3.2-Instruct templates.

Each family is a tiny random-weight model built from a config (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``,
hidden 32, one layer) and saved with ``save_pretrained``; its tokenizer is the embedded tiny model's BPE with
the family's control tokens added and the model's real chat template (copied verbatim, Jinja text of
Qwen/Qwen2.5-Instruct and meta-llama/Llama-3.2-Instruct). Both templates add text of their own (Qwen's
default system prompt, Llama's knowledge-cutoff/date header) and Llama trims message contents, so they
exercise the prefix-diff masks the way real checkpoints do. They go through render (masks checked against a
plain reference), ``validate --model``, ``score`` and one ``iterate`` round.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from itpo_batch.cli.main import app
from itpo_batch.model.loading import load_model, load_tokenizer
from itpo_batch.model.render import render

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "chat_logs.jsonl"

# Qwen/Qwen2.5-*-Instruct tokenizer_config.json "chat_template", verbatim.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.2-*-Instruct tokenizer_config.json "chat_template", verbatim.
LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

FAMILIES: dict[str, dict] = {
    "qwen2.5": {
        "template": QWEN25_TEMPLATE,
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "eos": "<|im_end|>",  # Qwen2.5-Instruct: eos <|im_end|>, pad <|endoftext|>
        "pad": "<|endoftext|>",
        "trim": False,
        "header": "You are Qwen, created by Alibaba Cloud.",
    },
    "llama3": {
        "template": LLAMA32_TEMPLATE,
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "eos": "<|eot_id|>",  # Llama-3-Instruct: bos <|begin_of_text|>, eos <|eot_id|>, no pad token
        "bos": "<|begin_of_text|>",
        "pad": None,
        "trim": True,
        "header": "Cutting Knowledge Date: December 2023",
    },
}  # fmt: skip
CONTEXT = 1024


def _tokenizer(tiny_dir: Path, family: str):
    spec = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    tok.add_special_tokens({"extra_special_tokens": spec["specials"]})
    tok.eos_token = spec["eos"]
    if "bos" in spec:
        tok.bos_token = spec["bos"]
    tok.pad_token = spec["pad"]
    tok.chat_template = spec["template"]
    tok.model_max_length = int(1e30)  # states no context, as many checkpoints: the config's must be used
    return tok


def _model(family: str, tok) -> torch.nn.Module:
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    sizes = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": CONTEXT,
             "tie_word_embeddings": True}  # fmt: skip
    torch.manual_seed(0)
    if family == "qwen2.5":
        return Qwen2ForCausalLM(Qwen2Config(**sizes, **ids))
    return LlamaForCausalLM(LlamaConfig(**sizes, **ids))


@pytest.fixture(scope="module")
def family_dirs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved model directory per family (config.json, model.safetensors, tokenizer, chat template)."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family.replace(".", ""))
        tok = _tokenizer(tiny_dir, family)
        model = _model(family, tok)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[family] = d
    return out


CONVERSATIONS = [
    [  # no system message: the template adds its own header; ends on the assistant
        {"role": "user", "content": "I have a headache and feel hot."},
        {"role": "assistant", "content": "Do you have a fever?"},
        {"role": "user", "content": "Yes, 38.5."},
        {"role": "assistant", "content": "It is most likely the flu. Rest and drink fluids."},
    ],
    [  # system message, padded contents (Llama trims them), ends on a user message
        {"role": "system", "content": "  You are a careful doctor.\n"},
        {"role": "user", "content": "My knee hurts."},
        {"role": "assistant", "content": "  Since when?\n"},
        {"role": "user", "content": "Two days."},
        {"role": "assistant", "content": "Did you fall?"},
        {"role": "user", "content": "No."},
    ],
    [  # a tool result between two assistant turns, then two assistant messages in a row
        {"role": "user", "content": "What is 12 * 7?"},
        {"role": "assistant", "content": "call: multiply(12, 7)"},
        {"role": "tool", "content": "84"},
        {"role": "assistant", "content": "It is 84."},
        {"role": "assistant", "content": "Anything else?"},
    ],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
]


def reference_turns(tok, messages: list[dict], trim: bool) -> list[list[int]]:
    """Plain reference: what the policy emits for each assistant message is the tokens of its content (as
    the template writes it) followed by the end-of-turn token, tokenised on its own."""
    return [
        tok((m["content"].strip() if trim else m["content"]) + tok.eos_token, add_special_tokens=False)[
            "input_ids"
        ]
        for m in messages
        if m["role"] == "assistant"
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masks_mark_exactly_the_assistant_messages(family_dirs: dict[str, Path], family: str) -> None:
    tok = load_tokenizer(family_dirs[family])
    result = render(CONVERSATIONS, tok)
    assert result.method == "prefix_diff" and result.max_length == CONTEXT  # context from config.json
    assert [c.index for c in result.conversations] == list(range(len(CONVERSATIONS)))
    for conv, messages in zip(result.conversations, CONVERSATIONS, strict=True):
        expected = reference_turns(tok, messages, FAMILIES[family]["trim"])
        assert conv.n_turns == len(expected)
        for k, want in enumerate(expected):
            where = np.flatnonzero(conv.turn_id == k)
            assert where.size and np.array_equal(where, np.arange(where[0], where[-1] + 1)), "one run"
            assert conv.input_ids[where].tolist() == want, (family, k, tok.decode(conv.input_ids[where]))
        assert int(conv.assistant_mask.sum()) == sum(map(len, expected))  # and nothing else is marked
        np.testing.assert_array_equal(conv.assistant_mask, conv.turn_id >= 0)
        if messages[0]["role"] != "system":  # the template's own header is rendered, outside the mask
            first = int(np.flatnonzero(conv.assistant_mask)[0])
            assert FAMILIES[family]["header"] in tok.decode(conv.input_ids[:first])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizer_gets_the_config_context_and_a_pad_token(family_dirs: dict[str, Path], family: str) -> None:
    tok = load_tokenizer(family_dirs[family])
    assert tok.model_max_length == CONTEXT
    assert tok.pad_token == (FAMILIES[family]["pad"] or FAMILIES[family]["eos"])
    model = load_model(family_dirs[family], "reference", device="cpu")
    ids = tok.apply_chat_template(CONVERSATIONS[0], return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_validate_reports_the_config_context(family_dirs: dict[str, Path], family: str) -> None:
    res = CliRunner().invoke(
        app, ["validate", str(EXAMPLE), "--model", str(family_dirs[family]), "-f", "json"]
    )
    assert res.exit_code == 0, res.output
    tokens = json.loads(res.stdout)["summary"]["tokens"]
    assert tokens["max_length"] == CONTEXT and tokens["method"] == "prefix_diff" and tokens["dropped"] == 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_score_scores_every_assistant_turn(family_dirs: dict[str, Path], family: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["score", str(EXAMPLE), "-m", str(family_dirs[family]), "-o", str(run), "--prm-epochs", "1",
            "--q-epochs", "1"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    sql = "SELECT count(*) AS n, count(implicit_reward) AS r, count(q_value) AS q FROM turns"
    res = CliRunner().invoke(app, ["sql", sql, "--run", str(run), "-f", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"n": 17, "r": 17, "q": 17}]  # 17 assistant messages in the example


@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_iterate_round(family_dirs: dict[str, Path], family: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["iterate", "-m", str(family_dirs[family]), "--rounds", "1", "--n", "4", "--methods", "itpo_norm",
            "--workers", "1", "--run-dir", str(run), "--task", "medical", "--set", "group_size=2",
            "--set", "max_new_tokens=8", "--set", "rollout_batch=4", "--set", "eval.n=2",
            "--set", "eval.max_new_tokens=8", "--set", "q.epochs=1"]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in rows if r["round"] == 1]
    assert last["method"] == "itpo_norm" and last["update/tokens"] > 0 and last["logs/n"] == 4
    assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float)), rows
    policy = run / "checkpoints/method=itpo_norm/round=1/policy"
    assert load_tokenizer(policy).chat_template == FAMILIES[family]["template"]  # the template travels along
    n_turns = CliRunner().invoke(
        app, ["sql", "SELECT count(*) AS n FROM turns", "--run", str(run), "-f", "json"]
    )
    assert n_turns.exit_code == 0 and json.loads(n_turns.stdout)[0]["n"] > 0, n_turns.output
