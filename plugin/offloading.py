"""Where the frozen denoiser's blocks keep their weights between uses, and how they come to compute.

`offload_blocks: N`: the last N of its repeated blocks (the blocks regional compilation compiles) keep their
frozen weights in host memory, pinned where the accelerator is a CUDA GPU. `base_storage_dtype: fp8_e4m3`: every
repeated block keeps them in float8 (on the accelerator, or in host memory for the offloaded ones), computed in
the run's dtype. Either way a block's weights as stored are its stored copy, and the block gets a compute copy
(on the accelerator, in the compute dtype) only while it runs, forward and backward; the next block's copy comes
in on a side stream while the current one computes (a prefetch window of one block). LoRA weights, their
optimizer state and everything outside the blocks stay as they are.

Why not Diffusers' group offloading or layerwise casting: their hooks drop a block's (or layer's) compute weights
after its forward, which serves inference; a training step's backward needs them again, in reverse block order
(kohya's `--blocks_to_swap` swaps for this reason). Here a block's compute copy comes back when the gradient of
its output arrives (a hook on the output tensors, before the block's backward or its gradient-checkpointing
recompute runs); the blocks whose backward began before it are done then and leave, and the block before it is
prefetched. At the end of backward every block is back to its stored copy only.

A frozen weight is never written, so leaving is free: the compute copy is dropped and the parameter points at the
stored copy again; coming back copies the stored values (on a CPU-only run a real copy too, so what a step computes
with is always what the stored copy held when the block came in). `counts` and `peak_resident` instrument it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from .compilation import repeated_blocks
from .errors import ConfigError


STORAGE_DTYPES = {"none": None, "fp8_e4m3": torch.float8_e4m3fn}


def check_offloading(cfg) -> None:
    """The combinations block storage cannot do, refused by name before any weights load."""
    for setting, active in (("offload_blocks", cfg.offload_blocks != 0), ("base_storage_dtype", cfg.base_storage_dtype != "none")):
        if not active:
            continue
        if cfg.shard_base_model:
            raise ConfigError(f"{setting}: a sharded base (shard_base_model) already spreads the frozen weights over the processes; use one of the two")
        if cfg.torch_compile != "none":
            raise ConfigError(f"{setting}: a compiled block holds its weights as graph inputs that are swapped under it here; set torch_compile "
                              f"to none or turn {setting} off")  # fmt: skip
    if cfg.offload_blocks and cfg.base_quantization == "nf4":
        raise ConfigError("offload_blocks: bitsandbytes' nf4 weights cannot be moved block by block; use base_quantization int8 or fp8, or none")
    if cfg.base_storage_dtype != "none" and cfg.base_quantization != "none":
        raise ConfigError(f"base_storage_dtype: the base is already stored quantised (base_quantization {cfg.base_quantization!r}); use one of the two")


def check_block_count(cfg, description) -> None:
    """`offload_blocks` within the denoiser's repeated blocks, counted in its description (no weights read)."""
    count = description.denoiser_block_count
    if cfg.offload_blocks > count:
        raise ConfigError(f"offload_blocks: {cfg.offload_blocks} is more than the {count} blocks this denoiser has; use at most {count}")


@dataclass
class OffloadCounts:
    """Per offloaded block (forward order), how many times its compute copy came in and left."""

    onloads: list[int] = field(default_factory=list)
    offloads: list[int] = field(default_factory=list)


