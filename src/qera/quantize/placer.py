"""Where the blocks of the sequential driver live while they are processed: background work,
side-stream prefetch, and the placers that move (or stream from shards) one block at a time."""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import torch
from torch import nn

from qera.util.errors import QeraError
from qera.io.lazy import WeightSource, canonical_device, materialize, release

log = logging.getLogger(__name__)


class Background:
    """``work()`` in a daemon thread; :meth:`join` waits for it and re-raises its exception."""

    def __init__(self, name: str, work) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(work,), name=name, daemon=True)
        self.thread.start()

    def _run(self, work) -> None:
        try:
            work()
        except BaseException as exc:  # re-raised in the caller's thread by join()
            self.error = exc

    def wait(self) -> BaseException | None:
        """Wait for the thread; return (and clear) its exception instead of raising it."""
        self.thread.join()
        error, self.error = self.error, None
        return error

    def join(self) -> None:
        error = self.wait()
        if error is not None:
            raise error


class Prefetch:
    """Block ``index`` being brought to ``device`` by a background thread while the current block computes.

    On CUDA the copies run on ``stream`` (a side stream), so they overlap the compute stream's
    kernels; :meth:`finish` makes the compute stream wait for them and marks the new tensors as used
    by it (so the caching allocator never hands their memory out early). On the CPU the thread
    still overlaps reading shards with compute.
    """

    def __init__(self, index: int, block: nn.Module, prefix: str, device: torch.device, work, stream=None) -> None:
        self.index, self.block, self.prefix, self.device, self.stream = index, block, prefix, device, stream
        self.event = torch.cuda.Event() if stream is not None else None
        self.job = Background(f"qera-prefetch-{index}", lambda: self._run(work))

    def _run(self, work) -> None:
        if self.stream is None:
            work()
        else:
            with torch.cuda.stream(self.stream):
                work()
                self.event.record(self.stream)

    def finish(self, block: nn.Module) -> None:
        self.job.join()  # re-raises the thread's error here
        if self.stream is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(self.event)
            for t in list(block.parameters()) + list(block.buffers()):
                if t.is_cuda:
                    t.record_stream(main)


