"""Quiet third-party logs unless ``--verbose``: a module of its own, so that a command that needs only this (say,
``serve-models``) does not import the federation stack."""

from __future__ import annotations

import logging
import warnings


def quiet_libraries(verbose: bool) -> None:
    """Unless ``verbose``: hide transformers' load reports and weight-loading bars, Flower's and Ray's warnings and
    INFO logs."""
    if verbose:
        return
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight loading and saving; training bars stay
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