class BlockOffloader:
    """Keeps `blocks` in their stored copies (in host memory where `on_host`, in `storage_dtype` where given),
    bringing each to `device`, in its own dtype, only while it computes; see the module docstring."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, on_host: list[bool], storage_dtype: torch.dtype | None = None,
                 checkpointing: bool = False):  # fmt: skip
        self.blocks, self.device, self.on_host, self.storage_dtype = blocks, torch.device(device), on_host, storage_dtype
        # Without gradient checkpointing, autograd would keep views of the compute copies (F.linear saves weight.t())
        # until backward; a block's forward then saves its weights by reference to their parameters instead. With it,
        # checkpointing's own saved-tensor hooks must stay the innermost, and save no weights anyway.
        self.by_reference = not checkpointing
        self._saving: torch.autograd.graph.saved_tensors_hooks | None = None
        self.stored: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        frozen = [[p for p in block.parameters() if not p.requires_grad] for block in blocks]
        self.compute_dtypes = {id(p): p.dtype for parameters in frozen for p in parameters}  # as the model computes with them
        host_copies = iter(_host_copies([p.data for parameters, host in zip(frozen, on_host) if host for p in parameters], storage_dtype,
                                        pin=self.device.type == "cuda"))  # fmt: skip
        for parameters, host in zip(frozen, on_host):
            self.stored.append([(p, next(host_copies) if host else p.data.to(self.device, dtype=storage_dtype or p.dtype)) for p in parameters])
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event | None] = {}  # resident blocks: the event their copy-in completes
        self.order: list[int] = []  # the blocks in the order the first forward ran them (a UNet's differs from its modules')
        self.in_backward: set[int] = set()
        self.counts = OffloadCounts([0] * len(blocks), [0] * len(blocks))
        self.peak_resident = 0
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda module, args, i=index: self._before_forward(i))
            block.register_forward_hook(lambda module, args, output, i=index: self._after_forward(i, output), always_call=True)
        self._leave_all()

    # ----- moving one block ---------------------------------------------------------------------------
    def _onload(self, index: int) -> None:
        """Start copying block `index`'s stored weights to the device (on the side stream where there is one)."""
        if index in self.ready:
            return
        stream = self.stream
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for parameter, stored in self.stored[index]:
                parameter.data = stored.to(self.device, dtype=self.compute_dtypes[id(parameter)], non_blocking=True, copy=True)
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self.ready[index] = event
        self.counts.onloads[index] += 1
        self.peak_resident = max(self.peak_resident, len(self.ready))

    def _wait(self, index: int) -> None:
        """Block `index` on the device, its copy finished before the compute stream reads it."""
        self._onload(index)
        event = self.ready[index]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for parameter, _ in self.stored[index]:
                parameter.data.record_stream(torch.cuda.current_stream(self.device))
            self.ready[index] = None

    def _offload(self, index: int) -> None:
        """Drop block `index`'s compute copy: its parameters point at the stored copy again."""
        if index not in self.ready:
            return
        for parameter, stored in self.stored[index]:
            parameter.data = stored
        del self.ready[index]
        self.counts.offloads[index] += 1

    def _leave_all(self) -> None:
        for index in list(self.ready):
            self._offload(index)
        for stored in self.stored:  # and the blocks never brought in since the stored copies were made
            for parameter, copy in stored:
                parameter.data = copy
        self.in_backward.clear()

    # ----- the hooks ------------------------------------------------------------------------------------
    def _neighbour(self, index: int, step: int) -> int | None:
        """The block run after (step 1) or before (step -1) block `index` in the forward order, once known."""
        if len(self.order) < len(self.blocks):
            return None
        position = self.order.index(index) + step
        return self.order[position] if 0 <= position < len(self.order) else None

    def _before_forward(self, index: int) -> None:
        in_backward_pass = torch._C._current_graph_task_id() != -1
        if in_backward_pass and index in self.in_backward:  # gradient checkpointing's recompute inside the block's backward
            self._wait(index)
            return
        if self.in_backward and not in_backward_pass:  # a backward that failed midway never ran its end callback
            self._leave_all()
        if index not in self.order:
            self.order.append(index)
        following = self._neighbour(index, 1)
        for other in [i for i in self.ready if i not in (index, following)]:  # a previous pass's left over
            self._offload(other)
        self._wait(index)
        if following is not None:
            self._onload(following)
        if self.by_reference and torch.is_grad_enabled():
            self._saving = self._saved_by_reference(index)
            self._saving.__enter__()

    def _saved_by_reference(self, index: int) -> torch.autograd.graph.saved_tensors_hooks:
        """Saved-tensor hooks under which a tensor sharing a compute copy's memory (the weight, or a view of it such
        as F.linear's weight.t()) is saved as its parameter and view geometry, and read back as that view of
        whatever the parameter holds when backward needs it (the compute copy brought back by then)."""
        owners = {_storage_address(parameter.data): parameter for parameter, _ in self.stored[index]}
        owners.pop(None, None)

        def pack(tensor):
            owner = owners.get(_storage_address(tensor))
            return tensor if owner is None else (owner, tensor.size(), tensor.stride(), tensor.storage_offset())

        def unpack(saved):
            return saved if isinstance(saved, torch.Tensor) else saved[0].data.as_strided(*saved[1:])

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)

    def _after_forward(self, index: int, output) -> None:
        if self._saving is not None:
            self._saving.__exit__(None, None, None)
            self._saving = None
        if torch._C._current_graph_task_id() != -1 and index in self.in_backward:
            return
        tensors = [t for t in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(t, torch.Tensor) and t.requires_grad]
        if torch.is_grad_enabled():
            for tensor in tensors:
                tensor.register_hook(lambda grad, i=index: None if i in self.in_backward else self._before_backward(i))
        self._offload(index)

    def _before_backward(self, index: int) -> None:
        """The gradient of block `index`'s output is here: the blocks after it are done; it comes in, the one
        before it is prefetched."""
        if not self.in_backward:  # the first offloaded block of this backward: tidy up when the pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self._leave_all)
        self.in_backward.add(index)
        for done in [i for i in self.ready if i in self.in_backward and i != index]:
            self._offload(done)
        self._wait(index)
        preceding = self._neighbour(index, -1)
        if preceding is not None:
            self._onload(preceding)

    # ----- placement --------------------------------------------------------------------------------------
    @contextmanager
    def held_back(self):
        """While the rest of the model moves to the device (`family.to`), the offloaded weights stay in host memory:
        they are empty stand-ins meanwhile, so the move neither copies nor allocates them."""
        for stored in self.stored:
            for parameter, _ in stored:
                parameter.data = torch.empty(0, dtype=parameter.dtype)
        try:
            yield
        finally:
            self._leave_all()

    def summary(self) -> str:
        """What is stored where, for the log."""
        sizes = [sum(copy.numel() * copy.element_size() for _, copy in stored) for stored in self.stored]
        host = [size for size, on_host in zip(sizes, self.on_host) if on_host]
        parts = [f"the denoiser's last {len(host)} blocks offloaded, {sum(host) / 2**30:.2f} GiB of frozen weights in host memory"] if host else []
        if self.storage_dtype is not None:
            parts.append(f"{len(self.blocks)} blocks' weights stored in {str(self.storage_dtype).removeprefix('torch.')} ({sum(sizes) / 2**30:.2f} GiB)")
        return "; ".join(parts) + f"; a block is on {self.device} in its compute dtype only while it runs"


