"""Talking to judges: an OpenAI-compatible chat-completions client (standard library only), a local
Hugging Face chat model with the same interface, and an on-disk answer cache.

Client behaviour: each request has a timeout; HTTP 429 and 5xx, refused or dropped connections and
timeouts are retried with exponential backoff (``backoff * 2**attempt`` seconds, or the server's
``Retry-After`` in seconds when that is longer and under a minute); other HTTP errors (401, 404, ...) fail at once.
Either way the failure is a :class:`JudgeUnavailable` naming the judge, since a judge that cannot
be reached fails every trace alike.

Cache layout: ``DIR/<sha256(url + "\\n" + model)[:16]>/<sha256(request body)>.json``, one file per
answered prompt holding ``{"url", "model", "content"}``, written atomically. The request body
(model, messages, temperature) is hashed as canonical JSON, so changing the prompt template, the
trace or the judge gives a new key, and an interrupted run asks again only what it had not asked.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..io import atomic_write_json
from .base import LabelerError

Messages = list[dict[str, str]]
RETRY_STATUS = (429, 500, 502, 503, 504)
REASK_TEMPERATURE = 0.7
"""Temperature of a re-ask after a malformed reply: a greedy re-ask would repeat the same reply."""
MAX_RETRY_AFTER = 60.0


class JudgeUnavailable(LabelerError):
    """A judge that cannot be reached or refuses the requests."""


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class AnswerCache:
    """Judge answers on disk, keyed by (judge URL and model, hash of the request body)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, url: str, model: str, body: dict) -> Path:
        judge = hashlib.sha256(f"{url}\n{model}".encode("utf-8")).hexdigest()[:16]
        return self.root / judge / f"{hashlib.sha256(_canonical(body)).hexdigest()}.json"

    def get(self, url: str, model: str, body: dict) -> str | None:
        path = self.path(url, model, body)
        try:
            return json.loads(path.read_text(encoding="utf-8"))["content"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or unreadable: ask again

    def put(self, url: str, model: str, body: dict, content: str) -> None:
        atomic_write_json(self.path(url, model, body), {"url": url, "model": model, "content": content})


def chat_url(url: str) -> str:
    """The chat-completions endpoint of ``url``: kept when it ends in ``/chat/completions``, else
    ``/chat/completions`` is appended (``http://host:8000/v1`` -> ``.../v1/chat/completions``)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


class ChatJudge:
    """One judge behind an OpenAI-compatible ``POST /chat/completions`` endpoint (greedy, temperature 0).

    Attributes:
        requests: HTTP requests sent so far (retries included; cache hits excluded).
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, cache: AnswerCache | None = None):
        self.url, self.model, self.endpoint = url, model, chat_url(url)
        self.api_key, self.timeout, self.retries, self.backoff = api_key, timeout, retries, backoff
        self.cache = cache
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"{self.url}={self.model}"

    def body(self, messages: Messages, attempt: int = 0) -> dict:
        return {"model": self.model, "messages": messages, "temperature": REASK_TEMPERATURE if attempt else 0}

    def ask(self, messages: Messages, attempt: int = 0) -> str:
        """The judge's reply to ``messages``: greedy, from the cache when it has it; a re-ask
        (``attempt`` > 0, after a malformed reply) bypasses the cache and samples.

        Raises:
            JudgeUnavailable: the endpoint could not be reached or refused, after the retries.
        """
        body = self.body(messages, attempt)
        if attempt == 0 and self.cache is not None:
            cached = self.cache.get(self.url, self.model, body)
            if cached is not None:
                return cached
        return self._post(body)

    def remember(self, messages: Messages, content: str) -> None:
        """Store a reply that parsed as a verdict (malformed replies are never cached)."""
        if self.cache is not None:
            self.cache.put(self.url, self.model, self.body(messages), content)

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = _canonical(body)
        last, retry_after = "", None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, retry_after))
            with self._lock:
                self.requests += 1
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return self._content(payload)
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code not in RETRY_STATUS:
                    raise JudgeUnavailable(f"judge {self.label}: HTTP {err.code} from {self.endpoint}: {detail}") from None
                last = f"HTTP {err.code}: {detail}"
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as err:
                reason = getattr(err, "reason", err)
                last, retry_after = f"connection failed ({reason})", None
            except ValueError as err:
                raise JudgeUnavailable(f"judge {self.label}: the reply of {self.endpoint} is not chat-completions JSON ({err})") from None
        raise JudgeUnavailable(f"judge {self.label}: no answer from {self.endpoint} after {self.retries + 1} attempt(s); last: {last}")

    def _delay(self, attempt: int, hint: str | None) -> float:
        """Seconds to wait before retry ``attempt`` (1-based): the backoff, or a longer ``Retry-After``."""
        delay = self.backoff * 2 ** (attempt - 1)
        try:
            seconds = float(hint) if hint else -1.0  # only the delay-seconds form is honoured
        except ValueError:
            seconds = -1.0
        return max(delay, seconds) if 0 <= seconds <= MAX_RETRY_AFTER else delay

    def _content(self, payload: dict) -> str:
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("no choices[0].message.content") from None
        if not isinstance(content, str):
            raise ValueError("choices[0].message.content is not a string")
        return content


class LocalJudge:
    """A local Hugging Face chat model (folder or GGUF file) as a judge: the same messages through the
    tokenizer's chat template when it has one (else system and user text joined by blank lines), greedy
    decoding; a re-ask samples at ``REASK_TEMPERATURE``, seeded by the attempt. Calls are serialised
    (one model, one forward at a time)."""

    def __init__(self, path: str | Path, max_new_tokens: int = 512, device: str = "cpu",
                 cache: AnswerCache | None = None):
        from ..loading import load_model, load_tokenizer

        self.url, self.model_name = f"local:{Path(path).resolve()}", Path(path).name
        self.model, self.tokenizer = load_model(path, device=device), load_tokenizer(path)
        self.max_new_tokens, self.cache = max_new_tokens, cache
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.url

    def body(self, messages: Messages) -> dict:
        return {"model": self.model_name, "messages": messages, "max_new_tokens": self.max_new_tokens}

    def ask(self, messages: Messages, attempt: int = 0) -> str:
        import torch

        from ..loading import pad_token_id

        body = self.body(messages)
        if attempt == 0 and self.cache is not None:
            cached = self.cache.get(self.url, self.model_name, body)
            if cached is not None:
                return cached
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        sampling = {"do_sample": True, "temperature": REASK_TEMPERATURE, "top_k": 0} if attempt else {"do_sample": False}
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(attempt)
            self.requests += 1
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens, pad_token_id=pad_token_id(self.tokenizer),
                                      **sampling)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def remember(self, messages: Messages, content: str) -> None:
        if self.cache is not None:
            self.cache.put(self.url, self.model_name, self.body(messages), content)
