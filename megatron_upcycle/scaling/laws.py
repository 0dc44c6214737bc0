"""The scaling-law forms, written as data.

Every form is a sum of positive terms, L = sum_k T_k, and each term is a
power-law product whose logarithm is *linear* in the fitted parameters:

    log T_k = log(amplitude_k) + sum_j sign_j * exponent_j * feature_j(x)

with features such as ln D, ln N or the interaction ln D1 * ln D2. So
log L = LogSumExp_k(F_k theta + c_k): the fit works in log space, the gradient
is exact and cheap (softmax-weighted features), and a term that applies to only
some rows (the dense and MoE halves of the shared-E fit) gets c = -inf there.

Units: features are logs of raw column values. The fitted amplitudes and, for
forms with an interaction term, the plain exponents depend on the unit of D
(trap 1 in the issue: a1 and a2 shift by a3 ln(scale)); ``Units`` records which
unit a parameter set refers to, and the default is tokens and parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOKENS = "tokens"
PARAMETERS = "parameters"


@dataclass(frozen=True)
class Units:
    """What one unit of D and of N means for a parameter set.

    ``tokens_per_unit = 1e9`` would mean D was given in billions of tokens.
    Fits here default to raw tokens and raw parameters, as the paper's joint fits.
    """

    tokens_per_unit: float = 1.0
    parameters_per_unit: float = 1.0
    loss: str = "nats (validation cross-entropy)"

    def describe(self) -> str:
        d = TOKENS if self.tokens_per_unit == 1.0 else f"units of {self.tokens_per_unit:g} tokens"
        n = PARAMETERS if self.parameters_per_unit == 1.0 else f"units of {self.parameters_per_unit:g} parameters"
        return f"D in {d}, N in {n}, L in {self.loss}"


# Which raw unit each data column is measured in (P is a ratio and has none).
COLUMN_KIND = {"D": "D", "D1": "D", "D2": "D", "N": "N", "N1": "N", "N2": "N", "Ntotal": "N", "P": None}


@dataclass(frozen=True)
class Term:
    """One additive term: amplitude * prod(feature ** (sign * exponent)).

    ``powers`` holds (exponent parameter, feature, sign); a feature is a product
    of logs of columns, e.g. "lnD1*lnD2". ``where`` names a 0/1 column: the term
    is present only on rows where it is 1 ("is_moe") or, with a leading "!", 0.
    """

    amplitude: str
    powers: tuple[tuple[str, str, float], ...] = ()
    where: str | None = None


@dataclass(frozen=True)
class Law:
    """A functional form: its terms, the columns it reads and its start grid."""

    name: str
    family: str
    formula: str
    terms: tuple[Term, ...]
    # Starting values of the exponents for the multi-start BFGS; the amplitudes
    # at each grid point are set by non-negative least squares (fitting.py).
    start_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def params(self) -> tuple[str, ...]:
        """Amplitudes first (in term order), then exponents (first appearance)."""
        amps = [t.amplitude for t in self.terms]
        exps: list[str] = []
        for t in self.terms:
            for name, _, _ in t.powers:
                if name not in exps:
                    exps.append(name)
        return tuple(amps + exps)

    @property
    def amplitudes(self) -> tuple[str, ...]:
        return tuple(t.amplitude for t in self.terms)

    @property
    def exponents(self) -> tuple[str, ...]:
        return tuple(p for p in self.params if p not in self.amplitudes)

    @property
    def columns(self) -> tuple[str, ...]:
        """Data columns the form reads (besides the loss)."""
        cols: list[str] = []
        for t in self.terms:
            for _, feature, _ in t.powers:
                for factor in feature.split("*"):
                    col = factor[2:]
                    if col not in cols:
                        cols.append(col)
            if t.where is not None and t.where.lstrip("!") not in cols:
                cols.append(t.where.lstrip("!"))
        return tuple(cols)


def feature_values(feature: str, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Value of a feature such as "lnD1*lnD2" on every row."""
    out = None
    for factor in feature.split("*"):
        if not factor.startswith("ln"):
            raise ValueError(f"feature factor {factor!r} must be ln<column>")
        value = np.log(np.asarray(columns[factor[2:]], dtype=float))
        out = value if out is None else out * value
    return out


