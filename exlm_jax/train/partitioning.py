"""Device mesh from config and logical-axis rules -> NamedShardings (DESIGN.md §1, anchors §3).

Mesh axes are ("data", "fsdp", "tensor"); one size may be -1 and is filled with the remaining
devices. Axes are Auto so Linen's logical constraints apply inside `jax.jit`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from exlm_jax.models.encoder import logical_axis_rules_default

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 entry; raises a one-line error when the sizes don't multiply to num_devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} slots but there are "
                     f"{num_devices} devices; set one axis to -1 or make the product match")
  return tuple(sizes)


def create_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config) -> tuple:
  rules = tuple(tuple(r) for r in config.get("logical_axis_rules", ()) or ())
  return rules or logical_axis_rules_default()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """(B, n) token blocks: the batch split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shardings_from_boxed(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (abstract) values carrying nn.LogicallyPartitioned metadata."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)
