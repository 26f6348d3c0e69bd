"""Process groups for the sharded evaluation: torchrun, ``--nproc K`` (local spawn) or one process.

The evaluation only exchanges tiny Python objects (error messages) and barriers between ranks —
every rank writes its own results to disk and rank 0 reads them back — so the group always uses
the ``gloo`` backend, which carries objects on CPU and GPU machines alike (no tensor ever goes
through a collective, so NCCL would add nothing but a CUDA dependency to the control path).

``Dist.agree(error)`` is the one synchronisation point used everywhere: every rank calls it with
its own exception (or None); if any rank failed, all of them raise, so no rank is left waiting at
a barrier for a rank that died.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from diffrestore.errors import is_user_error

#: ranks of one evaluation may wait for each other for a long time (uneven resume points)
TIMEOUT = datetime.timedelta(hours=24)


class RankError(RuntimeError):
    """Another rank failed; carries its one-line message."""


class RankUserError(ValueError):
    """Another rank failed with a user error (bad input); a ValueError so the CLI prints one line."""


def _describe(err: BaseException) -> tuple[str, bool]:
    """(one-line message, whether the CLI reports it as a user error)."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    return msg, is_user_error(err)


class Dist:
    """Rank, world size and the two collectives the evaluation needs (no-ops for one process)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self._owns_group = owns_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def agree(self, err: BaseException | None) -> None:
        """Collective: raise on every rank if any rank passes an error (its own error on that rank)."""
        if self.world > 1:
            mine = None if err is None else _describe(err)
            everyone: list = [None] * self.world
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [None]
        if err is not None:
            raise err
        for r, item in enumerate(everyone):
            if item is not None:
                msg, user = item
                raise (RankUserError if user else RankError)(f"rank {r}: {msg}")

    def close(self) -> None:
        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self._owns_group = False


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def from_env() -> Dist:
    """The group torchrun set up through the environment (one process: a trivial Dist)."""
    if not launched_by_torchrun():
        return Dist()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
        return Dist(rank, world, local, owns_group=True)
    return Dist(rank, world, local)


def _die_with_parent(parent_pid: int) -> None:
    """Make this process get SIGTERM when its parent dies (Linux), so a killed ``evaluate --nproc`` leaves
    no workers behind computing into a run nobody reads; exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(1)


def _spawn_entry(rank: int, world: int, init_file: str, err_dir: str, parent_pid: int, fn, args) -> None:
    _die_with_parent(parent_pid)
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT
        )
        dist = Dist(rank, world, rank, owns_group=True)
        try:
            fn(dist, *args)
        finally:
            dist.close()
    except BaseException as e:  # reported to the parent through a file, then exit non-zero
        msg, user = _describe(e)
        if not user and not isinstance(e, (RankError, RankUserError)):
            traceback.print_exc()
        Path(err_dir, f"rank{rank}").write_text(f"{int(user)}\t{msg}\n")
        sys.exit(1)


def spawn(fn, nproc: int, *args) -> None:
    """Run ``fn(dist, *args)`` in ``nproc`` fresh local processes joined in one gloo group.

    ``fn`` must be importable (a module-level function). A failure in any rank is raised here as
    one exception with that rank's one-line message (a ValueError when it was a user error).
    """
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix="diffrestore-dist-")
    try:
        init_file = os.path.join(tmp, "init")
        err_dir = os.path.join(tmp, "errors")
        os.mkdir(err_dir)
        died = None
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")  # "Terminating process ..." after a failure
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        try:
            mp.start_processes(_spawn_entry, args=(nproc, init_file, err_dir, os.getpid(), fn, args), nprocs=nproc,
                               join=True, start_method="spawn")  # fmt: skip
        except (mp.ProcessExitedException, mp.ProcessRaisedException) as e:
            died = e
        finally:
            spawn_log.setLevel(level)
        reports = sorted(Path(err_dir).iterdir())
        if reports:
            # prefer a rank that failed first-hand over ranks that only relay another rank's failure
            parsed = [p.read_text().rstrip("\n").split("\t", 1) for p in reports]
            user, msg = next((x for x in parsed if not x[1].startswith("rank ")), parsed[0])
            raise (RankUserError if user == "1" else RankError)(msg)
        if died is not None:
            raise RankError(f"an evaluation worker died: {str(died).splitlines()[0]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
