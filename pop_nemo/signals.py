"""Stop at a step boundary on a signal: checkpoint, then exit so that Slurm can requeue the job.

Slurm sends ``SIGUSR1`` ahead of the time limit (``#SBATCH --signal=B:USR1@<seconds>``); the
batch script of ``slurm/*.sh`` forwards it to the trainer. The loop asks :meth:`StopRequest.poll`
once per step, after the update: when a stop was requested it saves a checkpoint and
:meth:`StopRequest.exit_if_stopped` ends the process with :data:`EXIT_REQUEUE`, which the batch
script answers with ``scontrol requeue``. The rerun resumes from that checkpoint. In the loop::

    stop = signals.install()                 # first thing in train(): a signal during model loading counts
    ...
    if stop.poll() or (step + 1) % cfg.trainer.save_every == 0 or step + 1 == cfg.trainer.max_steps:
        ckpt.save(...)
    stop.exit_if_stopped(step + 1, final=step + 1 == cfg.trainer.max_steps)

With several ranks (``torch.distributed`` initialised) ``poll`` is collective: every rank stops
after the same step even if the signal reached them on different sides of a step boundary.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on request, checkpoint written, run again to resume


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.stopped = False

    def _handler(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        """A signal arrived in this process (not yet agreed with other ranks)."""
        return self.signal_name is not None

    def poll(self) -> bool:
        """Whether to stop after this step; call it at the same point on every rank."""
        flag = self.requested
        try:
            import torch
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                device = "cuda" if dist.get_backend() == "nccl" else "cpu"
                t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                flag = bool(t.item())
        except ImportError:
            pass
        self.stopped = flag
        return flag

    def exit_if_stopped(self, step: int, final: bool = False) -> None:
        """After the checkpoint of ``step``: exit with :data:`EXIT_REQUEUE` if :meth:`poll` said
        stop, unless this was the ``final`` step (then the run is simply done)."""
        if not self.stopped or final:
            return
        from pop_nemo.run_output import console

        why = self.signal_name or "a signal on another rank"
        console.print(
            f"[yellow]stopping after step {step} on {why}[/]: checkpoint written; "
            "run the same command (or requeue the job) to resume"
        )
        raise SystemExit(EXIT_REQUEUE)


def install(signals: Iterable[str] = ("SIGUSR1",)) -> StopRequest:
    """Route ``signals`` to a :class:`StopRequest`. Python sets handlers in the main thread only:
    elsewhere (a loop run from a worker thread) nothing is installed and no stop is requested."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        return stop
    for name in signals:
        signal.signal(getattr(signal, name), stop._handler)
    return stop
