"""The layout of roimae's tables, wherever they are written or read.

Embeddings in columns ``e000``, ``e001``... (:func:`embedding_frame`); region x region matrices
with a ``Node`` column, as XCP-D's ``relmat`` files (:func:`relmat_frame`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: The embedding columns of a table (``e000``, ``e001``...), as a regular expression.
EMBEDDING_COLUMNS = r"^e\d+$"

def embedding_columns(n_features: int) -> list[str]:
    """The names of ``n_features`` embedding columns: ``e000``, ``e001``...

    Parameters
    ----------
    n_features : int

    Returns
    -------
    list of str
    """
    return [f"e{i:03d}" for i in range(n_features)]


def embedding_frame(rows: np.ndarray) -> pd.DataFrame:
    """Embeddings as a table, one row each, in the columns of :func:`embedding_columns`.

    Parameters
    ----------
    rows : ndarray, shape (n, F)

    Returns
    -------
    pandas.DataFrame
    """
    return pd.DataFrame(rows, columns=embedding_columns(rows.shape[1]))


def read_embeddings(path: Path) -> np.ndarray:
    """The embedding columns of a TSV file (other columns left out), ``n/a`` as NaN.

    Parameters
    ----------
    path : Path
        A file written with :func:`embedding_frame` columns.

    Returns
    -------
    ndarray of float64, shape (rows, F)
    """
    frame = pd.read_csv(path, sep="\t", na_values="n/a")
    return frame.filter(regex=EMBEDDING_COLUMNS).to_numpy(dtype=np.float64)


def relmat_frame(matrix: np.ndarray, names: list[str]) -> pd.DataFrame:
    """A square region x region table with a ``Node`` column (as XCP-D's relmat files).

    Parameters
    ----------
    matrix : ndarray, shape (R, R)
    names : list of str
        The region names, for the ``Node`` column and the column names.

    Returns
    -------
    pandas.DataFrame
    """
    frame = pd.DataFrame(matrix, columns=names)
    frame.insert(0, "Node", names)
    return frame


def read_relmat(path: Path) -> np.ndarray:
    """A ``relmat.tsv`` (:func:`relmat_frame`) as an (R, R) array.

    Parameters
    ----------
    path : Path

    Returns
    -------
    ndarray of float64, shape (R, R)
    """
    frame = pd.read_csv(path, sep="\t", na_values="n/a", index_col=0)
    return frame.to_numpy(dtype=np.float64)
