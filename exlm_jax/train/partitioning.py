"""Device mesh from config, logical-axis rule presets, and the "is FSDP really sharding?" check.

Mesh axes are ("data", "fsdp", "tensor"). `config.mesh` gives each axis's size inside a slice
(ICI: `data`, `fsdp`, `tensor`; one may be -1 = the remaining devices) and across slices
(DCN: `dcn_data`, `dcn_fsdp`, default 1; one may be -1 = the remaining slices). A mesh axis's size
is dcn x ici. With DCN sizes > 1 the devices are laid out with
`mesh_utils.create_hybrid_device_mesh`, so that only the dcn part of an axis crosses slices; a
"slice" is a TPU slice where devices know their `slice_index`, else a process (GPU nodes, CPU).
Axes are `AxisType.Auto` so Linen's logical constraints apply inside `jax.jit` (jax.make_mesh defaults to
Explicit; docs/design.md §8.3).

`config.sharding` picks the logical-axis rules (MaxText / big_vision presets):
  'dp'      parameters replicated; the batch is split over data x fsdp (set fsdp = tensor = 1);
  'fsdp'    parameters sharded along their `embed` dimension over `fsdp` (ZeRO-3 style);
  'fsdp_tp' as 'fsdp', plus `mlp`/`heads`/`vocab` dimensions (and those activations) over `tensor`.
A non-empty `config.logical_axis_rules` replaces the preset. A dimension that does not divide by its
mesh axes is left unsharded (e.g. a 27-token vocabulary on tensor=2) rather than failing to compile;
`assert_params_sufficiently_sharded` then catches a run whose parameters end up mostly replicated.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from exlm_jax import config_lib
from exlm_jax.models.encoder import logical_axis_rules_default

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXES = ("dcn_data", "dcn_fsdp", "dcn_tensor")  # dcn_tensor is always 1 (tensor parallelism stays in a slice)
BATCH_AXES = ("data", "fsdp")
SHARDING_PRESETS = ("dp", "fsdp", "fsdp_tp")
# Mesh axes each preset is meant to shard parameters over (the sufficiency check's denominator).
WEIGHT_AXES = {"dp": (), "fsdp": ("fsdp",), "fsdp_tp": ("fsdp", "tensor"), "custom": ("fsdp", "tensor")}
# For configs without the sharding fields (fine-tuning); MaxText uses a tolerance of 0.02 for large models,
# tiny ones replicate more (biases).
DEFAULT_SHARDING = config_lib.SHARDING["sharding"]
DEFAULT_TOLERANCE = config_lib.SHARDING["sharding_tolerance"]


# ----------------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------------

def _get(cfg, key: str, default: int = 1) -> int:
  value = cfg.get(key, default) if hasattr(cfg, "get") else default
  return int(default if value is None else value)


def _fill(sizes: list[int], total: int, what: str, names: Sequence[str]) -> tuple[int, ...]:
  """Replaces one -1 in `sizes` so their product is `total`; one-line errors otherwise."""
  shown = dict(zip(names, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {shown}: at most one {what} axis may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if total % known:
      raise ValueError(f"mesh {shown}: {total} {what} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f"mesh {shown} has {math.prod(sizes)} {what} slots but there are {total}; set one "
                     "axis to -1 or make the product match")
  return tuple(sizes)


def dcn_shape(mesh_cfg, num_slices: int | None = None) -> tuple[int, ...]:
  """(dcn_data, dcn_fsdp, 1): how many slices each axis spans; -1 is filled from `num_slices`."""
  sizes = [_get(mesh_cfg, "dcn_data"), _get(mesh_cfg, "dcn_fsdp"), _get(mesh_cfg, "dcn_tensor")]
  if sizes[2] != 1:
    raise ValueError(f"mesh.dcn_tensor={sizes[2]}: tensor parallelism must stay inside a slice; use "
                     "dcn_data or dcn_fsdp across slices")
  if -1 not in sizes:
    return tuple(sizes)
  if num_slices is None:
    num_slices = _granules(jax.devices())[0]
  return _fill(sizes, num_slices, "slice", DCN_AXES)


def mesh_shapes(mesh_cfg, num_devices: int, num_slices: int | None = None):
  """(ici_shape, dcn_shape): per-slice and across-slice sizes of (data, fsdp, tensor)."""
  dcn = dcn_shape(mesh_cfg, num_slices)
  slices = math.prod(dcn)
  if num_devices % slices:
    raise ValueError(f"mesh dcn {dict(zip(DCN_AXES, dcn))} spans {slices} slices but {num_devices} devices "
                     "do not split evenly into them")
  ici = _fill([int(mesh_cfg[a]) for a in MESH_AXES], num_devices // slices, "per-slice" if slices > 1 else
              "device", MESH_AXES)
  return ici, dcn


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int | None = None) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor) = dcn x ici; raises a one-line error when they don't fit."""
  ici, dcn = mesh_shapes(mesh_cfg, num_devices, num_slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def _granules(devices) -> tuple[int, bool]:
  """(number of slices, process_is_granule): TPU slices when devices know them, else processes."""
  slice_ids = {getattr(d, "slice_index", None) for d in devices}
  if None not in slice_ids and len(slice_ids) > 1:
    return len(slice_ids), False
  return len({d.process_index for d in devices}), True


def device_grid(mesh_cfg, devices) -> np.ndarray:
  """The devices arranged as a (data, fsdp, tensor) array: hybrid DCN x ICI layout when dcn > 1."""
  devices = list(devices)
  num_slices, process_is_granule = _granules(devices)
  ici, dcn = mesh_shapes(mesh_cfg, len(devices), num_slices)
  if math.prod(dcn) > 1:
    if math.prod(dcn) != num_slices:
      raise ValueError(f"mesh dcn {dict(zip(DCN_AXES, dcn))} needs {math.prod(dcn)} slices but the devices "
                       f"form {num_slices} ({'processes' if process_is_granule else 'TPU slices'}); set "
                       "mesh.dcn_data/dcn_fsdp to 1 on a single slice or process")
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=process_is_granule,
                                                allow_split_physical_axes=True)
  try:  # topology-aware order on TPU; a plain reshape elsewhere
    return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(ici)


