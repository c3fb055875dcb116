"""Data of the digits CNN example: scikit-learn's bundled 8x8 digits (no download), 80/20."""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X.astype(np.float32), y, test_size=0.2, random_state=42, stratify=y
    )
    return X_tr, y_tr, X_te, y_te
