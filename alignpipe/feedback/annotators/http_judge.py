"""Pairwise judge behind an OpenAI-compatible endpoint: POST {base}/chat/completions (stdlib only).

- The key is read from the environment variable named by `key_env` and sent as a Bearer token; only the
  variable's name is ever recorded (manifest, errors, logs). Its value is registered as a secret, and every
  text the endpoint sends back (reply, status reason) is scrubbed of it before it is cached, recorded in an
  abstention's reason or put in an error: an endpoint that echoes the request cannot leak it.
- At most `concurrency` requests in flight; each has a `timeout`; 429, 5xx, timeouts and connection errors
  are retried up to `retries` times with exponential backoff (`backoff` * 2^attempt, plus up to as much
  jitter), honouring a Retry-After header. 401/403/404/400 stop the run with one line (every request would
  fail the same way).
- A response cache keyed by sha256(URL + request body), appended as JSONL under the cache folder, so a
  resumed or repeated run never pays twice for the same question.
- Strict verdict parser: the reply must be exactly one of the two labels (surrounding whitespace allowed) or
  a JSON object {"winner": LABEL}. Anything else, and exhausted retries, is an abstention with its reason.
- With `swap=true` both orders are asked; P = 1/2 [P_12 + (1 - P_21)] over the orders that answered
  (a verdict is P = 1 or 0), so one abstaining order leaves the other's verdict.
"""
from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alignpipe.core.errors import UserError
from alignpipe.core.secrets import redact, register_secret
from alignpipe.feedback.annotators import (
    Query,
    Verdict,
    fill,
    load_template,
    parse_labels,
    prompt_text,
    swap_average,
)

RETRYABLE = {429, 500, 502, 503, 504, 520, 522, 524}
FATAL = {400, 401, 403, 404}


class Abstain(Exception):
    """A question that gets no verdict: its reason is recorded in the row."""


class ResponseCache:
    """sha256 key -> reply text, in `cache.jsonl`; lines are appended under an exclusive file lock."""

    def __init__(self, folder: Path):
        self.path = Path(folder).expanduser() / "cache.jsonl"
        self.lock = threading.Lock()
        self.data: dict[str, str] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--cache-dir {self.path.parent}: cannot create ({e.strerror})")
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    item = json.loads(line)
                    self.data[item["key"]] = item["reply"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a killed writer

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, reply: str) -> None:
        line = json.dumps({"key": key, "reply": reply}) + "\n"
        with self.lock, open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
        self.data[key] = reply


def parse_verdict(reply: str, labels: tuple[str, str]) -> int:
    """0 when the reply names the first label, 1 the second; Abstain otherwise (strict)."""
    text = reply.strip()
    if text in labels:
        return labels.index(text)
    if text.startswith("{"):
        try:
            winner = str(json.loads(text).get("winner", "")).strip()
        except (ValueError, AttributeError):
            winner = ""
        if winner in labels:
            return labels.index(winner)
    raise Abstain(f"unparseable verdict {reply[:40]!r}")


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


