"""Hadamard matrices of orders 4t (t odd) that Sylvester, Paley I/II and Kronecker products miss, built from
published sequences (tables below, each with its source) and verified when built.

Constructions, all through the Goethals-Seidel array (four circulants A, B, C, D with
A A^T + B B^T + C C^T + D D^T = 4t I, any symmetry):

- Williamson-type quadruples of order w (4w).
- Supplementary difference sets in Z_t given as unions of cyclotomic cosets (Djokovic): 4t.
- T-sequences of length t (four disjoint 0/+-1 sequences whose aperiodic autocorrelations sum to zero),
  from Turyn-type sequences TT(n) (t = 3n - 1, via base sequences) or Turyn sequences (t = 2l - 1, 4l - 1),
  and T-matrices of order 67 (periodic): 4t.
- Cooper-Wallis: T-sequences of length t times symmetric Williamson matrices of order w (4tw).
- Miyamoto: the Paley conference matrix of order q + 1 (q a prime, q = 1 mod 4) and any H(q - 1): 4q.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

__all__ = ["build", "recipe"]

# Williamson-type quadruples (first rows of four circulants, '+' = 1, '-' = -1), as tabulated in SageMath's
# sage/combinat/matrices/hadamard_matrix.py (williamson_type_quadruples_smallcases): w = 3..29, 37, 43 from
# M. Hall, Combinatorial Theory, 2nd ed., Wiley; w = 31, 33, 39, 41, 45, 49, 51, 55, 57, 61, 63 from S. London,
# "Constructing new turyn type sequences, T-sequences and Hadamard matrices", PhD thesis, UIC (2013).
_WILLIAMSON = {
    1: ("+", "+", "+", "+"),
    3: ("+++", "+--", "+--", "+--"),
    5: ("+-++-", "++--+", "+----", "+----"),
    7: ("+--++--", "+-+--+-", "++----+", "+------"),
    9: ("+---++---", "+--+--+--", "+-+----+-", "++------+"),
    11: ("++--------+", "++-+-++-+-+", "++-++--++-+", "+-++----++-"),
    13: ("++++-+--+-+++", "+---+-++-+---", "++---+--+---+", "++---+--+---+"),
    15: ("+-+---++++---+-", "++-++------++-+", "++-++++--++++-+", "++-++-+--+-++-+"),
    17: ("+---+++----+++---", "++-+---+--+---+-+", "+--+-++++++++-+--", "+-++-+++--+++-++-"),
    19: ("++--+++-+--+-+++--+", "++-++--+-++-+--++-+", "+-+---++++++++---+-", "++--+-++++++++-+--+"),
    21: ("+--++++---++---++++--", "++++-+---+--+---+-+++", "++--+-+-++--++-+-+--+", "++-+++++-+--+-+++++-+"),
    23: ("++---+---+-++-+---+---+", "+-++-++--++++++--++-++-", "+++---++-+-++-+-++---++",
         "+++-+++-+------+-+++-++"),
    25: ("++++-+-+-+--++--+-+-+-+++", "++--+--+-++++++++-+--+--+", "+++--+--++++--++++--+--++",
         "+-+--+++--++++++--+++--+-"),
    27: ("+--+--+-+++--++--+++-+--+--", "+++-++-+---++--++---+-++-++", "+---+++++-+-++++-+-+++++---",
         "+---+++++-+-++++-+-+++++---"),
    29: ("+++---++--+-+----+-+--++---++", "+-+---++--+-++++++-+--++---+-", "++++-++-+---++++++---+-++-+++",
         "++--+--+-+++-++++-+++-+--+--+"),
    31: ("++++++-+--+---++++---+--+-+++++", "+--++---+-+-++----++-+-+---++--", "+--++---+-+-++----++-+-+---++--",
         "+-----+-++-+++----+++-++-+-----"),
    33: ("++++++-+-+-+++------+++-+-+-+++++", "++-+-++-+----+++--+++----+-++-+-+",
         "++--++-+++-+--+-++-+--+-+++-++--+", "+--++--+++++-++----++-+++++--++--"),
    37: ("+--+-+-+-++---+--++++--+---++-+-+-+--", "+---++-++--+-+-++----++-+-+--++-++---",
         "+++++-+-----++----++----++-----+-++++", "+--+++-+-----+----++----+-----+-+++--"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    41: ("++++--+-++++-++--++----++--++-++++-+--+++", "++++--+-++++-++--++----++--++-++++-+--+++",
         "+++-++-+-+-+-----+++--+++-----+-+-+-++-++", "+--+--+-+-+-+++++---++---+++++-+-+-+--+--"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
    45: ("+++++-++----+-++--++-++-++--++-+----++-++++", "+++---++--+-+-+-++--------++-+-+-+--++---++",
         "++-+-++++-+--+--+++--++--+++--+--+-++++-+-+", "+-++-----++++-+-+++-++++-+++-+-++++-----++-"),
    49: ("++++-++-+---++-+++---++-++-++---+++-++---+-++-+++", "++++-++-+---++-+++---++-++-++---+++-++---+-++-+++",
         "+----+-++++--+-+++-+-+++--+++-+-+++-+--++++-+----", "+++++-+----++-+---+-+---++---+-+---+-++----+-++++"),
    51: ("+---+++-++-+-+++--+++++--++--+++++--+++-+-++-+++---", "----+++-++-+-+++--+++++--++--+++++--+++-+-++-+++---",
         "-+--+----+-+++-+-+++++--+--+--+++++-+-+++-+----+--+", "-+--+----+-+++-+-+++++--+--+--+++++-+-+++-+----+--+"),
    55: ("+-+--+-+-++--+-+++++-+++--++++--+++-+++++-+--++-+-+--+-",
         "--+--+-+-++--+-+++++-+++--++++--+++-+++++-+--++-+-+--+-",
         "+++----++-++--++----+-+-++++++++-+-+----++--++-++----++",
         "+++----++-++--++----+-+-++++++++-+-+----++--++-++----++"),
    57: ("+---++-+--++++-+++-++---+-++++++-+---++-+++-++++--+-++---",
         "----++-+--++++-+++-++---+-++++++-+---++-+++-++++--+-++---",
         "--+-+-+++--+--+-++---+++++-++++-+++++---++-+--+--+++-+-+-",
         "--+-+-+++--+--+-++---+++++-++++-+++++---++-+--+--+++-+-+-"),
    61: ("++--+--++--+-+-++++--+-----+------+-----+--++++-+-+--++--+--+",
         "++--+--++--+-+-++++--+-----+------+-----+--++++-+-+--++--+--+",
         "+---+-+-++++---++--+-++-+---++++++---+-++-+--++---++++-+-+---",
         "++++-+-+----+++--++-+--+-+++------+++-+--+-++--+++----+-+-+++"),
    63: ("++-+++--++-++--+--+-++-+-+++--------+++-+-++-+--+--++-++--+++-+",
         "-+-+++--++-++--+--+-++-+-+++--------+++-+-++-+--+--++-++--+++-+",
         "++++-++-+-++++-+---+---+++---++++++---+++---+---+-++++-+-++-+++",
         "++++-++-+-++++-+---+---+++---++++++---+++---+---+-++++-+-++-+++"),
}

# Turyn-type sequences TT(n): X, Y, Z, W of lengths n, n, n, n-1 with zero summed aperiodic autocorrelation,
# packed one hex digit per position (bit j set <=> the j-th sequence is -1 there; the last digit holds 3 bits),
# the encoding of D. Best, D. Z. Djokovic, H. Kharaghani, H. Ramp, "Turyn-type sequences: classification,
# enumeration and construction", J. Combin. Des. 21 (2013), source of n <= 32; n = 36 is from H. Kharaghani,
# B. Tayfeh-Rezaie, "A Hadamard matrix of order 428", J. Combin. Des. 13 (2005) 435-440. (As carried by
# SageMath's sage/combinat/t_sequences.py.)
_TURYN_TYPE = {
    2: "01",
    4: "0161",
    6: "006d61",
    8: "06e5c4d1",
    10: "0001f4a961",
    12: "0004f90bc961",
    14: "00036ac71c7651",
    16: "0000778e52de5561",
    18: "00006758b30d1e9a51",
    20: "000038e2739c7a0b6951",
    22: "00000f702c71a9ad565961",
    24: "00000b7c2cb2bc4b6cd9a961",
    26: "000000ff0f846f1ca5a5aa9551",
    28: "0000067cde3e50639ab46135aa51",
    30: "000000f70b106f9d427a25e9a96951",
    32: "00000138f64f1c1e77844f26d95a5961",
    36: "060989975b685d8fc80750b21c0212eceb26",
}

# Turyn sequences X, U, Y, V of lengths l, l, l-1, l-1 (base sequences with p = 1), from J. Seberry,
# "Orthogonal Designs" (Springer 2017) and Cohen, Rubie, Seberry, Koukouvinos, Kounias, Yamada, "A survey of
# base sequences, disjoint complementary sequences and OD(4t; t, t, t, t)", JCMCC 5 (1989) 69-103.
_TURYN = {
    2: ("+-", "++", "+", "+"),
    3: ("+++", "++-", "+-", "+-"),
    4: ("++--", "++-+", "+++", "+-+"),
    5: ("++-++", "++++-", "++--", "+-+-"),
    6: ("+++---", "++-+-+", "++-++", "++-++"),
    7: ("+++-+++", "++---+-", "++-+--", "++-+--"),
    8: ("++-+-+--", "++++---+", "+++-+++", "+--+--+"),
    13: ("++++-+-+-++++", "+++--+-+--++-", "+++-++--+---", "+++--+-++---"),
    15: ("++-+++-+-+++-++", "+++-++---++-++-", "++++--+-++----", "+----+-+-++++-"),
}

# T-matrices of order 67 (periodic, '0' = 0), from K. Sawade, "A Hadamard matrix of order 268", Graphs
# Combin. 1 (1985) 185-187 (as carried by SageMath's hadamard_matrix_cooper_wallis_smallcases).
_T_MATRICES = {
    67: (
        "+000-000-000---00-000000-0-0-0+-000000+000-000000-0000000000000000+",
        "0+00000-000-000++00000+0000000000000000-++00---00000-+0-00000000++0",
        "00000-+000+0000000++-00+0-0-00000000-+00000+0000-0000000+--0+000000",
        "00--00000+00000000000+0000000+00-+-+00000000000+00+-00-0000-0-++000",
    ),
}

# Supplementary difference sets S_1..S_4 in Z_t with |S_1| + .. + |S_4| = t + lambda, as unions of cosets of a
# subgroup H of Z_t^*: (H, coset representatives a_i, index sets J_1..J_4). The cosets are alpha_2i = a_i H
# (a list instead of a_i is that coset itself) and alpha_2i+1 = -alpha_2i; S_k is the union of alpha_j over
# j in J_k, plus {0} where J_k holds -1. The +-1 circulants are -1 on S_k (D. Z. Djokovic's method; data as
# carried by SageMath's sage/combinat/designs/difference_family.py). Sources:
# 103, 151: D. Z. Djokovic, "Five new orders for Hadamard matrices of skew type", Australas. J. Combin. 10
#   (1994) 259-264.  127, 163: D. Z. Djokovic, "Construction of some new Hadamard matrices", Bull. Austral.
#   Math. Soc. 45 (1992) 327-332.  219: D. Z. Djokovic, "Ten new orders for Hadamard matrices of skew type",
#   Univ. Beograd. Publ. Elektrotehn. Fak. Ser. Mat. 3 (1992) 47-59.  191: D. Z. Djokovic, "Hadamard matrices
#   of order 764 exist", Combinatorica 28 (2008) 487-489.  239: D. Z. Djokovic, "Two Hadamard matrices of
#   order 956 of Goethals-Seidel type", Combinatorica 14 (1994) 375-377.  251: D. Z. Djokovic, O. Golubitsky,
#   I. S. Kotsireas, "Some new orders of Hadamard and skew-Hadamard matrices", J. Combin. Des. 22 (2014).
_SDS: dict[int, tuple[list[int], list, list[list[int]]]] = {
    103: ([1, 46, 56], [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 15, 17, 19, 21, 23, 30],
          [[1, 3, 4, 6, 8, 11, 12, 14, 17, 18, 20, 22, 25, 27, 28, 30, 32],
           [2, 9, 10, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24, 26, 28, 29, 30],
           [0, 1, 2, 3, 4, 11, 12, 13, 16, 17, 19, 20, 21, 24, 25, 26, 28, 30, 31],
           [0, 1, 2, 3, 4, 5, 6, 13, 15, 18, 19, 20, 23, 24, 25, 26, 27, 28, 29, 31]]),
    127: ([1, 2, 4, 8, 16, 32, 64], [1, 3, 5, 7, 9, 11, 13, 19, 21],
          [[0, 3, 5, 7, 8, 10, 12, 14, 16], [0, 1, 3, 6, 7, 9, 10, 12, 14, 15],
           [0, 1, 3, 4, 5, 7, 8, 9, 15, 16], [1, 4, 5, 6, 9, 10, 13, 14, 15, 16]]),
    151: ([1, 8, 19, 59, 64], [1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 15, 22, 27, 29, 30],
          [[0, 3, 5, 6, 8, 11, 13, 14, 16, 19, 21, 23, 25, 27, 28],
           [2, 3, 6, 13, 16, 17, 20, 23, 25, 26, 27, 28, 29],
           [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 23, 24, 27, 28],
           [1, 4, 5, 10, 11, 12, 13, 14, 16, 18, 19, 22, 25, 26, 27, 28]]),
    163: ([1, 38, 40, 53, 58, 85, 104, 133, 140], [1, 2, 3, 5, 6, 9, 10, 15, 18],
          [[0, 2, 5, 6, 9, 10, 13, 14, 17], [0, 1, 7, 10, 12, 15, 16, 17],
           [0, 1, 3, 5, 8, 13, 15, 16, 17], [3, 6, 7, 8, 11, 12, 13, 14, 16, 17]]),
    191: ([1, 39, 184, 109, 49], [1, 2, 3, 4, 6, 8, 9, 11, 12, 13, 16, 17, 18, 19, 22, 32, 36, 38, 41],
          [[1, 7, 9, 10, 11, 13, 17, 18, 25, 26, 30, 31, 33, 34, 35, 36, 37],
           [1, 4, 7, 9, 11, 12, 13, 14, 19, 21, 22, 23, 24, 25, 26, 29, 36, 37],
           [0, 3, 4, 5, 7, 8, 9, 16, 17, 19, 24, 25, 29, 30, 31, 33, 35, 37],
           [1, 3, 4, 5, 8, 11, 14, 18, 19, 20, 21, 23, 24, 25, 28, 29, 30, 32, 34, 35]]),
    219: ([1, 4, 16, 37, 55, 64, 148, 154, 178], [1, 2, 3, 5, 7, 9, 11, 15, 19, 22, 23, 33, [73]],
          [[1, 3, 5, 6, 8, 11, 12, 15, 17, 18, 21, 22, 24], [2, 6, 8, 10, 11, 12, 13, 16, 19, 22, 23, 24],
           [0, 1, 5, 6, 10, 11, 13, 14, 17, 20, 21, 24, 25], [0, 2, 3, 4, 5, 6, 7, 11, 12, 13, 16, 20, 23]]),
    239: ([1, 10, 24, 44, 98, 100, 201], [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 18, 21, 28, 35, 42],
          [[0, 1, 2, 3, 4, 5, 6, 7, 14, 18, 19, 21, 24, 25, 29, 30],
           [0, 1, 3, 7, 9, 12, 15, 18, 20, 22, 26, 28, 29, 30, 31, 32, 33],
           [2, 3, 4, 5, 8, 9, 10, 11, 13, 17, 19, 21, 22, 24, 27, 31, 32],
           [0, 1, 2, 3, 6, 7, 8, 11, 13, 15, 17, 18, 19, 22, 25, 26, 27, 32, 33]]),
    251: ([1, 20, 113, 149, 219],
          [1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 14, 15, 17, 18, 19, 21, 28, 30, 33, 34, 35, 41, 43, 45, 68],
          [[2, 6, 8, 10, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23, 27, 28, 35, 36, 39, 41, 43, 44, 47, 48],
           [2, 5, 10, 11, 17, 18, 21, 23, 24, 25, 26, 28, 29, 30, 34, 35, 38, 39, 40, 41, 42, 43, 44, 49],
           [0, 2, 6, 7, 10, 11, 14, 15, 16, 18, 21, 22, 24, 26, 30, 35, 37, 38, 45, 46, 47, 48, 49],
           [1, 2, 3, 4, 8, 9, 12, 17, 21, 22, 27, 28, 29, 30, 33, 34, 39, 41, 42, 43, 46, 47, 48]]),
}


def _sds_rows(t: int) -> list[np.ndarray]:
    """The four +-1 first rows (-1 on S_k) from the coset description in _SDS."""
    h, reps, index_sets = _SDS[t]
    cosets: list[set[int]] = []
    for a in reps:
        even = {x % t for x in a} if isinstance(a, list) else {a * x % t for x in h}
        cosets += [even, {-x % t for x in even}]
    rows = []
    for js in index_sets:
        row = np.ones(t, dtype=np.int64)
        for j in js:
            row[list(cosets[j]) if j >= 0 else [0]] = -1
        rows.append(row)
    return rows


def _pm(s: str) -> np.ndarray:
    return np.array([{"+": 1, "-": -1, "0": 0}[c] for c in s], dtype=np.int64)


def _turyn_type(n: int) -> list[np.ndarray]:
    """TT(n) decoded from its hex string: [X, Y, Z, W]."""
    digits = _TURYN_TYPE[n]
    bits = [f"{int(c, 16):04b}" for c in digits[:-1]] + [f"{int(digits[-1], 16):03b}"]
    return [np.array([1 - 2 * int(row[j]) for row in bits if j < len(row)], dtype=np.int64) for j in range(4)]


def _aperiodic_ok(seqs: list[np.ndarray]) -> bool:
    """Summed aperiodic autocorrelation is zero at every nonzero shift."""
    total = sum(np.correlate(s, s, mode="full") for s in seqs if len(s))
    centre = len(total) // 2
    return bool(not np.any(total[centre + 1 :]))


def _t_from_base(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> list[np.ndarray]:
    """T-sequences of length len(a) + len(c) from base sequences A, B (length n + p), C, D (length n)."""
    za, zc = np.zeros(len(c), np.int64), np.zeros(len(a), np.int64)
    return [np.concatenate([(a + b) // 2, za]), np.concatenate([(a - b) // 2, za]),
            np.concatenate([zc, (c + d) // 2]), np.concatenate([zc, (c - d) // 2])]


def _t_from_turyn(x: np.ndarray, u: np.ndarray, y: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    """T-sequences of length 4l - 1 from Turyn sequences of length l (Seberry, Orthogonal Designs, Thm 7.7)."""
    ln = len(x)
    t = np.zeros((4, 4 * ln - 1), dtype=np.int64)
    t[0, 0] = 1
    xy = np.zeros(2 * ln - 1, np.int64)
    xy[0::2], xy[1::2] = x, y
    t[1, 1 : 2 * ln] = xy
    t[2, 2 * ln :: 2] = u
    t[3, 2 * ln + 1 :: 2] = v
    return list(t)


@functools.cache
def _t_sources() -> dict[int, Callable[[], list[np.ndarray]]]:
    """Length t -> a function building aperiodic T-sequences of that length."""
    src: dict[int, Callable[[], list[np.ndarray]]] = {1: lambda: [np.array([1]), *(np.array([0]),) * 3]}
    for ln in _TURYN:
        seqs = [_pm(s) for s in _TURYN[ln]]
        src.setdefault(2 * ln - 1, lambda s=seqs: _t_from_base(*s))
        src.setdefault(4 * ln - 1, lambda s=seqs: _t_from_turyn(*s))
    for n in _TURYN_TYPE:
        def from_tt(n: int = n) -> list[np.ndarray]:
            x, y, z, w = _turyn_type(n)
            return _t_from_base(np.concatenate([z, w]), np.concatenate([z, -w]), x, y)

        src.setdefault(3 * n - 1, from_tt)
    return src


def _circulant(a: np.ndarray) -> np.ndarray:
    """C[i, j] = a[(j - i) mod n]: the circulant with first row a."""
    n = len(a)
    return a[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def _goethals_seidel(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Goethals-Seidel array of four circulants; X R (R the back-diagonal identity) reverses X's columns."""
    br, cr, dr, btr, ctr, dtr = (x[:, ::-1] for x in (b, c, d, b.T, c.T, d.T))
    return np.block([[a, br, cr, dr],
                     [-br, a, -dtr, ctr],
                     [-cr, dtr, a, -btr],
                     [-dr, -ctr, btr, a]])


