"""Erasure coding across an EC group of nodes: stripe layout and zfec codec, as pure functions."""

from ftmem.erasure.codec import BytesLike, NotEnoughBlocks, encode_parity, pad, rebuild_stripe, recover
from ftmem.erasure.layout import (
    ErasureConfigError,
    StripeLayout,
    check_config,
    choose_chunk_size,
    default_group_size,
    group_members,
)

__all__ = [
    "BytesLike",
    "ErasureConfigError",
    "NotEnoughBlocks",
    "StripeLayout",
    "check_config",
    "choose_chunk_size",
    "default_group_size",
    "encode_parity",
    "group_members",
    "pad",
    "rebuild_stripe",
    "recover",
]
