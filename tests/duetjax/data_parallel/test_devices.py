"""Which GPUs each replica gets, counted without touching a GPU."""
from __future__ import annotations

import pytest

from duetjax.config import ConfigError
from duetjax.data_parallel.devices import replica_devices


def four_gpus() -> int:
    return 4


def test_replica_i_takes_the_ith_group_of_tensor_parallel_size_gpus():
    assert replica_devices(4, 1, {}, four_gpus) == ["0", "1", "2", "3"]
    assert replica_devices(2, 2, {}, four_gpus) == ["0,1", "2,3"]
    assert replica_devices(1, 2, {}, four_gpus) == ["0,1"]


def test_the_fronts_visible_devices_are_split_in_their_order():
    env = {"CUDA_VISIBLE_DEVICES": "3, 1,2,0"}
    assert replica_devices(2, 2, env, four_gpus) == ["3,1", "2,0"]


def test_more_gpus_than_there_are_is_an_error_naming_the_option():
    with pytest.raises(ConfigError, match="needs 6 GPUs; 4 are visible") as error:
        replica_devices(3, 2, {}, four_gpus)
    assert error.value.flag == "--data-parallel-size"


def test_without_gpus_every_replica_runs_where_jax_finds():
    assert replica_devices(3, 2, {}, lambda: 0) == [None] * 3
    assert replica_devices(2, 1, {"CUDA_VISIBLE_DEVICES": ""}, four_gpus) == [None] * 2
    assert replica_devices(2, 1, {"JAX_PLATFORMS": "cpu"}, four_gpus) == [None] * 2
    assert replica_devices(2, 1, {"JAX_PLATFORMS": "cuda,cpu"}, four_gpus) == ["0", "1"]