@functools.cache
def _symmetric_williamson() -> frozenset[int]:
    """Orders whose tabulated quadruple is four symmetric circulants (what Cooper-Wallis needs)."""
    return frozenset(w for w, q in _WILLIAMSON.items() if all(s[1:] == s[1:][::-1] for s in q))


def _cooper_wallis(t_seqs: list[np.ndarray], w: int) -> np.ndarray:
    """Order 4tw: the Baumert-Hall array built from T-sequences, its four variables replaced by symmetric
    Williamson circulants (J. Cooper, J. Wallis, "A construction for Hadamard arrays", Bull. Austral. Math.
    Soc. 7 (1972) 269-278)."""
    x1, x2, x3, x4 = (_circulant(s) for s in t_seqs)
    units = [_goethals_seidel(x1, x2, x3, x4), _goethals_seidel(x2, -x1, x4, -x3),
             _goethals_seidel(x3, -x4, -x1, x2), _goethals_seidel(x4, x3, -x2, -x1)]
    wm = [_circulant(_pm(s)) for s in _WILLIAMSON[w]]
    return sum(np.kron(e, m) for e, m in zip(units, wm, strict=True))


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _miyamoto(q: int, hadamard: Callable[[int], np.ndarray]) -> np.ndarray:
    """Order 4q for a prime q = 1 mod 4 from the Paley conference matrix of order q + 1 and any H(q - 1)
    (M. Miyamoto, "A construction of Hadamard matrices", J. Combin. Theory A 57 (1991) 86-108; block layout
    as implemented in SageMath's hadamard_matrix_miyamoto_construction)."""
    m = (q - 1) // 2
    squares = np.zeros(q, dtype=bool)
    squares[(np.arange(1, q) ** 2) % q] = True
    chi = np.where(squares, 1, -1)
    chi[0] = 0
    idx = np.arange(q)
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = c[1:, 0] = 1
    c[1:, 1:] = chi[(idx[:, None] - idx[None, :]) % q]
    # Permute so row 1 (field element 0) is +1 on columns 2..m+1 and -1 on m+2..2m+1.
    order = [0, 1] + [j for j in range(2, q + 1) if c[1, j] == 1] + [j for j in range(2, q + 1) if c[1, j] == -1]
    c = c[np.ix_(order, order)]
    c1, c2, c4 = -c[2 : m + 2, 2 : m + 2], c[2 : m + 2, m + 2 :], c[m + 2 :, m + 2 :]
    k = hadamard(q - 1).astype(np.int64)
    k1, k2, k3, k4 = k[:m, :m], k[:m, m:], -k[m:, :m], k[m:, m:]
    z, i = np.zeros((m, m), np.int64), np.eye(m, dtype=np.int64)
    us = [[c1, c2, z, z], [c2.T, c4, z, z], [z, z, c1, c2], [z, z, c2.T, c4]]
    vs = [[i, z, k1, k2], [z, i, k3, k4], [k1.T, k3.T, i, z], [k2.T, k4.T, z, i]]

    def tile(a: int, b: int) -> np.ndarray:
        p, n = us[a][b] + vs[a][b], us[a][b] - vs[a][b]
        return np.block([[p, n], [n, p]])

    e = np.ones((1, 2 * m), np.int64)
    one = np.ones((1, 1), np.int64)
    # Signs of the 4 x 4 block pattern: (corner, top row e, left column e^T, tile) per block.
    corner = ["++++", "-++-", "--++", "-+-+"]
    top = ["-+++", "--+-", "---+", "-+--"]
    left = ["-+++", "--+-", "---+", "-+--"]
    tiles = ["++++", "-++-", "--++", "-+-+"]
    rows = []
    for a in range(4):
        r0, r1 = [], []
        for b in range(4):
            s = [1 if ch == "+" else -1 for ch in (corner[a][b], top[a][b], left[a][b], tiles[a][b])]
            r0 += [s[0] * one, s[1] * e]
            r1 += [s[2] * e.T, s[3] * tile(a, b)]
        rows += [r0, r1]
    return np.block(rows)