def _storage_address(tensor: torch.Tensor) -> int | None:
    """The address of a tensor's memory; None for a tensor subclass without plain storage (a quantised weight, whose
    saved copies are then kept by autograd as they are)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):
        return None


def _host_copies(weights: list[torch.Tensor], dtype: torch.dtype | None, pin: bool) -> list[torch.Tensor]:
    """The weights' stored copies in host memory, cast to `dtype`: plain tensors carved out of one buffer, pinned as a
    whole (`pin`: copies to a CUDA GPU then run asynchronously) by registering it with CUDA, as PyTorch's checkpoint
    stager does, since PyTorch's pinned allocator rounds each allocation up to a power of two (up to twice the
    memory); tensor subclasses (quantised weights) each copied and pinned on their own."""
    plain = [w for w in weights if type(w) is torch.Tensor]
    sizes = [-(-w.numel() * (dtype or w.dtype).itemsize // 64) * 64 for w in plain]  # 64-byte aligned
    buffer = torch.empty(sum(sizes), dtype=torch.uint8)
    if pin and buffer.numel():
        error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 1))  # 1: cudaHostRegisterPortable
        if error:
            warnings.warn(f"offloaded weights: pinning {buffer.numel() / 2**30:.1f} GiB of host memory failed (cudaError {error}); "
                          "copies to the GPU run synchronously")  # fmt: skip
    copies, offset = {}, 0
    for weight, size in zip(plain, sizes):
        stored_dtype = dtype or weight.dtype
        copies[id(weight)] = buffer[offset : offset + weight.numel() * stored_dtype.itemsize].view(stored_dtype).view(weight.shape)
        copies[id(weight)].copy_(weight)
        offset += size
    return [copies[id(w)] if id(w) in copies else _pinned(w.to("cpu", dtype=dtype or w.dtype), pin) for w in weights]


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin else tensor


def store_blocks(denoiser: torch.nn.Module, offload_count: int, storage_dtype: str, device: torch.device, checkpointing: bool) -> BlockOffloader | None:
    """The denoiser's repeated blocks under block storage: the last `offload_count` in host memory, every one in
    `storage_dtype` (a STORAGE_DTYPES name) where it is not "none"; None when neither is asked for."""
    dtype = STORAGE_DTYPES[storage_dtype]
    if offload_count == 0 and dtype is None:
        return None
    blocks = repeated_blocks(denoiser)
    first_offloaded = len(blocks) - offload_count
    stored = blocks if dtype is not None else blocks[first_offloaded:]
    return BlockOffloader(stored, device, [blocks.index(block) >= first_offloaded for block in stored], dtype, checkpointing)
