"""OutputProcessor without a model: a launched step's sampled tokens applied to its requests."""
import numpy as np

from duetjax.config import EngineConfig
from duetjax.core.block_manager import BlockManager
from duetjax.core.model_runner import InFlight
from duetjax.core.output_processor import OutputProcessor
from duetjax.core.request import Request
from duetjax.core.sampler import SampledTokens
from duetjax.core.scheduler import Scheduler
from duetjax.sampling_params import SamplingParams


class SampledInFlight(InFlight):
    """A step whose results are known: one token per row."""

    def __init__(self, batch, tokens: list[int]):
        super().__init__(batch, sampled=None, last_tokens=None)
        self.tokens = tokens

    def fetch(self) -> SampledTokens:
        return SampledTokens(np.array([self.tokens], np.int32), None, None, None)


class BrokenDetokenizer:
    def add(self, token_id):
        raise RuntimeError("the detokenizer broke")


def processor_with(*requests: Request) -> OutputProcessor:
    config = EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, page_size=4)
    processor = OutputProcessor(Scheduler(config, BlockManager(32, 4, True), max_model_len=64))
    for request in requests:
        request.plain = request.detokenizer is None
        processor.add(request)
    return processor


def run_step(processor: OutputProcessor, tokens: list[int]):
    """Schedules and launches one step that samples ``tokens``, then reads it."""
    batch = processor.scheduler.schedule()
    launched = SampledInFlight(batch, tokens)
    processor.reserve(batch, launched)
    processor.scheduler.commit(batch)
    return processor.process(launched)[0]


def request(request_id: str, stop_ids=(), max_tokens: int = 8) -> Request:
    r = Request(request_id, [3, 4, 5], SamplingParams(max_tokens=max_tokens), seed=0)
    r.stop_ids = frozenset(stop_ids)
    return r


def test_a_stop_id_finishes_its_request_and_the_others_go_on():
    stopping, going = request("a", stop_ids={7}), request("b", stop_ids={7})
    processor = processor_with(stopping, going)
    outputs = {o.request_id: o for o in run_step(processor, [7, 9])}
    assert outputs["a"].finished and outputs["a"].outputs[0].finish_reason == "stop"
    assert outputs["a"].outputs[0].token_ids == [7]
    assert not outputs["b"].finished and outputs["b"].outputs[0].token_ids == [9]
    assert set(processor.requests) == {"b"}
    outputs = run_step(processor, [8])  # (b alone now)
    assert [o.outputs[0].token_ids for o in outputs] == [[9, 8]]


def test_the_length_limit_finishes_a_request():
    processor = processor_with(request("a", max_tokens=2))
    assert not run_step(processor, [9])[0].finished
    (output,) = run_step(processor, [9])
    assert output.finished and output.outputs[0].finish_reason == "length"
    assert output.outputs[0].token_ids == [9, 9] and not processor.requests


def test_a_request_whose_processing_raises_fails_alone():
    broken, fine = request("a"), request("b")
    broken.detokenizer = BrokenDetokenizer()
    processor = processor_with(broken, fine)
    outputs = run_step(processor, [9, 9])
    assert [o.request_id for o in outputs] == ["b"] and not outputs[0].finished
    (failed,) = processor.take_failed()
    assert failed.request_id == "a" and failed.finished
    assert failed.outputs[0].finish_reason == "error" and "the detokenizer broke" in failed.error
    assert processor.take_failed() == [] and set(processor.requests) == {"b"}


def test_finished_only_leaves_out_the_outputs_of_running_requests():
    processor = processor_with(request("a", stop_ids={7}), request("b"))
    processor.finished_only = True
    assert [o.request_id for o in run_step(processor, [7, 9])] == ["a"]