def recipe(m: int, constructible: Callable[[int], bool]) -> tuple | None:
    """How order m is built here, or None: ("williamson", w), ("t-matrices", t), ("sds", t),
    ("cooper-wallis", t, w) or ("miyamoto", q). `constructible` answers whether an order has any construction
    (for Miyamoto's q - 1)."""
    if m % 4 or m < 12:
        return None
    t = m // 4
    if t in _WILLIAMSON:
        return ("williamson", t)
    if t in _T_MATRICES:
        return ("t-matrices", t)
    if t in _SDS:
        return ("sds", t)
    sources = _t_sources()
    for ts in sorted(sources, reverse=True):  # longest T-sequences first: the smallest Williamson factor
        if t % ts == 0 and (t // ts == 1 or t // ts in _symmetric_williamson()):
            return ("cooper-wallis", ts, t // ts)
    if _is_prime(t) and t % 4 == 1 and constructible(t - 1):
        return ("miyamoto", t)
    return None


def build(m: int, hadamard: Callable[[int], np.ndarray], constructible: Callable[[int], bool]) -> np.ndarray:
    """The +-1 float64 Hadamard matrix of order m from its recipe, checked: H H^T = m I."""
    how = recipe(m, constructible)
    if how is None:
        raise ValueError(f"no sequence construction for order {m}")
    if how[0] in ("williamson", "t-matrices"):
        table = _WILLIAMSON if how[0] == "williamson" else _T_MATRICES
        seqs = [_pm(s) for s in table[how[1]]]
        if how[0] == "t-matrices":  # T-matrices -> four +-1 circulants (any 4 x 4 Hadamard sign pattern)
            x1, x2, x3, x4 = seqs
            seqs = [x1 + x2 + x3 + x4, -x1 + x2 + x3 - x4, -x1 - x2 + x3 + x4, -x1 + x2 - x3 + x4]
        h = _goethals_seidel(*(_circulant(s) for s in seqs))
    elif how[0] == "sds":
        h = _goethals_seidel(*(_circulant(s) for s in _sds_rows(how[1])))
    elif how[0] == "cooper-wallis":
        t_seqs = _t_sources()[how[1]]()
        if not _aperiodic_ok(t_seqs):
            raise AssertionError(f"T-sequences of length {how[1]} are not complementary")
        h = _cooper_wallis(t_seqs, how[2])
    else:
        h = _miyamoto(how[1], hadamard)
    h = h.astype(np.float64)
    if h.shape != (m, m) or not np.all(np.abs(h) == 1.0) or not np.array_equal(h @ h.T, m * np.eye(m)):
        raise AssertionError(f"{how} did not give a Hadamard matrix of order {m}")  # a table or code defect
    return h
