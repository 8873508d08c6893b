"""ActivationOffload's logic on the CPU: CUDA's streams and events as stand-ins and an offloader whose
device is the CPU (host copies are plain CPU tensors), so that what crosses, the bound on copies in
flight and the way back run without a GPU, in one process (a pytest fixture) or in gloo workers
(parallel_harness: ``run_jobs(..., cpu_offload=True)``). The real offloader runs the same code on
CUDA; only the stream objects and the device differ."""

import contextlib
from typing import Callable

import torch

from k2train.parallel.activation_memory import ActivationOffload


class Event:
    """torch.cuda.Event's stand-in: remembers whether anything recorded it."""

    def __init__(self, *args, **kwargs):
        self.recorded = False

    def record(self, stream=None):
        self.recorded = True


class Stream:
    """torch.cuda.Stream's stand-in: every copy is synchronous; waiting on an event nothing
    recorded is the bug it catches."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        assert event.recorded, "a stream waits on an event nothing recorded"


def install_stand_in_streams(setattr_: Callable = setattr) -> None:
    """Replace torch.cuda's streams and events by the stand-ins (``setattr_``: pytest's
    ``monkeypatch.setattr`` in a test, the builtin in a worker process that ends with the test)."""
    compute = Stream()
    setattr_(torch.cuda, "Stream", Stream)
    setattr_(torch.cuda, "Event", Event)
    setattr_(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    setattr_(torch.cuda, "current_stream", lambda device=None: compute)
    setattr_(torch.Tensor, "record_stream", lambda self, stream: None)


class CpuOffload(ActivationOffload):
    """The offloader with the CPU as its device and no size floor (a tiny model's tensors are far
    under the GPU's 1 MiB), recording how many blocks hold their originals when each block's
    forward ends and how each storage came back. ``instances``: every one made in this process."""

    device_type = "cpu"
    instances: list = []

    def __init__(self):
        super().__init__(min_bytes=0)
        self.blocks: list = []
        self.holding: list[int] = []  # blocks whose originals are alive, at the end of each block's forward
        self.handed_back = self.copied_back = 0
        CpuOffload.instances.append(self)

    @contextlib.contextmanager
    def block(self, handles):
        self.blocks.append(handles)
        with super().block(handles):
            yield
        self.holding.append(sum(any(e.src is not None for e in b) for b in self.blocks))

    def _fetch(self, entries):
        waiting = [e for e in entries if e.gpu is None and e.views]
        self.handed_back += sum(e.src is not None for e in waiting)
        self.copied_back += sum(e.src is None for e in waiting)
        super()._fetch(entries)

    def stats(self) -> dict:
        """What crossed and what is still held (every entry of every block, once its backward ran)."""
        return {
            "bytes_offloaded": self.bytes_offloaded, "blocks": len(self.blocks),
            "max_holding": max(self.holding, default=0), "handed_back": self.handed_back,
            "copied_back": self.copied_back,
            "left": sum(not (e.views == 0 and e.gpu is None and e.host is None and e.src is None)
                        for b in self.blocks for e in b),
        }


def install_cpu_offload(setattr_: Callable = setattr) -> None:
    """The stand-in streams, and the trainer's offloader (``parallel.offload_activations``) made
    as a :class:`CpuOffload`."""
    import k2train.parallel.parallelize as parallelize

    install_stand_in_streams(setattr_)
    setattr_(parallelize, "ActivationOffload", CpuOffload)
