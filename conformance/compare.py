#!/usr/bin/env python3
"""Compares an Autobahn index.json with the committed expected results.

Usage: compare.py REPORT_INDEX_JSON EXPECTED_JSON [--update]

Every case's `behavior` and `behaviorClose` must match; a case missing from
either side is a difference. With --update the expected file is rewritten.
"""
import json
import sys


def load_report(path):
    with open(path) as f:
        index = json.load(f)
    (agent,) = index.values()
    return {case: {"behavior": r["behavior"], "behaviorClose": r["behaviorClose"]}
            for case, r in agent.items()}


def case_key(case):
    return [int(p) for p in case.split(".")]


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    got = load_report(argv[1])
    ordered = {c: got[c] for c in sorted(got, key=case_key)}
    if "--update" in argv:
        with open(argv[2], "w") as f:
            json.dump(ordered, f, indent=1, sort_keys=False)
            f.write("\n")
        print(f"compare.py: wrote {len(ordered)} cases to {argv[2]}")
        return 0
    with open(argv[2]) as f:
        expected = json.load(f)
    diffs = []
    for case in sorted(set(got) | set(expected), key=case_key):
        a, b = expected.get(case), got.get(case)
        if a != b:
            diffs.append(f"  {case}: expected {a}, got {b}")
    counts = {}
    for r in got.values():
        counts[r["behavior"]] = counts.get(r["behavior"], 0) + 1
    print("compare.py: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if diffs:
        print(f"compare.py: {len(diffs)} cases differ from {argv[2]}:")
        print("\n".join(diffs))
        return 1
    print(f"compare.py: all {len(got)} cases match {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
