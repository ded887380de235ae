"""Cut three devices' own data files (and an optional server test file) from AG News, for the own-data example.

    python deploy/examples/own-data/make_data.py [--source ../shared/datasets/ag_news/test.csv] [--out DIR]
        [--per-device 300] [--test 400]

Writes DIR/device_alpha.csv, device_bravo.csv, device_charlie.csv (columns text,label; disjoint rows; each
device's label mix skewed towards a different class, as real devices' data is) and DIR/test.csv. Nothing
here is committed: the data stays where it was made.
"""
from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEVICES = ("alpha", "bravo", "charlie")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(HERE.parents[2].parent / "shared" / "datasets" / "ag_news" / "test.csv"))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--per-device", type=int, default=300)
    ap.add_argument("--test", type=int, default=400)
    a = ap.parse_args(argv)
    with open(a.source, newline="") as f:  # AG News: no header; label, title, description
        rows = [(f"{title} {desc}", label) for label, title, desc in csv.reader(f)]
    random.Random(0).shuffle(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    test, pool = rows[:a.test], rows[a.test:]
    for i, name in enumerate(DEVICES):  # half the device's rows from its favourite class, half from any
        fav = str(i + 1)
        mine = [r for r in pool if r[1] == fav][:a.per_device // 2]
        taken = set(map(id, mine))
        rest = [r for r in pool if id(r) not in taken][:a.per_device - len(mine)]
        pool = [r for r in pool if id(r) not in taken and r not in rest]
        _write(out / f"device_{name}.csv", mine + rest)
    _write(out / "test.csv", test)
    print(f"wrote {len(DEVICES)} device files of {a.per_device} rows and test.csv ({a.test} rows) to {out}")
    return 0


def _write(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


if __name__ == "__main__":
    raise SystemExit(main())
