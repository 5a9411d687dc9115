"""The modulart error hierarchy.

Every error the library raises on bad input derives from :class:`ModulartError`, so callers can
catch the whole family at once; each also derives from the closest built-in exception
(``ValueError``, ``TypeError``, ``LookupError``) so generic handlers keep working.

Example:
    >>> from modulart.core.errors import ModulartError, SelectorError
    >>> issubclass(SelectorError, ModulartError) and issubclass(SelectorError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "ArtifactNotFoundError",
    "CompiledHooksBypassedError",
    "CompiledHooksWarning",
    "CompositionError",
    "ConcurrentUseError",
    "ConfigError",
    "ConvergenceError",
    "HookError",
    "HooksNotFiredError",
    "IncompatibleArtifactError",
    "InvalidArgumentError",
    "InvalidStateError",
    "KeyNotFoundError",
    "ModulartError",
    "NonFiniteError",
    "OperatorExistsError",
    "OperatorNotFoundError",
    "OutOfRangeError",
    "RankMismatchError",
    "SelectorError",
    "ShapeError",
    "ShardedModelError",
    "UnknownArtifactOperatorError",
    "UnsafePathError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
]


class ModulartError(Exception):
    """Base class of every error raised by modulart."""


class UnsupportedModuleError(ModulartError, TypeError):
    """A module (or a whole model) has no structure modulart knows how to read."""


class SelectorError(ModulartError, ValueError):
    """A selector or a layer specification matched nothing, or is malformed."""


class ConfigError(ModulartError, ValueError):
    """A configuration field has a bad value; the message names the field."""


class ShapeError(ModulartError, ValueError):
    """A tensor does not have the shape a view or operator expects."""


class IncompatibleArtifactError(ModulartError):
    """A saved artefact does not fit the model or the operator it is loaded into."""


class HookError(ModulartError, RuntimeError):
    """A hook could not be installed or removed."""


class HooksNotFiredError(HookError):
    """Hooks that were expected to run did not (e.g. a fused kernel bypassed the module)."""


class OperatorNotFoundError(ModulartError, LookupError):
    """No operator is registered under the requested name."""


class UnsupportedOperationError(ModulartError, NotImplementedError):
    """The operator does not implement this optional part of the lifecycle (e.g. ``merge_``)."""


class InvalidArgumentError(ModulartError, TypeError):
    """An argument has the wrong type (e.g. neither a model nor a checkpoint directory)."""


class OutOfRangeError(ModulartError, IndexError):
    """An index (a layer, an expert, a position) lies outside the range that exists."""


class KeyNotFoundError(ModulartError, KeyError):
    """A name (e.g. a patch id) is not among the known ones; the message lists them."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InvalidStateError(ModulartError, RuntimeError):
    """The call needs a state the object is not in (e.g. statistics before any forward)."""


class ConvergenceError(ModulartError, RuntimeError):
    """A numerical procedure (e.g. the balanced assignment) did not converge."""


class OperatorExistsError(ModulartError, ValueError):
    """An operator name (or config class) is already registered; pass ``override=True`` to replace it."""


class CompositionError(UnsupportedOperationError):
    """Two operators cannot share a module this way; the message names the operator already there."""


class UnsafePathError(ModulartError, ValueError):
    """Writing there could destroy files modulart did not write (or the input being read)."""


class RankMismatchError(ModulartError, ValueError):
    """The ranks of a distributed model were given different inputs to a step they must run together."""


class NonFiniteError(ConvergenceError):
    """A loss, gradient or weight is NaN or infinite where a finite value is needed; nothing was changed."""


class ArtifactNotFoundError(IncompatibleArtifactError, FileNotFoundError):
    """The file or folder an artefact, report or checkpoint should be read from does not exist."""


class CompiledHooksBypassedError(HooksNotFiredError):
    """Hooks did not fire because torch.compile'd code that predates them ran instead of the module."""


class CompiledHooksWarning(UserWarning):
    """Hooks were added to modules after torch.compile had compiled code; modulart reset the compile caches."""


class ShardedModelError(UnsupportedModuleError):
    """An operator was applied to an already sharded (FSDP2 / DTensor) model; apply it before sharding."""


class UnknownArtifactOperatorError(OperatorNotFoundError, IncompatibleArtifactError):
    """An artefact names an operator that is neither built in nor installed (it is never imported)."""


class ConcurrentUseError(InvalidStateError):
    """Two threads used state that belongs to one training loop at the same time (e.g. a MIGU step)."""