@dataclass(frozen=True)
class Design:
    """log T_k = F[k] @ theta + c[k] for every term k and row; theta holds log-amplitudes."""

    F: np.ndarray  # (terms, rows, params)
    c: np.ndarray  # (terms, rows); -inf where a term is absent

    def log_predict(self, theta: np.ndarray) -> np.ndarray:
        """log L for internal parameters theta (log amplitudes, raw exponents); (..., rows)."""
        theta = np.asarray(theta, dtype=float)
        terms = np.einsum("knp,...p->...kn", self.F, theta) + self.c
        top = np.max(terms, axis=-2, keepdims=True)
        return (top + np.log(np.sum(np.exp(terms - top), axis=-2, keepdims=True)))[..., 0, :]


def design(law: Law, columns: dict[str, np.ndarray]) -> Design:
    """The feature tensor of ``law`` on ``columns`` (raw units: the caller scales them)."""
    params = law.params
    index = {p: i for i, p in enumerate(params)}
    n = len(np.asarray(next(iter(columns.values()))))
    F = np.zeros((len(law.terms), n, len(params)))
    c = np.zeros((len(law.terms), n))
    for k, term in enumerate(law.terms):
        F[k, :, index[term.amplitude]] = 1.0
        for name, feature, sign in term.powers:
            F[k, :, index[name]] += sign * feature_values(feature, columns)
        if term.where is not None:
            flag = np.asarray(columns[term.where.lstrip("!")], dtype=float)
            present = flag == 0 if term.where.startswith("!") else flag == 1
            c[k, ~present] = -np.inf
            F[k, ~present, :] = 0.0
    return Design(F=F, c=c)


def to_internal(law: Law, values: dict[str, float]) -> np.ndarray:
    """Named natural parameters -> internal vector (log of each amplitude)."""
    amps = set(law.amplitudes)
    # An amplitude fitted to exactly 0 maps to -inf, which the fit handles as "term off".
    with np.errstate(divide="ignore"):
        return np.array([np.log(values[p]) if p in amps else float(values[p]) for p in law.params])


def to_natural(law: Law, theta: np.ndarray) -> dict[str, float]:
    """Internal vector -> named natural parameters."""
    amps = set(law.amplitudes)
    with np.errstate(over="ignore"):  # an unidentified amplitude can run off to inf; identification.py says so
        return {p: float(np.exp(v)) if p in amps else float(v) for p, v in zip(law.params, theta)}


def predict(law: Law, values: dict[str, float], columns: dict[str, np.ndarray]) -> np.ndarray:
    """Predicted loss of ``law`` with named natural parameters on columns (scalars broadcast)."""
    needed = {name: np.asarray(columns[name], dtype=float) for name in law.columns}
    shape = np.broadcast_shapes(*(v.shape for v in needed.values()))
    flat = {name: np.broadcast_to(v, shape).ravel() for name, v in needed.items()}
    return np.exp(design(law, flat).log_predict(to_internal(law, values))).reshape(shape)


# ---- the forms -------------------------------------------------------------

_EXP = (0.05, 0.1, 0.2, 0.4, 0.8)
_INTERACTION = (-0.003, 0.0, 0.003)


def _power(name: str, column: str) -> tuple[str, str, float]:
    return (name, f"ln{column}", -1.0)


def _interaction(name: str, a: str, b: str) -> tuple[str, str, float]:
    # b ** (+name * ln a): the exponent of b moves with ln a.
    return (name, f"ln{a}*ln{b}", +1.0)


CHINCHILLA = Law(
    name="chinchilla",
    family="chinchilla",
    formula="L = A D^-a + B N^-b + E",
    terms=(Term("A", (_power("a", "D"),)), Term("B", (_power("b", "N"),)), Term("E")),
    start_grid={"a": _EXP, "b": _EXP},
)

# One model size: Chinchilla without its N term (N is a constant there, so B N^-b
# cannot be told apart from E). Valid only at the fitted size; studies of a single
# size, and the MoE / dense-CPT comparison at one size, use it.
ONE_SIZE = Law(
    name="one_size",
    family="one_size",
    formula="L = A D^-a + E  (one model size)",
    terms=(Term("A", (_power("a", "D"),)), Term("E")),
    start_grid={"a": _EXP},
)

