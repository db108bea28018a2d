"""Subcommands of ``pop-nemo``: each module here defines ``register(subparsers)``."""


def add_run_options(parser) -> None:
    """``--resume``/``--fresh`` and ``--nproc``: what every training command (train, dpo) takes."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--resume", action="store_true", help="require a checkpoint to resume from (default: resume if one exists)"
    )
    g.add_argument("--fresh", action="store_true", help="discard the run folder's checkpoints and outputs first")
    parser.add_argument(
        "--nproc",
        type=int,
        help="run as this many ranks on this node (torchrun); for policy.backend=megatron. "
        "Under torchrun or srun, leave it out",
    )