def create_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all), Auto axis types."""
  grid = device_grid(mesh_cfg, jax.devices() if devices is None else devices)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def describe_mesh(mesh: Mesh) -> str:
  return " x ".join(f"{a}={n}" for a, n in mesh.shape.items())


# ----------------------------------------------------------------------------------------------
# Logical-axis rules
# ----------------------------------------------------------------------------------------------

def sharding_preset(config) -> str:
  """'dp' | 'fsdp' | 'fsdp_tp', or 'custom' when config.logical_axis_rules is set."""
  if tuple(config.get("logical_axis_rules", ()) or ()):
    return "custom"
  preset = config.get("sharding", DEFAULT_SHARDING) or DEFAULT_SHARDING
  if preset not in SHARDING_PRESETS:
    raise ValueError(f"config.sharding={preset!r}; choose one of {', '.join(SHARDING_PRESETS)} (or set "
                     "config.logical_axis_rules)")
  return preset


def preset_rules(preset: str) -> tuple:
  """The logical-axis rules of a preset (see the module docstring)."""
  full = logical_axis_rules_default()
  if preset == "fsdp_tp":
    return full
  if preset not in ("dp", "fsdp"):
    raise ValueError(f"unknown sharding preset {preset!r}; choose one of {', '.join(SHARDING_PRESETS)}")
  keep = {"activation_batch"} | ({"embed"} if preset == "fsdp" else set())
  return tuple((name, axes if name in keep else None) for name, axes in full)


def logical_rules(config) -> tuple:
  rules = tuple(tuple(r) for r in config.get("logical_axis_rules", ()) or ())
  return rules or preset_rules(sharding_preset(config))


def check_mesh_for_preset(config, mesh_sizes: Sequence[int]) -> None:
  """A preset that replicates over an axis of size > 1 wastes it: a one-line error instead."""
  preset = sharding_preset(config)
  sizes = dict(zip(MESH_AXES, mesh_sizes))
  if preset == "dp" and (sizes["fsdp"] > 1 or sizes["tensor"] > 1):
    raise ValueError(f"sharding='dp' replicates parameters but the mesh has fsdp={sizes['fsdp']}, "
                     f"tensor={sizes['tensor']}; set mesh.fsdp=1 mesh.tensor=1 or use sharding='fsdp'/'fsdp_tp'")
  if preset == "fsdp" and sizes["tensor"] > 1:
    raise ValueError(f"sharding='fsdp' does not use the tensor axis but mesh.tensor={sizes['tensor']}; set "
                     "mesh.tensor=1 or use sharding='fsdp_tp'")


# ----------------------------------------------------------------------------------------------
# Shardings
# ----------------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh) -> NamedSharding:
  """(B, n) token blocks: the batch split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh_cfg, num_devices: int) -> int:
  """How many ways the batch is split (the product of the batch axes) for config.mesh on num_devices."""
  return math.prod(s for a, s in zip(MESH_AXES, mesh_shape(mesh_cfg, num_devices)) if a in BATCH_AXES)