class HttpJudge:
    pairwise = True

    def __init__(self, spec, runtime):
        o = spec.options
        self.name, self.model, self.swap = spec.identity(), o["model"], o["swap"]
        self.url = spec.arg.rstrip("/") + "/chat/completions"
        if not re.match(r"^https?://", self.url):
            raise UserError(f"--annotator '{spec.text}': base URL must start with http:// or https://")
        self.key_env, self.timeout = o["key_env"], o["timeout"]
        self.retries, self.backoff = o["retries"], o["backoff"]
        self.concurrency, self.max_tokens = max(1, o["concurrency"]), o["max_tokens"]
        if self.key_env and not os.environ.get(self.key_env):
            raise UserError(f"--annotator '{spec.text}': environment variable {self.key_env} (key_env) is "
                            f"not set; set it, or key_env= for an endpoint without a key")
        register_secret(os.environ.get(self.key_env) if self.key_env else None)
        self.labels = parse_labels(o["labels"], f"--annotator '{spec.text}'")
        self.template, self.template_file = load_template(o["template"], "pairwise")
        cache_dir = runtime.cache_dir or Path.home() / ".cache" / "alignpipe" / "http"
        self.cache = ResponseCache(cache_dir)
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}
        self.stats_lock = threading.Lock()
        self.inputs = [self.template_file]

    def describe(self) -> dict:
        return {"name": self.name, "kind": "pairwise", "url": self.url, "model": self.model,
                "key_env": self.key_env, "template_file": str(self.template_file), "template": self.template,
                "answers": list(self.labels), "swap": self.swap, "cache": str(self.cache.path),
                "this_run": dict(self.stats)}

    def _count(self, key: str) -> None:
        with self.stats_lock:
            self.stats[key] += 1

    # -- one question ---------------------------------------------------------------------------------
    def body(self, text: str) -> bytes:
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": text}],
                           "temperature": 0, "max_tokens": self.max_tokens}, sort_keys=True).encode()

    def ask(self, text: str) -> tuple[int | None, str | None]:
        """(0 or 1 for the winning position, None) or (None, reason of the abstention)."""
        body = self.body(text)
        key = hashlib.sha256(self.url.encode() + b"\n" + body).hexdigest()
        try:
            reply = self.cache.get(key)
            if reply is None:
                reply = self._post(body)
                self.cache.put(key, reply)
            else:
                self._count("cache_hits")
            return parse_verdict(reply, self.labels), None
        except Abstain as e:
            return None, str(e)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.key_env, '')}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            wait = None
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                return _content(raw)
            except urllib.error.HTTPError as e:
                reason = redact(str(e.reason))
                if e.code in FATAL:
                    key = f" and the key in ${self.key_env}" if self.key_env else ""
                    raise UserError(f"{self.url}: HTTP {e.code} {reason} (check the URL, model "
                                    f"'{self.model}'{key})") from None  # (the HTTPError may quote the key)
                if e.code not in RETRYABLE:
                    raise Abstain(f"HTTP {e.code} {reason}")
                last, wait = f"HTTP {e.code}", _retry_after(e.headers)
            except (TimeoutError, OSError, http.client.HTTPException) as e:  # timeout, refused, cut off
                reason = getattr(e, "reason", e)
                last = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) \
                    else f"connection error ({redact(str(reason))})"
            if attempt < self.retries:
                delay = self.backoff * 2 ** attempt
                time.sleep(min(120.0, wait if wait is not None else delay + random.uniform(0, delay)))
        raise Abstain(f"{last} after {self.retries + 1} attempts")

    # -- many pairs -----------------------------------------------------------------------------------
    def compare(self, queries: list[Query]) -> list[Verdict]:
        texts = [self._render(q, q.response, q.response2) for q in queries]
        if self.swap:
            texts += [self._render(q, q.response2, q.response) for q in queries]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(self.ask, texts))
        n = len(queries)
        return [self._verdict(answers[i], answers[n + i] if self.swap else None) for i in range(n)]

    def _render(self, q: Query, first: str, second: str) -> str:
        return fill(self.template, prompt=prompt_text(q.prompt, q.messages), response_a=first,
                    response_b=second, label_a=self.labels[0], label_b=self.labels[1])

    def _verdict(self, ab, ba) -> Verdict:
        p12 = None if ab[0] is None else float(ab[0] == 0)
        p21 = None if ba is None or ba[0] is None else float(ba[0] == 0)
        reasons = "; ".join(r for r in (ab[1], ba[1] if ba else None) if r)
        if p12 is None and p21 is None:
            return Verdict(abstained=True, reason=reasons)
        if p12 is not None and p21 is not None:
            pref = swap_average(p12, p21)
        else:
            pref = p12 if p12 is not None else 1.0 - p21
        return Verdict(preference=pref, p12=p12, p21=p21, reason=reasons or None)


def _content(raw: bytes) -> str:
    """The message text of a chat-completions response body, scrubbed of secrets; Abstain when the body is
    not one."""
    raw = redact(raw.decode("utf-8", errors="replace")).encode()
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Abstain(f"invalid response body {raw[:40]!r}")
    if not isinstance(content, str):
        raise Abstain(f"invalid message content {content!r:.40}")
    return content


def build(spec, runtime) -> HttpJudge:
    return HttpJudge(spec, runtime)
