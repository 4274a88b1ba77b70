"""Scaling laws: plan an IsoFLOP sweep (grid), run it locally or as a Slurm job array (sweep),
fit L(N, D) and the isoFLOP minima (fit) and plot them (plots). `pretrain scaling ...` (cli)."""

from pretrain.errors import UserError


class ScalingError(UserError, ValueError):
    """A sweep or a table cannot be planned, launched or fitted; the message says what to do."""