def _axes_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[a] for a in names)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` with every dimension that its mesh axes do not divide left unsharded."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  return P(*[e if dim % _axes_size(mesh, e) == 0 else None for e, dim in zip(entries, shape)])


def shardings_from_boxed(boxed_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of (abstract) values carrying nn.LogicallyPartitioned metadata."""
  specs = nn.get_partition_spec(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, boxed_tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return jax.tree.map(lambda sh, x: NamedSharding(mesh, fit_spec(sh.spec, x.shape, mesh)), shardings, shapes,
                      is_leaf=lambda x: isinstance(x, NamedSharding))


def per_device_elements(shape: Sequence[int], sharding: NamedSharding) -> int:
  return math.prod(sharding.shard_shape(tuple(shape))) if shape else 1


def sharding_report(abstract_params, shardings) -> dict[str, Any]:
  """Total vs per-device parameter elements, and the largest parameters that are fully replicated."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  total = per_device = 0
  replicated_params = []
  for (path, x), sh in zip(leaves, shard_leaves):
    size = math.prod(x.shape)
    local = per_device_elements(x.shape, sh)
    total += size
    per_device += local
    if local == size and size > 1:
      replicated_params.append((size, jax.tree_util.keystr(path, simple=True, separator="/")))
  replicated_params.sort(reverse=True)
  return dict(total=total, per_device=per_device, replicated=[name for _, name in replicated_params])


def assert_params_sufficiently_sharded(abstract_params, shardings, mesh: Mesh, config) -> dict[str, Any]:
  """Fails when the preset's weight axes leave more than `config.sharding_tolerance` extra per device.

  As MaxText's check of the same name: with weight-sharding axes of total size N, a perfectly
  sharded model keeps total/N parameter elements per device; more than (1 + tolerance) times that
  means the rules left big parameters replicated (a logical name mapped to no axis, or a dimension
  that does not divide). Returns the report (total, per_device, replicated names).
  """
  preset = sharding_preset(config)
  check_mesh_for_preset(config, [mesh.shape[a] for a in MESH_AXES])
  report = sharding_report(abstract_params, shardings)
  n = math.prod(mesh.shape[a] for a in WEIGHT_AXES[preset])
  tolerance = float(config.get("sharding_tolerance", DEFAULT_TOLERANCE))
  report.update(preset=preset, ideal=report["total"] / n)
  if n > 1 and report["per_device"] > report["ideal"] * (1.0 + tolerance):
    worst = ", ".join(report["replicated"][:3]) or "none fully replicated"
    raise ValueError(
        f"sharding={preset!r} on mesh {describe_mesh(mesh)} leaves {report['per_device']:,} of "
        f"{report['total']:,} parameter elements on each device (ideal {report['ideal']:,.0f}, tolerance "
        f"{tolerance:g}); largest replicated: {worst} -- map their logical axes in "
        "config.logical_axis_rules, make the dimensions divisible by the mesh axes, or raise "
        "config.sharding_tolerance")
  return report


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`: active while tracing and calling jitted steps."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