class Placer:
    """Where a block lives while it is processed (``onload``) and after (``offload``).

    ``drops`` is True when offloading frees the block's weights (streaming): then the layers a
    block replaced are dropped too. ``prefetch(i + 1, ...)`` right after ``onload(i, ...)`` brings
    the next block in the background (CUDA; and shard reads for streaming), so one more block's
    weights are resident: :attr:`prefetches` says whether it does anything.

    On CUDA the offload runs in the background too (:attr:`offloads_in_background`): a thread copies
    the finished block home on a second side stream, after the compute stream's work on it, while
    the next block computes; the next offload, :meth:`drain` and :meth:`close` wait for it.
    """

    drops = False

    def __init__(self, device: torch.device, home: torch.device | None = None, overlap: bool = True) -> None:
        self.device, self.home = canonical_device(device), home
        self.overlap = overlap
        self._pending: Prefetch | None = None
        self._stream = None
        self._offload_stream = None
        self._offloading: Background | None = None
        self._homes: dict[int, dict[int, torch.Tensor]] = {}

    @property
    def offloads_in_background(self) -> bool:
        """CUDA device, CPU home: the copy home is a pageable device→host copy, which returns only
        when done, so the thread may drop the GPU tensors right after it (not so for a GPU home)."""
        return self.overlap and self.device.type == "cuda" and self.home is not None and self.home.type == "cpu"

    @property
    def prefetches(self) -> bool:
        return self.overlap and self.device.type == "cuda"

    def _side_stream(self):
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def prefetch(self, index: int, block: nn.Module, prefix: str) -> None:
        """Start bringing block ``index`` (the next one) to the device; :meth:`onload` waits for it."""
        if not self.prefetches or self._pending is not None:
            return
        here = self._device_of(block)
        if here == self.device:
            return
        self.home = here
        self._stash(index, block)
        self._pending = Prefetch(index, block, prefix, self.device,
                                 lambda: block.to(self.device, non_blocking=True), self._side_stream())

    def _take(self, index: int, block: nn.Module) -> bool:
        """Finish a prefetch of ``index``; True when the block is now in place."""
        p, self._pending = self._pending, None
        if p is None:
            return False
        p.finish(block)
        if p.index != index:
            raise QeraError(f"internal: block {p.index} was prefetched but block {index} was asked for")
        return True

    def _stash(self, index: int, block: nn.Module) -> None:
        """Keep the home copies of the block's parameters: layers replaced while on the device go
        back to them at offload with no device→host copy (the model's weights stay where they were)."""
        self._homes[index] = {id(p): p.data for p in block.parameters()}

    def onload(self, index: int, block: nn.Module, prefix: str) -> None:
        self._take(index, block)
        if self._device_of(block) != self.device:
            self.home = self._device_of(block)
            self._stash(index, block)
            block.to(self.device)

    def offload(self, index: int, block: nn.Module, prefix: str, replaced: Sequence[nn.Module] = ()) -> None:
        """Send the block home; ``replaced`` are the original layers swapped out of it while on the device."""
        homes = self._homes.pop(index, {})
        if self.home is None or self.home == self.device:
            return
        for module in replaced:  # no copy: the original layers go back to their home tensors
            for p in module.parameters():
                p.data = homes[id(p)] if id(p) in homes else p.data.to(self.home)
            module.to(self.home)  # buffers, if any
        if not self.offloads_in_background:
            block.to(self.home)
            return
        try:
            self.drain()  # the previous block's copy (it had a whole block's compute to finish)
        finally:  # this block goes home even when the previous copy failed
            self._send_home_in_background(index, block)

    def _send_home_in_background(self, index: int, block: nn.Module) -> None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # the block's last kernels on the compute stream
        if self._offload_stream is None:
            self._offload_stream = torch.cuda.Stream(self.device)
        stream, home = self._offload_stream, self.home

        def send_home() -> None:  # a pageable copy returns when done: the GPU tensors are then free to go
            stream.wait_event(done)
            with torch.cuda.stream(stream):
                block.to(home)

        self._offloading = Background(f"qera-offload-{index}", send_home)

    def drain(self) -> None:
        """Wait for a background offload; re-raises its error. An interrupted wait keeps the job, so
        :meth:`close` still waits for it."""
        job = self._offloading
        if job is None:
            return
        try:
            job.join()
        finally:
            if not job.thread.is_alive():
                self._offloading = None

    def close(self) -> None:
        """Wait for background work and never raise (it runs while another error may be on its way:
        call :meth:`drain` first on the normal path). After an error, a prefetch still running sends
        its block home again."""
        try:
            self.drain()
            p, self._pending = self._pending, None
            if p is not None:
                p.job.wait()  # its error, if any, is not ours to raise here: the block just goes home
                if p.stream is not None:
                    p.stream.synchronize()
                self.offload(p.index, p.block, p.prefix)
                self.drain()
        except Exception:
            log.exception("sending blocks home failed while closing the placer")

    @staticmethod
    def _device_of(block: nn.Module) -> torch.device:
        p = next(iter(block.parameters()), None)
        return p.device if p is not None else torch.device("cpu")


class StreamingPlacer(Placer):
    """Reads a block's weights from the shards on onload (or ahead, by :meth:`prefetch`); back to meta on
    offload (unless ``keep``)."""

    def __init__(self, source: WeightSource, device: torch.device, keep: bool = False,
                 dtype: torch.dtype | None = None, overlap: bool = True) -> None:
        super().__init__(device, overlap=overlap)
        self.source, self.keep, self.dtype = source, keep, dtype
        self.drops = not keep
        self.bytes_read = 0

    @property
    def prefetches(self) -> bool:
        return self.overlap  # reading shards overlaps compute on the CPU too

    def _read(self, block: nn.Module, prefix: str) -> None:
        self.bytes_read += materialize(block, prefix, self.source, self.device, self.dtype)

    def prefetch(self, index: int, block: nn.Module, prefix: str) -> None:
        if not self.prefetches or self._pending is not None:
            return
        self._pending = Prefetch(index, block, prefix, self.device, lambda: self._read(block, prefix),
                                 self._side_stream())

    def onload(self, index: int, block: nn.Module, prefix: str) -> None:
        if not self._take(index, block):
            self._read(block, prefix)
        self.source.close()  # unmap the shards: pages read for this block leave this process's RSS

    def offload(self, index: int, block: nn.Module, prefix: str, replaced: Sequence[nn.Module] = ()) -> None:
        if self.keep:
            if self.device.type != "cpu":
                block.to("cpu")
                for module in replaced:
                    module.to("cpu")
        else:
            release(block)
            for module in replaced:  # the fp layers the block replaced go too
                release(module)
