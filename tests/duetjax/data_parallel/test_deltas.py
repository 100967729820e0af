"""Outputs sent as deltas rebuild the very outputs the engine made, step by step."""
from __future__ import annotations

import pickle

from duetjax import SamplingParams
from duetjax.data_parallel.deltas import OutputEncoder, OutputState
from duetjax.outputs import CompletionOutput, RequestMetrics, RequestOutput


def snapshot(out: RequestOutput) -> RequestOutput:
    """A copy that later steps cannot change (one metrics object serves all of a request's
    outputs, in the engine and in ``OutputState``)."""
    return pickle.loads(pickle.dumps(out))


def through_the_pipe(outputs: list[RequestOutput]) -> list[RequestOutput]:
    """``outputs`` (of one request) encoded, pickled and applied as a front would."""
    encoder, rebuilt = OutputEncoder(), []
    state = OutputState(outputs[0].request_id, outputs[0].prompt, outputs[0].prompt_token_ids)
    for output in outputs:
        delta = pickle.loads(pickle.dumps(encoder.encode(output)))
        rebuilt.append(snapshot(state.apply(delta)))
    assert not encoder._sent  # finished: forgotten
    return rebuilt


def output(tokens, text, finished=False, logprobs=None, prompt_logprobs=None, **completion):
    times = [float(t) for t in range(len(tokens))]
    metrics = RequestMetrics(100.0, 100.5, 101.0 if tokens else None, times,
                             110.0 if finished else None)
    return RequestOutput("r", "the prompt", [1, 2, 3],
                         [CompletionOutput(0, text, list(tokens), completion.get("reason"),
                                           completion.get("stop"), logprobs)],
                         finished, metrics, prompt_logprobs)


def test_a_stop_string_cuts_text_and_tokens_launched_past_the_stop_are_dropped():
    outputs = [output([5], "a", logprobs=[{5: -0.1}], prompt_logprobs=[None]),
               output([5, 6], "ab", logprobs=[{5: -0.1}, {6: -0.1}],
                      prompt_logprobs=[None, {2: -1.0}, {3: -2.0}]),
               output([5, 6, 7, 8], "abcSTOPd", logprobs=[{t: -0.1} for t in (5, 6, 7, 8)],
                      prompt_logprobs=[None, {2: -1.0}, {3: -2.0}]),
               output([5, 6, 7], "abc", finished=True, logprobs=[{t: -0.1} for t in (5, 6, 7)],
                      prompt_logprobs=[None, {2: -1.0}, {3: -2.0}], reason="stop", stop="STOP")]
    outputs[-1].metrics.token_times.pop()
    for got, want in zip(through_the_pipe(outputs), outputs):
        assert got == want


def test_text_that_changes_before_its_end_is_sent_whole():
    outputs = [output([5, 6], "ab\ufffd"), output([5, 6, 7], "abé", finished=True, reason="length")]
    assert through_the_pipe(outputs) == outputs


def test_an_engines_streamed_outputs_rebuild_exactly(tiny_chat_engine):
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=1, max_tokens=9, prompt_logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=20, stop=["e", "a", "o", " "])]
    streams: dict[str, list[RequestOutput]] = {}
    for i, p in enumerate(params):
        streams[tiny_chat_engine.add_request(f"prompt number {i}", p)] = []
    while tiny_chat_engine.has_unfinished_requests():
        for out in tiny_chat_engine.step():
            streams[out.request_id].append(snapshot(out))
    for outputs in streams.values():
        assert outputs[-1].finished
        assert through_the_pipe(outputs) == outputs