# The same at one size for dense and MoE from scratch together, one shared E (as the
# paper's shared-E fit, without its N terms): three dense budgets suffice with it.
ONE_SIZE_SHARED_E = Law(
    name="one_size_shared_E",
    family="one_size",
    formula="L = A_dense D^-a_dense + E (dense rows); L = A_moe D^-a_moe + E (MoE rows)  (one model size)",
    terms=(
        Term("A_dense", (_power("a_dense", "D"),), where="!is_moe"),
        Term("A_moe", (_power("a_moe", "D"),), where="is_moe"),
        Term("E"),
    ),
    start_grid={"a_dense": (0.05, 0.15, 0.4, 0.8), "a_moe": (0.05, 0.15, 0.4, 0.8)},
)

# Dense and MoE from scratch fitted together with one shared irreducible loss E;
# the paper fixes the joint upcycling law's E to this value.
SHARED_E = Law(
    name="dense_moe_shared_E",
    family="shared_E",
    formula="L = A_dense D^-a_dense + B_dense N^-b_dense + E (dense rows); "
    "L = A_moe D^-a_moe + B_moe N^-b_moe + E (MoE rows)",
    terms=(
        Term("A_dense", (_power("a_dense", "D"),), where="!is_moe"),
        Term("B_dense", (_power("b_dense", "N"),), where="!is_moe"),
        Term("A_moe", (_power("a_moe", "D"),), where="is_moe"),
        Term("B_moe", (_power("b_moe", "N"),), where="is_moe"),
        Term("E"),
    ),
    start_grid={"a_dense": (0.05, 0.15, 0.4), "b_dense": (0.05, 0.15, 0.4),
                "a_moe": (0.05, 0.15, 0.4), "b_moe": (0.05, 0.15, 0.4)},
)

D1D2_MULT_INT = Law(
    name="d1d2_mult_int",
    family="d1d2",
    formula="L = A D1^-a1 D2^(-a2 + a3 ln D1) + E",
    terms=(Term("A", (_power("a1", "D1"), _power("a2", "D2"), _interaction("a3", "D1", "D2"))), Term("E")),
    start_grid={"a1": (0.0, 0.05, 0.2), "a2": (0.05, 0.1, 0.2, 0.4), "a3": _INTERACTION},
)
D1D2_MULT = Law(
    name="d1d2_mult",
    family="d1d2",
    formula="L = A D1^-a1 D2^-a2 + E",
    terms=(Term("A", (_power("a1", "D1"), _power("a2", "D2"))), Term("E")),
    start_grid={"a1": (0.0, 0.05, 0.2), "a2": (0.05, 0.1, 0.2, 0.4)},
)
D1D2_ADD_INT = Law(
    name="d1d2_add_int",
    family="d1d2",
    formula="L = A D1^-a1 + F D2^(-a2 + a3 ln D1) + E",
    terms=(
        Term("A", (_power("a1", "D1"),)),
        Term("F", (_power("a2", "D2"), _interaction("a3", "D1", "D2"))),
        Term("E"),
    ),
    start_grid={"a1": (0.05, 0.2, 0.5), "a2": (0.05, 0.1, 0.2, 0.4), "a3": _INTERACTION},
)
D1D2_ADD = Law(
    name="d1d2_add",
    family="d1d2",
    formula="L = A D1^-a1 + F D2^-a2 + E",
    terms=(Term("A", (_power("a1", "D1"),)), Term("F", (_power("a2", "D2"),)), Term("E")),
    start_grid={"a1": (0.05, 0.2, 0.5), "a2": (0.05, 0.1, 0.2, 0.4)},
)

