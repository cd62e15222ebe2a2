"""Device, rank and process-group logic: the only place that knows where and how many we run."""

from dino.distributed.device import DEVICE_CHOICES, DeviceContext, resolve_device_type
from dino.distributed.dist import (
    all_gather_cat,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    any_rank_flags,
    barrier,
    collective_timeout_message,
    destroy_distributed,
    get_local_world_size,
    get_rank,
    get_world_size,
    heartbeat,
    init_distributed,
    is_collective_timeout,
    is_enabled,
    is_main_process,
    same_seed_on_every_rank,
    seed_everything,
)

__all__ = [
    "DEVICE_CHOICES", "DeviceContext", "resolve_device_type", "all_gather_cat", "any_rank", "any_rank_flags",
    "all_reduce_mean", "all_reduce_sum", "barrier", "collective_timeout_message", "destroy_distributed",
    "get_local_world_size", "get_rank", "get_world_size", "heartbeat", "init_distributed", "is_collective_timeout",
    "is_enabled", "is_main_process", "same_seed_on_every_rank", "seed_everything",
]
