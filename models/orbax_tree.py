"""Reading and writing Orbax checkpoint trees (``orbax-checkpoint``'s PyTree format).

Every Orbax layout duetjax reads goes through ``OrbaxTree``: it lists the stored arrays by
'/'-joined path (a key that itself holds '/', as in Gemma's Flax releases, is split the same
way, so ``{"transformer/layer_0/attn": {"q_einsum": ...}}`` and the fully nested tree read
alike) and restores either the whole tree straight onto the device, with one sharding and
dtype per leaf, or one array (or one layer of a stacked array) at a time into host memory.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .errors import CheckpointError

ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
"""Files an Orbax PyTree checkpoint directory holds (any one of them identifies it)."""
RESTORE_CONCURRENT_GB = 4
"""Bytes in flight while restoring, in GB (10^9): Orbax's default (96) lets a restore hold most
of a large model in host memory at once; a few GB keep the disk busy with peak host memory far
below the model's size. A checkpoint whose largest array is bigger raises it to that array's
size (Orbax refuses to read an array larger than the limit)."""


def is_orbax_tree(path: Path) -> bool:
    """Whether ``path`` is a directory written by Orbax's PyTree checkpointing."""
    return path.is_dir() and any((path / marker).exists() for marker in ORBAX_MARKERS)


def _checkpointer(largest_array_bytes: int = 0):
    import orbax.checkpoint as ocp

    restore_gb = max(RESTORE_CONCURRENT_GB, math.ceil(largest_array_bytes / 1e9))
    # Written uncompressed: trained weights barely compress, and restores skip the decoding.
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=restore_gb, use_compression=False)
    return ocp.Checkpointer(handler)


