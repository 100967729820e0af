"""``python -m duetjax.serve --data-parallel-size 2``: one server, two replica processes."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from duetjax import SamplingParams
from duetjax.serve import main

from .conftest import TINY_SERVER_ARGS
from .helpers import ServerProcess

SYSTEM = "You are a terse assistant: answer every question in one short line."


def test_two_replicas_serve_one_engines_outputs_with_routing_metrics(tiny_chat_dir,
                                                                     tiny_chat_engine):
    server = ServerProcess("--model", str(tiny_chat_dir), *TINY_SERVER_ARGS,
                           "--data-parallel-size", "2")
    pids = [int(pid) for pid in re.findall(r"replica \d ready \(pid (\d+)", server.output)]
    try:
        assert len(pids) == 2
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        prompts = [f"Tell me about the number {i}." for i in range(6)]
        expected = tiny_chat_engine.generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)

        def complete(prompt: str) -> str:
            return client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=8,
                                             temperature=0, extra_body={"ignore_eos": True}
                                             ).choices[0].text
        with ThreadPoolExecutor(6) as pool:
            assert list(pool.map(complete, prompts)) == [o.outputs[0].text for o in expected]

        for question in ("Why?", "How?", "When?"):  # one system prompt: one replica's cache
            chat = client.chat.completions.create(
                model="tiny-chat", max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": question}])
            assert chat.choices[0].finish_reason in ("length", "stop")

        assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
        assert server.metric("duetjax_routing_decisions_total", reason="cache") >= 2
        assert server.metric("duetjax_routing_decisions_total") == 9
        assert server.metric("duetjax_replica_up") == 2
        for replica in ("0", "1"):
            assert server.metric("duetjax_replica_num_requests_in_flight", replica=replica) == 0
        assert server.metric("duetjax_request_success_total", finished_reason="length") >= 6
        assert server.metric("duetjax_prefix_cache_hit_rate") > 0
    finally:
        assert server.terminate() == 0, server.output[-3000:]
    for pid in pids:  # the replicas stopped with the server
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_bad_data_parallel_size_names_its_flag(tiny_llama_dir, capsys):
    assert main(["--model", str(tiny_llama_dir), "--data-parallel-size", "0"]) == 2
    assert capsys.readouterr().err == "error: --data-parallel-size must be >= 1, got 0\n"
    assert main(["--model", str(tiny_llama_dir), "--data-parallel-size", "2", "--mode", "duet"]) == 2
    assert "error: --data-parallel-size does not run in duet mode" in capsys.readouterr().err
