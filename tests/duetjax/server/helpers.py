"""A tiny chat model and a real server process for the server tests."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import TINY_LLAMA, write_random_checkpoint

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% if tools %}{{ '<|im_start|>system\n# Tools\n' }}{% for tool in tools %}"
          "{{ tool | tojson + '\n' }}{% endfor %}{{ '<|im_end|>\n' }}{% endif %}"
          "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content']}}{% for call in message.tool_calls or [] %}{{ '<tool_call>' + "
          "{'name': call.function.name, 'arguments': call.function.arguments} | tojson + "
          "'</tool_call>' }}{% endfor %}{{ '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""ChatML; with tools, a system turn listing them, and earlier calls as Hermes <tool_call>
blocks (their arguments rendered with tojson, so they must reach the template as objects)."""
TINY_CHAT_LLAMA = {**TINY_LLAMA, "vocab_size": 256 + len(SPECIAL_TOKENS), "bos_token_id": 256,
                   "eos_token_id": 258}
REPO_ROOT = Path(__file__).resolve().parents[3]


def write_tiny_chat_model(directory: Path) -> Path:
    """A random 2-layer Llama with a byte-level tokenizer (one token per byte, ids 0..255, then
    the ChatML special tokens) and a ChatML template that renders tools: fast, and it exercises
    every text path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    write_random_checkpoint(directory, TINY_CHAT_LLAMA)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = {b: c for b, c in zip(range(256), sorted(alphabet, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML,
        "add_bos_token": False}))
    return directory


MODEL_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 1, "max_new_tokens": 5}
"""A generation_config.json's sampling settings whose effect shows in the tokens: top_k 1
samples the most likely token (the greedy output) and max_new_tokens ends outputs at 5."""


def write_tiny_model_with_sampling_defaults(directory: Path) -> Path:
    """The tiny chat model with ``MODEL_SAMPLING`` in its generation_config.json."""
    write_tiny_chat_model(directory)
    (directory / "generation_config.json").write_text(json.dumps(
        {**MODEL_SAMPLING, "eos_token_id": TINY_CHAT_LLAMA["eos_token_id"]}))
    return directory


def _byte_of(char: str) -> int:
    """GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256+."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    if ord(char) in printable:
        return ord(char)
    others = [b for b in range(256) if b not in printable]
    return others[ord(char) - 256]


class ServerProcess:
    """``python -m duetjax.serve`` in a subprocess on a free loopback port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 180.0):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "duetjax.serve", "--port", "0", "--no-access-log", *args],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.url = self._wait_ready(timeout)
        self.base_url = f"{self.url}/v1"

    def _wait_ready(self, timeout: float) -> str:
        ready = threading.Event()
        found: list[str] = []

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line)
                match = re.search(r"duetjax serving .* on (http://\S+)", line)
                if match and not found:
                    found.append(match.group(1))
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        if not ready.wait(timeout) or not found:
            self.process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-50:]))
        return found[0]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def output_to_the_end(self, timeout: float = 30.0) -> str:
        """Everything the process printed, once it has exited and its output is all read."""
        self._reader.join(timeout)
        return self.output

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics as {'name{labels}': value}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for key, value in self.metrics().items():
            base, _, rest = key.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def wait_until(self, predicate, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()