def restore_group_bytes(largest_array_bytes: int) -> int:
    """Stored bytes restored at once: ``RESTORE_CONCURRENT_GB``, or the largest array (it cannot
    be split) where that is larger."""
    return max(largest_array_bytes, int(RESTORE_CONCURRENT_GB * 1e9))


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(array: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(array, rows, start, axis=0)


def restore_groups(sizes: dict[str, int], budget: int) -> list[list[str]]:
    """``sizes``' names in their order, cut into consecutive groups of at most ``budget``
    bytes each (an array larger than the budget is a group alone)."""
    groups: list[list[str]] = []
    total = budget + 1
    for name, size in sizes.items():
        if total + size > budget:
            groups.append([])
            total = 0
        groups[-1].append(name)
        total += size
    return groups


def save_tree(path: Path, tree: Any, stacked: Any = None) -> None:
    """Writes a tree of arrays (device or host) as an Orbax PyTree checkpoint at ``path``,
    which must not exist yet. ``stacked``: a tree of bools like ``tree`` (None: all False);
    a True leaf is stored one chunk per index of its axis 0 (a stacked layer weight), so that
    one layer of it can be read alone (``OrbaxTree.read_index``)."""
    import orbax.checkpoint as ocp

    def save_args(leaf: Any, by_layer: bool) -> Any:
        if not by_layer or leaf.ndim < 2:
            return ocp.SaveArgs()
        return ocp.SaveArgs(chunk_byte_size=max(1, leaf.nbytes // leaf.shape[0]), shard_axes=(0,))

    stacked = jax.tree_util.tree_map(lambda _: False, tree) if stacked is None else stacked
    _checkpointer().save(Path(path).absolute(), args=ocp.args.PyTreeSave(
        tree, save_args=jax.tree_util.tree_map(save_args, tree, stacked)))


class OrbaxTree:
    """The arrays of one Orbax PyTree checkpoint: their paths, shapes and dtypes (read from its
    metadata, no array data), and restores of all or one of them."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()
        if not is_orbax_tree(self.path):
            raise CheckpointError(f"{self.path} is not an Orbax checkpoint directory (it has "
                                  f"none of {', '.join(ORBAX_MARKERS)})")
        try:
            metadata = _checkpointer().metadata(self.path)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read the Orbax metadata of {self.path} ({err}); the "
                                  "checkpoint is incomplete or from an unsupported Orbax version") from None
        tree = getattr(metadata, "item_metadata", metadata)
        tree = getattr(tree, "tree", tree)
        self._keys: dict[str, tuple[str, ...]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        """'/'-joined path -> shape of every stored array."""
        self.dtypes: dict[str, np.dtype] = {}
        """'/'-joined path -> stored dtype."""
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
            name = "/".join(keys)
            self._keys[name] = keys
            self.shapes[name] = tuple(getattr(leaf, "shape", ()) or ())
            self.dtypes[name] = np.dtype(getattr(leaf, "dtype", np.float32))
        self.largest_array_bytes = max(
            (math.prod(shape) * self.dtypes[name].itemsize for name, shape in self.shapes.items()),
            default=0)
        """Bytes of the biggest stored array (stacked layer weights can pass the restore's
        usual limit)."""
        # Per instance, so the cached arrays go when the loader drops the tree.
        self.read = functools.lru_cache(maxsize=4)(self._read)  # q, k, v (gate, up) in turn
        self._tensorstore = functools.cache(self._open_tensorstore)

    def _nested(self, names: list[str], values: list[Any]) -> dict:
        """The tree holding ``values`` at the stored key paths of ``names``."""
        tree: dict = {}
        for name, value in zip(names, values):
            *parents, last = self._keys[name]
            node = tree
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = value
        return tree

    def restore(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """Restores the named arrays onto devices: each read as its target's dtype into its
        target's sharding, so a sharded target reads only the shards its devices hold.

        One restore of the whole tree holds every array in host memory before the last one
        reaches its device (an 8B model's restore peaked above the model's size). Arrays are
        restored in groups of at most ``restore_group_bytes(...)`` stored bytes instead, each
        group on its devices before the next is read, so the host holds one group at a time.
        A stacked array larger than ``RESTORE_CONCURRENT_GB`` and stored a chunk per layer
        (as ``duetjax.convert`` writes them) goes to a single device a few layers at a time
        (``_restore_by_layers``): with whole arrays, a group is as large as the largest one
        (a 70B model's stacked MLP weights are tens of GB), and the host held it twice at the
        peak (Llama-3-8B: 14.0 GiB for its 7.0 GiB gate/up weights)."""
        budget = int(RESTORE_CONCURRENT_GB * 1e9)
        restored, whole = {}, {}
        for name, target in targets.items():
            if self.stored_bytes(name) > budget and self._by_layers(name, target):
                restored[name] = self._restore_by_layers(name, target, budget)
            else:
                whole[name] = target
        sizes = {n: self.stored_bytes(n) for n in whole}
        for group in restore_groups(sizes, restore_group_bytes(max(sizes.values(), default=0))):
            restored |= jax.block_until_ready(self._restore_group({n: whole[n] for n in group}))
        return {name: restored[name] for name in targets}

    def _by_layers(self, name: str, target: jax.ShapeDtypeStruct) -> bool:
        """Whether ``name`` can be restored a few layers at a time: stored a chunk per index of
        axis 0, and bound for one device."""
        if not isinstance(getattr(target, "sharding", None), jax.sharding.SingleDeviceSharding):
            return False
        store = self._tensorstore(name)
        return (store is not None and len(self.shapes[name]) >= 2
                and store.chunk_layout.read_chunk.shape[0] == 1)

    def _restore_by_layers(self, name: str, target: jax.ShapeDtypeStruct,
                           budget: int) -> jax.Array:
        """The stored array on ``target``'s device, read and sent at most ``budget`` bytes of
        whole layers at a time into one device buffer (updated in place)."""
        import jax.numpy as jnp

        store = self._tensorstore(name)
        layers = self.shapes[name][0]
        step = max(1, budget // (self.stored_bytes(name) // layers))
        array = jnp.zeros(target.shape, target.dtype, device=target.sharding)
        for start in range(0, layers, step):
            stop = min(start + step, layers)
            rows = np.asarray(store[start:stop].read().result()).astype(target.dtype, copy=False)
            array = _put_rows(array, jax.device_put(rows, target.sharding), np.int32(start))
            jax.block_until_ready(array)  # (before the next read: the host holds one slice)
        return array

    def stored_bytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * self.dtypes[name].itemsize

    def _restore_group(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        import orbax.checkpoint as ocp

        names = list(targets)
        args = [ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype, global_shape=t.shape)
                for t in targets.values()]
        checkpointer = _checkpointer(self.largest_array_bytes)
        restored = checkpointer.restore(self.path, args=ocp.args.PyTreeRestore(
            item=self._nested(names, [0] * len(names)), restore_args=self._nested(names, args),
            partial_restore=True))
        return {name: functools.reduce(lambda node, key: node[key], self._keys[name], restored)
                for name in names}

    def read_index(self, name: str, axis: int, index: int) -> np.ndarray:
        """``np.take(stored array, index, axis)`` in host memory, in its stored dtype. Where
        the array is chunked one index of ``axis`` a chunk (duetjax writes stacked layers so),
        only that index is read; otherwise the whole array is (and ``read`` keeps it for the
        next index)."""
        store = self._tensorstore(name)
        if store is None or store.chunk_layout.read_chunk.shape[axis] != 1:
            return np.take(self.read(name), index, axis=axis)
        return np.asarray(store[(slice(None),) * axis + (index,)].read().result())

    def _open_tensorstore(self, name: str) -> Any:
        """The stored array opened for partial reads (None where Orbax does not say how)."""
        import orbax.checkpoint as ocp
        import tensorstore

        stored_name = ".".join(self._keys[name])
        ocdbt = (self.path / "manifest.ocdbt").exists()
        try:
            context = ocp.type_handlers.get_ts_context()
            info = ocp.type_handlers.ParamInfo(name=stored_name, path=self.path / stored_name,
                                               parent_dir=self.path, is_ocdbt_checkpoint=ocdbt,
                                               ts_context=context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=ocdbt)
            return tensorstore.open(spec, context=context).result()
        except (AttributeError, TypeError, ValueError):  # another Orbax: whole-array reads
            return None

    def _read(self, name: str) -> np.ndarray:
        """One stored array in host memory, in its stored dtype (``read`` caches the last few)."""
        import orbax.checkpoint as ocp

        item = self._nested([name], [0])
        args = self._nested([name], [ocp.RestoreArgs(restore_type=np.ndarray)])
        checkpointer = _checkpointer(self.largest_array_bytes)
        restored = checkpointer.restore(self.path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        return np.asarray(functools.reduce(lambda node, key: node[key], self._keys[name], restored))
