#!/usr/bin/env python3
"""Fails if the modules of a crate import each other in a circle.

For every crate given (default: every crate of the workspace and fuzz/), reads
its src/ tree, maps each file to its top-level module (`src/chat/session.rs`
is `chat`), and draws an arrow from module A to module B whenever code under
A names `crate::B` (in a `use` line, a path, or a `use crate::{B, ...}`
group). `super::` paths stay inside their module and are not arrows. It then
looks for strongly connected components: any with two or more modules is a
circle, printed with the lines that make its arrows, and the exit status is 1.

Circles between crates cannot happen (cargo refuses them); circles inside a
module's own files (`chat/mod.rs` and `chat/session.rs`) are that module's
business and are not counted.

A circle being taken apart can be named with `--allow CRATE:MOD,MOD,...`:
exactly that circle passes (and is printed as known); one that grows, a new
one, or an allowed one that no longer exists fails, so the allowance only
ever shrinks and is removed once the arrows point one way.

usage: scripts/module-cycles.py [--graph] [--allow CRATE:MOD,...] [CRATE_DIR ...]
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["gateway", "router", "ws", "readiness", "loadgen", "benches", "tuning", "fuzz"]


def strip_comments(text):
    # Line comments (doc comments included) and block comments; strings are
    # left alone, which is good enough for `crate::` paths.
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def top_module(src, path):
    rel = os.path.relpath(path, src)
    parts = rel.split(os.sep)
    if len(parts) == 1:
        name = parts[0][:-3]
        return None if name in ("lib", "main") else name
    if parts[0] == "bin":
        return None
    return parts[0]


def uses_in(text):
    """Yields (module, line number) for each `crate::<module>` named."""
    for m in re.finditer(r"\bcrate::(\{)?", text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(1):
            # A group: `crate::{a, b::{c, d}, e}`; only its top level counts.
            depth, i, start = 1, m.end(), m.end()
            items = []
            while i < len(text) and depth:
                c = text[i]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        items.append(text[start:i])
                elif c == "," and depth == 1:
                    items.append(text[start:i])
                    start = i + 1
                i += 1
            for item in items:
                name = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", item)
                if name:
                    yield name.group(1), line
        else:
            name = re.match(r"([A-Za-z_][A-Za-z0-9_]*)", text[m.end():])
            if name:
                yield name.group(1), line


def graph(crate_dir):
    src = os.path.join(crate_dir, "src")
    files = []
    for dirpath, _, names in os.walk(src):
        files += [os.path.join(dirpath, n) for n in names if n.endswith(".rs")]
    modules = {top_module(src, f) for f in files} - {None}
    edges = {}
    for f in sorted(files):
        a = top_module(src, f)
        if a is None:
            continue
        with open(f, encoding="utf-8") as fh:
            text = strip_comments(fh.read())
        for b, line in uses_in(text):
            if b in modules and b != a:
                rel = os.path.relpath(f, ROOT)
                edges.setdefault((a, b), []).append(f"{rel}:{line}")
    return modules, edges


def cycles(modules, edges):
    """Tarjan's strongly connected components of two or more modules."""
    adj = {m: sorted(b for (a, b) in edges if a == m) for m in modules}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def main(argv):
    show = "--graph" in argv
    allowed = set()
    rest = []
    it = iter(argv)
    for a in it:
        if a == "--allow":
            spec = next(it, None)
            if spec is None or ":" not in spec:
                print("--allow takes CRATE:MOD,MOD,... (e.g. gateway:chat,conn)")
                return 2
            crate, mods = spec.split(":", 1)
            allowed.add((crate, tuple(sorted(mods.split(",")))))
        elif a != "--graph":
            rest.append(a)
    dirs = rest or DEFAULT
    bad = 0
    seen = set()
    for d in dirs:
        crate_dir = os.path.join(ROOT, d)
        if not os.path.isdir(os.path.join(crate_dir, "src")):
            continue
        modules, edges = graph(crate_dir)
        if show:
            for (a, b) in sorted(edges):
                print(f"{d}: {a} -> {b}")
        for comp in cycles(modules, edges):
            if (d, tuple(comp)) in allowed:
                seen.add((d, tuple(comp)))
                print(f"{d}: known circle (allowed, to be taken apart): {', '.join(comp)}")
                continue
            bad += 1
            print(f"{d}: modules in a circle: {', '.join(comp)}")
            for (a, b), where in sorted(edges.items()):
                if a in comp and b in comp:
                    print(f"  {a} -> {b}: {', '.join(where[:3])}"
                          + (f" (+{len(where) - 3} more)" if len(where) > 3 else ""))
    for crate, comp in sorted(allowed - seen):
        if crate in dirs:
            bad += 1
            print(f"{crate}: the allowed circle {', '.join(comp)} is gone or changed: "
                  "drop or shrink its --allow")
    if bad:
        print(f"{bad} circle(s) between modules; make the arrows point one way")
        return 1
    known = " (besides the allowed ones above)" if seen else ""
    print(f"no circles between modules{known} in: " + ", ".join(dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
