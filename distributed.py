"""
Multi-process training for train.py: torchrun DDP, DTensor tensor parallel (--tp), FSDP2 (--fsdp),
FSDP x TP on a 2-D mesh, and sharded checkpoints with torch.distributed.checkpoint (DCP).

    torchrun --standalone --nproc_per_node=8 train.py --model=llama               # DDP
    torchrun --standalone --nproc_per_node=8 train.py --model=llama --tp=2        # TP inside pairs of GPUs, FSDP across
    torchrun --standalone --nproc_per_node=8 train.py --model=llama --fsdp=True   # FSDP2 over all 8

The mesh is (dp, tp): tp ranks hold slices of the same layers and see the same batch; dp ranks see
different batches. Without --fsdp, dp is DDP, which cannot wrap DTensor parameters: --tp then needs
dp = 1 (world size == tp) or --fsdp=True.
"""
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


class DistributedError(ValueError):
    """A parallel layout that cannot work; raised on every rank before any collective, so none hangs."""


@dataclass
class Layout:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1
    fsdp: bool = False
    mesh: object = None  # DeviceMesh with dims ("dp", "tp"), or None for a single process

    @property
    def dp(self):
        return self.world // self.tp

    @property
    def dp_rank(self):
        return self.rank // self.tp  # ranks rank//tp*tp .. +tp-1 form one tp group

    @property
    def master(self):
        return self.rank == 0

    @property
    def sharded(self):
        return self.tp > 1 or self.fsdp


def layout_from_env(tp, fsdp):
    """Ranks from torchrun's environment; checks that need no communication come first."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if world == 1 and (tp > 1 or fsdp):
        flag = f"--tp={tp}" if tp > 1 else "--fsdp=True"
        raise DistributedError(f"{flag} needs several processes: launch with torchrun, e.g. torchrun --standalone "
                               f"--nproc_per_node={max(tp, 2)} train.py {flag} ...")
    if tp < 1 or world % tp:
        raise DistributedError(f"--tp={tp} does not divide the {world} processes; use a tp that divides "
                               f"--nproc_per_node x nodes")
    if tp > 1 and world > tp and not fsdp:
        raise DistributedError(f"--tp={tp} with {world} processes leaves {world // tp} data-parallel groups, and DDP "
                               f"cannot wrap tensor-parallel parameters; add --fsdp=True (FSDP x TP) or run {tp} processes")
    return Layout(rank=rank, world=world, local_rank=local_rank, tp=tp, fsdp=fsdp)


def init(layout, device_type):
    """Join the process group and build the (dp, tp) mesh; NCCL on GPUs, gloo on CPUs."""
    if layout.world == 1 and not layout.sharded:
        return layout
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    layout.mesh = init_device_mesh(device_type, (layout.dp, layout.tp), mesh_dim_names=("dp", "tp"))
    return layout


def check_tp_plan(model, plan, tp):
    """Every sharded Linear must split evenly into tp parts, and attention projections into whole heads."""
    head_dims = {name: m.head_dim for name, m in model.named_modules() if isinstance(getattr(m, "head_dim", None), int)}
    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        # plans may name modules with wildcards, as parallelize_module allows ("layers.*.attn.q_proj")
        regex = re.compile(re.escape(pattern).replace(r"\*", r"[^.]+"))
        for path in [p for p in modules if regex.fullmatch(p)]:
            check_linear(path, modules[path], style, head_dims, tp)


def check_linear(path, module, style, head_dims, tp):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    if isinstance(module, nn.Linear) and isinstance(style, (ColwiseParallel, RowwiseParallel)):
        size = module.out_features if isinstance(style, ColwiseParallel) else module.in_features
        owner = max((n for n in head_dims if path.startswith(n + ".")), key=len, default=None)
        unit = head_dims[owner] if owner is not None else 1
        if size % (unit * tp):
            what = f"{size // unit} heads of {unit}" if unit > 1 else f"{size} features"
            raise DistributedError(f"--tp={tp} cannot split {path} ({what}) evenly; pick a tp that divides "
                                   f"the model's head counts and hidden sizes")


def validate(model, layout):
    """The checks that need the model, on every rank, before any collective."""
    if layout.tp > 1:
        plan_fn = getattr(model, "tp_plan", None)
        if plan_fn is None:
            raise DistributedError(f"{type(model).__module__}.py has no tensor-parallel plan (tp_plan); "
                                   f"train it with DDP or --fsdp=True instead of --tp")
        check_tp_plan(model, plan_fn(), layout.tp)


def parallelize(model, layout, device):
    """TP first (within each tp group), then FSDP2 over dp, or DDP when not sharded. Returns the model to call."""
    if layout.tp > 1:
        from torch.distributed.tensor.parallel import parallelize_module
        parallelize_module(model, layout.mesh["tp"], model.tp_plan())
    if layout.fsdp:
        from torch.distributed.fsdp import fully_shard
        dp_mesh = layout.mesh["dp"]
        for blocks in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for block in blocks:  # one all-gather per block, so only one block is unsharded at a time
                fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        return model
    if layout.world > 1 and layout.tp == 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[layout.local_rank] if device.startswith("cuda") else None)
    return model


def no_grad_sync(model, last_micro_step):
    """Gradient accumulation: reduce gradients across dp only on the last micro-step."""
    if hasattr(model, "no_sync") and not last_micro_step:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last_micro_step)
    import contextlib
    return contextlib.nullcontext()


def clip_grad_norm(parameters, max_norm):
    """Global gradient norm over plain and DTensor (sharded) gradients, then clipping.
    torch's clip_grad_norm_ cannot mix the two, which TP with replicated embeddings does."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in parameters if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    squares = []
    for g in grads:
        norm = torch.linalg.vector_norm(g)
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


def all_reduce(value, op):
    """A float reduced over all ranks (NCCL reduces on the GPU, gloo on the CPU)."""
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.item()


def any_rank(flag, layout):
    """True on every rank when the flag is set on any (all ranks must take the same branch, e.g. stop together)."""
    return flag if layout.world == 1 else bool(all_reduce(float(flag), dist.ReduceOp.MAX))


def all_mean(value, layout):
    """The mean of a float over all ranks (each dp rank saw a different slice of the batch)."""
    return value if layout.world == 1 else all_reduce(value, dist.ReduceOp.SUM) / layout.world


# ------------------------------------------------------------------------------------- sharded checkpoints

def save_sharded(out_dir, model, optimizer, meta, layout):
    """DCP checkpoint: every rank writes its shards to out_dir/ckpt_dcp, rank 0 the rest to ckpt_meta.pt.
    DCP reshards on load, so a run resumes on another world size, or on one process."""
    import shutil
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    final, tmp = os.path.join(out_dir, "ckpt_dcp"), os.path.join(out_dir, "ckpt_dcp.tmp")
    if layout.master and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    dist.barrier()
    if layout.master:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        torch.save({**meta, "sharded": True}, os.path.join(out_dir, "ckpt_meta.pt.tmp"))
        os.replace(os.path.join(out_dir, "ckpt_meta.pt.tmp"), os.path.join(out_dir, "ckpt_meta.pt"))
        stale = os.path.join(out_dir, "ckpt.pt")  # an older unsharded checkpoint must not shadow this one
        if os.path.exists(stale):
            os.remove(stale)
    dist.barrier()


def load_sharded(out_dir, model, optimizer=None):
    """Load a DCP checkpoint into a model (and optimizer) of any layout: sharded, DDP or one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, get_model_state_dict, set_model_state_dict
    path = os.path.join(out_dir, "ckpt_dcp")
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
