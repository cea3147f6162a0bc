"""Tensor-parallel placement: a one-axis device mesh and the `NamedSharding` of every weight, derived from the
logical axes of the weight table (`weights.weight_specs`).

  q_heads, kv_heads   attention heads split over the mesh (q/k/v by their rows, o_proj by its input); KV heads
                      fewer than the devices are replicated (and so is the KV cache, which XLA shards like k, v)
  ffn                 FFN neurons split: the rows of W_gate, W_up, W_down_t, and of the predictor's B and bias
  vocab               the embedding and LM head split by vocabulary (replicated where it does not divide)
  embed               replicated, as are the norms and the predictor's A

The jitted programs take these arrays as they are placed, and XLA's SPMD partitioner inserts the collectives
(an all-reduce after o_proj and after the FFN, which contract over a split axis). The model holds q/k/v as one
matrix (`weights.FUSED`) laid out per device (`weights.fuse_qkv`): each device's rows are its own heads' q, k
and v, which `split_qkv` takes apart on each device.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from svdsparse_jax.config import ModelConfig
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.weights import Path, module_view, qkv_block_rows, weight_specs

AXIS = "model"  # the mesh's one axis: tensor parallelism


def make_mesh(n_devices: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ("model") over the first n_devices devices of this process's JAX backend."""
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= n_devices <= len(devices):
        hint = (f"; for host devices on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n_devices} "
                "before the command" if devices[0].platform == "cpu" else "")
        raise SvdsparseError(f"--devices {n_devices}: this JAX backend has {len(devices)} "
                             f"{devices[0].platform} device(s){hint}")
    return Mesh(np.asarray(devices[:n_devices]), (AXIS,))


def check_mesh(cfg: ModelConfig, n: int) -> None:
    """Refuses meshes that do not divide the model: heads, KV heads (unless fewer than the devices: then
    replicated) and d_ff."""
    for what, count in (("attention heads", cfg.n_heads), ("FFN neurons (d_ff)", cfg.d_ff)):
        if count % n:
            raise SvdsparseError(f"--devices {n}: the model's {count} {what} do not split evenly over {n} devices")
    if cfg.n_kv_heads >= n and cfg.n_kv_heads % n:
        raise SvdsparseError(f"--devices {n}: the model's {cfg.n_kv_heads} KV heads do not split evenly over {n} "
                             "devices (fewer KV heads than devices are replicated)")


def axis_rules(cfg: ModelConfig, n: int) -> dict[str, str | None]:
    """Logical axis -> mesh axis (None: replicated) for a mesh of n devices."""
    kv = AXIS if cfg.n_kv_heads % n == 0 else None
    return {"q_heads": AXIS, "kv_heads": kv, "ffn": AXIS, "vocab": AXIS if cfg.vocab_size % n == 0 else None,
            "embed": None, "qkv": AXIS}  # "qkv": the fused q/k/v rows, in one block per device (weights.fuse_qkv)


def mesh_size(mesh: Mesh | None) -> int:
    """Devices of a mesh (1 for None: one device)."""
    return 1 if mesh is None else mesh.devices.size


def vocab_split(cfg: ModelConfig, mesh: Mesh | None) -> bool:
    """Whether the embedding and LM head are split by vocabulary on the mesh."""
    return mesh is not None and axis_rules(cfg, mesh_size(mesh))["vocab"] is not None


def split_qkv(qkv: jax.Array, cfg: ModelConfig, mesh: Mesh | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The product with the fused q/k/v matrix, [..., rows] (laid out for the mesh by `weights.fuse_qkv`), as q
    [..., q_dim], k and v [..., kv_dim]: q split over the mesh by heads, k and v by KV heads or replicated. Each
    device takes its own block apart (no communication)."""
    n = mesh_size(mesh)
    qr, kr = qkv_block_rows(cfg, n)
    if n == 1:
        return qkv[..., :qr], qkv[..., qr:qr + kr], qkv[..., qr + kr:]
    last = PartitionSpec(*([None] * (qkv.ndim - 1)), AXIS)
    kv = last if kr < cfg.kv_dim else PartitionSpec()
    # check_vma off: replicated k and v are the same on every device by construction (each block holds them all)
    return jax.shard_map(lambda b: (b[..., :qr], b[..., qr:qr + kr], b[..., qr + kr:]), mesh=mesh, in_specs=last,
                         out_specs=(last, kv, kv), check_vma=False)(qkv)


def module_axes(cfg: ModelConfig) -> dict[Path, tuple[str, ...]]:
    """The logical axes of every parameter the model holds: the specs', each FUSED group as one "qkv" array."""
    return module_view(cfg, lambda s: s.axes, lambda axes: ("qkv", *axes[0][1:]))


def spec_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[Path, NamedSharding]:
    """The placement of every weight of the table (`weights.weight_specs`) on the mesh, by its logical axes: what
    conversion and loading restore each tensor's shards into, so no device holds the whole model."""
    check_mesh(cfg, mesh.devices.size)
    rules = axis_rules(cfg, mesh.devices.size)
    return {s.path: NamedSharding(mesh, PartitionSpec(*(rules[a] for a in s.axes))) for s in weight_specs(cfg)}


def _key(entry) -> str | int | None:
    return getattr(entry, "key", getattr(entry, "idx", None))


def module_path(path) -> Path:
    """A parameter's path in the model's nnx state as the weight table's module path (`weights.module_view`):
    its attribute names and layer indices."""
    return tuple(k for k in map(_key, path) if k is not None)


def place_model(model, mesh: Mesh) -> None:
    """Places every parameter of a model on the mesh by its logical axes, in place (the arrays are copied onto
    their devices; already placed ones stay). `model.Transformer` calls it when its engine has a mesh."""
    cfg = model.cfg
    n = mesh.devices.size
    check_mesh(cfg, n)
    rules, axes = axis_rules(cfg, n), module_axes(cfg)
    _, state = nnx.split(model)

    def place(path, x):
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*(rules[a] for a in axes[module_path(path)]))))

    nnx.update(model, jax.tree_util.tree_map_with_path(place, state))


def shard_predictors(predictors: list, mesh: Mesh, d_ff: int) -> list:
    """Predictors placed with their neurons: every array whose first axis is the d_ff neurons (B, bias, sign
    bits) split by rows; the rest (A, hidden biases, scalars) replicated. d_ff must divide over the mesh."""
    def place(x):
        rows = x.ndim >= 1 and x.shape[0] == d_ff
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(AXIS if rows else None)))

    return [jax.tree.map(place, p) for p in predictors]
