"""Options of the introspection analyses: modulart's defaults, or the paper's notebooks exactly.

Lo et al.'s reference code (two Jupyter notebooks, github.com/kamanphoebe/Look-into-MoEs) computes
a few analyses differently from modulart's defaults. Each difference is one field of
:class:`IntrospectOptions` (off by default); :meth:`IntrospectOptions.reference` switches them all
to the notebooks' behaviour. Pass the options (or the string ``"reference"``) as ``options=`` to
:func:`~modulart.introspect.weights`, :func:`~modulart.introspect.routing` and
:func:`~modulart.introspect.report` (``modulart inspect --reference`` on the command line).

- ``s3_per_matrix``: S3 finds one neuron permutation per matrix (three Kendall τ per expert pair,
  one each for act, up and down, as the notebooks) instead of one permutation of the concatenated
  neuron (act row, up row, down column).
- ``s4_round``: each layer's R² is rounded to this many decimals before the mean over layers (the
  notebooks' ``round(r**2, 2)``).
- ``pca_dense`` / ``pca_shared``: the dense reference ``F`` (and the shared experts) are points of
  the S5 PCA, next to the routed experts (the notebooks put Mistral-7B's FFN into Mixtral's PCA).
- ``pca_ddof``: the expert PCA z-scores each coordinate with the standard deviation of divisor
  ``n - ddof`` (0: population, modulart's default; 1: ``torch.std``'s sample deviation, the
  notebooks'); with ``ddof=0`` the coordinates are ``√(n/(n−1))`` times the notebooks'.
- ``neuron_pca_zscore`` / ``neuron_pca_sample``: the neuron PCA standardises every feature (mean 0,
  sample standard deviation 1 over all neurons, as the notebooks) instead of only centring it; and
  uses this many sampled neurons per member (None: all of them, as the notebooks).
- ``d1_dense`` / ``d1_shared``: D1 compares the outputs of the shared experts and of the dense
  reference ``F`` (its FFN run in its own forward on the same inputs) with the routed experts'.
- ``d2_ranks``: ``"descending"`` (modulart: rank 1 is the largest score / norm) or ``"ascending"``
  (the notebooks' ``np.argsort``: rank 1 is the smallest), i.e. the count matrix rotated by 180°.

Example:
    >>> from modulart.introspect.options import IntrospectOptions, resolve_options
    >>> IntrospectOptions().s3_per_matrix, IntrospectOptions.reference().s4_round
    (False, 2)
    >>> resolve_options("reference") == IntrospectOptions.reference()
    True
    >>> IntrospectOptions(d2_ranks="up")
    Traceback (most recent call last):
    ...
    modulart.core.errors.ConfigError: IntrospectOptions.d2_ranks = 'up': must be one of ('descending', 'ascending')
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeAlias

from modulart.core.errors import ConfigError
from modulart.core.operator import OperatorConfig, option

__all__ = ["D2_RANKS", "IntrospectOptions", "OptionsArg", "resolve_options"]

D2_RANKS = ("descending", "ascending")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass
class IntrospectOptions(OperatorConfig):
    """How the analyses are computed where the reference notebooks differ from modulart's defaults."""

    s3_per_matrix: bool = option(
        False, "S3: one permutation (and one Kendall τ) per matrix, as the notebooks; False: one joint permutation"
    )
    s4_round: int | None = option(
        None, "S4: round each layer's R² to this many decimals before averaging (notebooks: 2); None: no rounding"
    )
    pca_dense: bool = option(False, "S5: the dense reference F is a point of the expert and neuron PCA")
    pca_shared: bool = option(False, "S5: the shared experts are points of the PCA (expert PCA: same shape only)")
    pca_ddof: int = option(
        0, "S5 expert PCA: z-score divisor n - ddof; 0 population (default), 1 sample std (notebooks)"
    )
    neuron_pca_zscore: bool = option(
        False, "S5 neuron PCA: standardise every feature (sample std, notebooks); False: centre only"
    )
    neuron_pca_sample: int | None = option(
        256, "S5 neuron PCA: neurons sampled per member by default; None: all of them (notebooks)"
    )
    d1_dense: bool = option(False, "D1: include the dense reference F (needs dense= a live dense model)")
    d1_shared: bool = option(False, "D1: include the shared experts' outputs")
    d2_ranks: str = option(
        "descending", "D2 ranks: 'descending' (rank 1 = largest, default) or 'ascending' (notebooks' argsort)"
    )

    @classmethod
    def reference(cls, **overrides: Any) -> IntrospectOptions:
        """The notebooks' behaviour: every option above switched to what the reference code computes.

        ``s3_per_matrix=True``, ``s4_round=2``, ``pca_dense=True`` (F is a PCA point when a dense
        reference is given), ``pca_shared=False`` (the notebooks' DeepSeek PCA has routed experts
        only), ``pca_ddof=1``, ``neuron_pca_zscore=True``, ``neuron_pca_sample=None`` (all neurons),
        ``d1_dense=True`` (when a live dense model is given), ``d1_shared=True``,
        ``d2_ranks="ascending"``.

        Args:
            overrides: fields to change on top of the reference values (validated).

        Example:
            >>> IntrospectOptions.reference(d2_ranks="descending").d2_ranks
            'descending'
        """
        base = cls(
            s3_per_matrix=True,
            s4_round=2,
            pca_dense=True,
            pca_shared=False,
            pca_ddof=1,
            neuron_pca_zscore=True,
            neuron_pca_sample=None,
            d1_dense=True,
            d1_shared=True,
            d2_ranks="ascending",
        )
        return base.replace(**overrides) if overrides else base

    def validate(self) -> None:
        for name in ("s3_per_matrix", "pca_dense", "pca_shared", "neuron_pca_zscore", "d1_dense", "d1_shared"):
            self.require(isinstance(getattr(self, name), bool), name, "must be a bool")
        r = self.s4_round
        self.require(r is None or (_is_int(r) and 0 <= r <= 15), "s4_round", "must be None or an int in [0, 15]")
        self.require(_is_int(self.pca_ddof) and self.pca_ddof in (0, 1), "pca_ddof", "must be 0 or 1")
        n = self.neuron_pca_sample
        self.require(n is None or (_is_int(n) and n >= 1), "neuron_pca_sample", "must be None or an int >= 1")
        self.require(self.d2_ranks in D2_RANKS, "d2_ranks", f"must be one of {D2_RANKS}")


OptionsArg: TypeAlias = IntrospectOptions | str | None
"""``options=`` of the analyses: an :class:`IntrospectOptions`, ``"reference"``, ``"default"`` or None."""


def resolve_options(options: OptionsArg) -> IntrospectOptions:
    """The :class:`IntrospectOptions` that ``options`` names (validated).

    ``None`` and ``"default"`` are modulart's defaults, ``"reference"`` the notebooks' behaviour.

    Raises:
        ConfigError: anything else, naming ``options``.

    Example:
        >>> resolve_options(None) == IntrospectOptions()
        True
        >>> resolve_options(3)
        Traceback (most recent call last):
        ...
        modulart.core.errors.ConfigError: options = 3: must be an IntrospectOptions, 'reference', 'default' or None
    """
    if options is None or (isinstance(options, str) and options == "default"):
        return IntrospectOptions()
    if isinstance(options, str) and options == "reference":
        return IntrospectOptions.reference()
    if isinstance(options, IntrospectOptions):
        options.validate()  # fields may have been assigned after construction
        return options
    raise ConfigError(f"options = {options!r}: must be an IntrospectOptions, 'reference', 'default' or None")
