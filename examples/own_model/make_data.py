"""Write the example's data files from data sets that ship with scikit-learn (no download).

    cancer.npz        569 tumours x 30 measurements, classes malignant/benign (arrays x, y, class_names)
    wine.csv          178 wines x 13 measurements and a `cultivar` column holding the class names
    digit_images/     the 1797 8x8 handwritten digits as PNG files, one folder per digit
"""
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_digits, load_wine

here = Path(__file__).resolve().parent

cancer = load_breast_cancer()
np.savez(here / "cancer.npz", x=cancer.data.astype(np.float32), y=cancer.target,
         class_names=np.array(cancer.target_names))

wine = load_wine(as_frame=True)
frame = wine.frame.rename(columns={"target": "cultivar"})
frame["cultivar"] = frame["cultivar"].map({0: "barolo", 1: "grignolino", 2: "barbera"})
frame.to_csv(here / "wine.csv", index=False)

digits = load_digits()
root = here / "digit_images"
for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    folder = root / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")

print(f"wrote {here / 'cancer.npz'}, {here / 'wine.csv'} and {len(digits.images)} images under {root}")
