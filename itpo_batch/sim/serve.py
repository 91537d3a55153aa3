"""A small OpenAI-compatible chat server for a local HF chat model (stdlib ``http.server``).

``serve_chat_model("tiny")`` (or ``"smollm2"``, or a model directory) starts a server in a background
thread and returns a :class:`ChatServer` whose ``url`` ends in ``/v1``: point
:class:`~itpo_batch.sim.users.OpenAIUser` (or any OpenAI client) at it. ``python -m itpo_batch.sim.serve MODEL
--port 8000`` serves in the foreground. It exists so that the LLM-user path can be tested end to end
without a network and so that users without vLLM can still play the user with a local model.

Design decisions:

- **Endpoints.** ``POST /v1/chat/completions`` (``messages``, ``max_tokens`` or
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``; ``n`` must be 1, no streaming) and
  ``GET /v1/models``. Errors use OpenAI's ``{"error": {"message", "type"}}`` body with status 400/404/413.
- **One request at a time on the model.** Handler threads parse requests concurrently, but generation
  is serialised by a lock: one model, no continuous batching. This is a test and demo server, not vLLM.
- **Bounded.** Request bodies over ``max_body_bytes`` get 413, ``max_tokens`` is capped, the number of
  messages is capped, sockets time out, and a prompt that leaves no room in the model's context gets 400.
- **Deterministic.** A request with ``seed`` gets the same completion every time (see
  :mod:`itpo_batch.model.generation`); without one, requests are numbered and seeded by their number.
- **Loopback by default.** It binds ``127.0.0.1`` unless told otherwise and has no authentication.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from itpo_batch.core.errors import ItpoError
from itpo_batch.model.generation import SamplingConfig, generate, load_chat_model, render_prompts


@dataclass
class ServeConfig:
    """Limits of the server."""

    max_body_bytes: int = 1 << 20
    "Largest request body accepted (413 above)."
    max_tokens_cap: int = 512
    "Upper bound on max_tokens of one request."
    default_max_tokens: int = 128
    "max_tokens when the request gives none."
    max_messages: int = 256
    "Most messages in one request."
    socket_timeout: float = 60.0
    "Seconds a client may take to send its request."


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ChatServer:
    """A running server: ``url`` (``http://host:port/v1``), ``shutdown()``, usable as a context manager."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread | None, model_name: str):
        self.httpd, self.thread, self.model_name = httpd, thread, model_name
        self.host, self.port = httpd.server_address[0], int(httpd.server_address[1])
        self.url = f"http://{self.host}:{self.port}/v1"

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _Engine:
    """The model behind the server: validates a request body and generates one completion."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, name: str, cfg: ServeConfig
    ):
        self.model, self.tokenizer, self.name, self.cfg = model, tokenizer, name, cfg
        self.lock = threading.Lock()
        self.counter = itertools.count()

    def _messages(self, body: dict[str, Any]) -> list[dict[str, str]]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or len(msgs) > self.cfg.max_messages:
            raise BadRequest(f"'messages' must be a list of 1..{self.cfg.max_messages} messages")
        out = []
        for m in msgs:
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise BadRequest("each message needs string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    def _sampling(self, body: dict[str, Any]) -> SamplingConfig:
        if body.get("stream") or body.get("n", 1) != 1:
            raise BadRequest("streaming and n > 1 are not supported")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or self.cfg.default_max_tokens
        try:
            temperature, top_p = float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))
            max_tokens = int(max_tokens)
        except (TypeError, ValueError):
            raise BadRequest("temperature, top_p and max_tokens must be numbers") from None
        if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
            raise BadRequest("need temperature >= 0, 0 < top_p <= 1 and max_tokens >= 1")
        return SamplingConfig(temperature, top_p, min(max_tokens, self.cfg.max_tokens_cap))

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        messages, sampling = self._messages(body), self._sampling(body)
        seed = body.get("seed")
        seed = int(seed) if isinstance(seed, int) else 1_000_003 + next(self.counter)
        with self.lock:
            try:
                gen = generate(self.model, self.tokenizer, [messages], sampling, seed)[0]
            except ItpoError as exc:
                raise BadRequest(str(exc)) from None
            except Exception as exc:  # a template that rejects the roles, for example
                raise BadRequest(f"cannot render or generate: {exc}") from None
        n_prompt = len(render_prompts(self.tokenizer, [messages])[0])
        return {
            "id": f"chatcmpl-{seed}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": gen.text},
                    "finish_reason": "stop" if gen.stopped else "length",
                }
            ],
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": len(gen.token_ids),
                "total_tokens": n_prompt + len(gen.token_ids),
            },
        }


def _handler(engine: _Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = engine.cfg.socket_timeout
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep test and CLI output clean
            pass

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": engine.name, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > engine.cfg.max_body_bytes:
                self.close_connection = True
                return self._error(413, f"Content-Length must be 0..{engine.cfg.max_body_bytes} bytes")
            body = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            try:
                request = json.loads(body)
                if not isinstance(request, dict):
                    raise BadRequest("the body must be a JSON object")
                self._send(200, engine.complete(request))
            except json.JSONDecodeError:
                self._error(400, "the body is not valid JSON")
            except BadRequest as exc:
                self._error(exc.status, str(exc))

    return Handler


def serve_chat_model(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 0,
    config: ServeConfig | None = None,
    background: bool = True,
) -> ChatServer:
    """Load ``model_dir`` (``tiny``, ``smollm2`` or a directory) and serve it; ``port=0`` picks a free port.

    With ``background=True`` the server runs in a daemon thread and this returns at once; call
    ``shutdown()`` (or use ``with``). With ``background=False`` it serves until interrupted.
    """
    model, tokenizer = load_chat_model(model_dir)
    engine = _Engine(model, tokenizer, str(model_dir), config or ServeConfig())
    httpd = ThreadingHTTPServer((host, port), _handler(engine))
    httpd.daemon_threads = True
    if not background:
        server = ChatServer(httpd, None, engine.name)
        try:
            httpd.serve_forever()
        finally:
            httpd.server_close()
        return server
    thread = threading.Thread(target=httpd.serve_forever, name="itpo-chat-server", daemon=True)
    thread.start()
    return ChatServer(httpd, thread, engine.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local chat model on an OpenAI-compatible API.")
    parser.add_argument("model", help="tiny, smollm2 or a local HF model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        serve_chat_model(args.model, args.host, args.port, background=False)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