# Model configuration at fixed D1, D2: sparsity P = Ntotal / N2 and active N2.
CONFIG_ADD = Law(
    name="config_add",
    family="config",
    formula="L = A P^-b1 + F N2^-b2 + E",
    terms=(Term("A", (_power("b1", "P"),)), Term("F", (_power("b2", "N2"),)), Term("E")),
    start_grid={"b1": (0.05, 0.2, 0.5, 1.0), "b2": _EXP},
)
CONFIG_ADD_INT = Law(
    name="config_add_int",
    family="config",
    formula="L = A P^-b1 + F N2^(-b2 + b3 ln P) + E",
    terms=(
        Term("A", (_power("b1", "P"),)),
        Term("F", (_power("b2", "N2"), _interaction("b3", "P", "N2"))),
        Term("E"),
    ),
    start_grid={"b1": (0.05, 0.2, 0.5, 1.0), "b2": (0.05, 0.1, 0.2, 0.4), "b3": (-0.01, 0.0, 0.01)},
)
CONFIG_MULT = Law(
    name="config_mult",
    family="config",
    formula="L = A P^-b1 N2^-b2 + E",
    terms=(Term("A", (_power("b1", "P"), _power("b2", "N2"))), Term("E")),
    start_grid={"b1": (0.0, 0.05, 0.2), "b2": _EXP},
)
CONFIG_MULT_INT = Law(
    name="config_mult_int",
    family="config",
    formula="L = A P^-b1 N2^(-b2 + b3 ln P) + E",
    terms=(Term("A", (_power("b1", "P"), _power("b2", "N2"), _interaction("b3", "P", "N2"))), Term("E")),
    start_grid={"b1": (0.0, 0.05, 0.2), "b2": (0.05, 0.1, 0.2, 0.4), "b3": (-0.01, 0.0, 0.01)},
)

# Joint upcycling law; E is not fitted here but fixed from the shared-E fit.
JOINT = Law(
    name="joint",
    family="joint",
    formula="L = A D1^-a1 D2^(-a2 + a3 ln D1) + B N1^-b + E  (E fixed from the dense + MoE fit)",
    terms=(
        Term("A", (_power("a1", "D1"), _power("a2", "D2"), _interaction("a3", "D1", "D2"))),
        Term("B", (_power("b", "N1"),)),
        Term("E"),
    ),
    start_grid={"a1": (0.02, 0.1), "a2": (0.05, 0.15), "a3": _INTERACTION, "b": (0.05, 0.15, 0.3)},
)

LAWS: dict[str, Law] = {
    law.name: law
    for law in (
        CHINCHILLA, ONE_SIZE, ONE_SIZE_SHARED_E, SHARED_E,
        D1D2_MULT_INT, D1D2_MULT, D1D2_ADD_INT, D1D2_ADD,
        CONFIG_ADD, CONFIG_ADD_INT, CONFIG_MULT, CONFIG_MULT_INT,
        JOINT,
    )
}


def get_law(name: str) -> Law:
    from megatron_upcycle.errors import UserError

    try:
        return LAWS[name]
    except KeyError:
        raise UserError(f"unknown scaling-law form '{name}'; known: {', '.join(LAWS)}") from None


def effective_exponent(values: dict[str, float], d1: np.ndarray | float) -> np.ndarray:
    """The D2 exponent a2 - a3 ln D1 of a d1d2 / joint law (D1 in the law's token unit)."""
    return values["a2"] - values.get("a3", 0.0) * np.log(d1)


def rescale_tokens(law: Law, values: dict[str, float], scale: float) -> dict[str, float]:
    """Parameters of the same multiplicative-family law with D measured in units of ``scale`` tokens.

    For L = A D1^-a1 D2^(-a2 + a3 ln D1) + ..., writing D = scale * D' gives
    a1' = a1 - a3 ln(scale), a2' = a2 - a3 ln(scale) and a new A; the curve is
    identical. (The additive form has no such exact map for D2: see trap 1.)
    """
    if law.name not in ("d1d2_mult_int", "d1d2_mult", "joint"):
        raise ValueError(f"exact token rescaling is defined for the multiplicative forms, not {law.name}")
    s = np.log(scale)
    a1, a2, a3 = values["a1"], values["a2"], values.get("a3", 0.0)
    out = dict(values)
    out["a1"] = a1 - a3 * s
    out["a2"] = a2 - a3 * s
    # log A' = log A - (a1 + a2) s + a3 s^2
    out["A"] = float(np.exp(np.log(values["A"]) - (a1 + a2) * s + a3 * s * s))
    return out
