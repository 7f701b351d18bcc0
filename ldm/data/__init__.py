"""Data: emoji source records, dataset builders, WebDataset shard writing, the training stream."""

from ldm.data.builders import BuildError, build_folder_shards, reshard
from ldm.data.emoji import EmojiRecord, emoji_records, load_rgb
from ldm.data.shards import build_emoji_shards, write_shards
from ldm.data.split import KeyHoldout, held_out
from ldm.data.decode import resize_center_crop, to_rgb
from ldm.data.stream import dataset_size, make_loader, resolve_shards, resolve_split

__all__ = ["BuildError", "EmojiRecord", "KeyHoldout", "build_emoji_shards", "build_folder_shards", "dataset_size",
           "emoji_records", "held_out", "load_rgb", "make_loader", "reshard", "resize_center_crop", "resolve_shards",
           "resolve_split", "to_rgb", "write_shards"]
