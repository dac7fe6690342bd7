"""One exception hierarchy for the whole project.

Every error momtune raises on purpose derives from :class:`MomtuneError`, so callers can catch
one class. Input errors also derive from ``ValueError``/``TypeError`` so that generic code
that expects those still works.
"""
from __future__ import annotations


class MomtuneError(Exception):
    """Base class of every error momtune raises on purpose."""


class InputError(MomtuneError, ValueError):
    """An argument has the wrong rank, shape, dtype, range or value.

    The message names the argument, what was given and what is accepted.
    """


class ConfigError(MomtuneError, ValueError):
    """A model config, settings variable or kernel config is invalid."""


class SearchSpaceError(MomtuneError, ValueError):
    """A search-space TOML file is invalid (names the file and the key)."""


class LibraryError(MomtuneError):
    """A tuned library file is missing, corrupt, or does not match this machine."""


class StorageError(MomtuneError):
    """An Optuna storage URL cannot be opened or holds no usable study."""


class ReportError(MomtuneError):
    """A report cannot be built from the inputs given."""


class KernelError(MomtuneError):
    """A kernel launch failed or a kernel cannot run on the given inputs."""
