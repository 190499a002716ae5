#!/usr/bin/env python3
"""Fails when the crate's modules import each other in a cycle.

Reads every `crate::a::b` and `super::x` path in src/ (comments skipped) and checks two
graphs: top-level modules (`train -> active`) and their children (`train::ada -> active::ledger`).
A cycle at either level is printed with its edges, and the exit status is 1.
"""
import collections
import os
import re
import sys


def modules(root):
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".rs"):
                path = os.path.join(folder, name)
                module = re.sub(r"::mod$", "", path[len(root) + 1 : -3].replace("/", "::"))
                if module not in ("lib", "main"):
                    text = open(path, encoding="utf-8").read()
                    found[module] = re.sub(r"//.*", "", text)
    return found


def resolve(path, known):
    """The longest known module a path names (`train::ada::AdaRun` -> `train::ada`)."""
    parts = path.split("::")
    for k in range(len(parts), 0, -1):
        if "::".join(parts[:k]) in known:
            return "::".join(parts[:k])
    return None


def edges(found, depth):
    top = lambda m: "::".join(m.split("::")[:depth])
    out = set()
    for module, text in found.items():
        targets = [resolve(p, found) for p in re.findall(r"crate::([a-z_0-9]+(?:::[a-z_0-9]+)*)", text)]
        parent = "::".join(module.split("::")[:-1])
        for p in re.findall(r"super::([a-z_0-9]+)", text):
            targets.append(resolve(f"{parent}::{p}" if parent else p, found))
        for target in targets:
            if target and top(target) != top(module):
                out.add((top(module), top(target)))
    return out


def cycles(graph_edges):
    graph = collections.defaultdict(set)
    for a, b in graph_edges:
        graph[a].add(b)
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted({a for a, _ in graph_edges} | {b for _, b in graph_edges}):
        if v not in index:
            visit(v)
    return result


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "src"
    found = modules(root)
    failed = False
    for depth in (1, 2):
        graph_edges = edges(found, depth)
        for component in cycles(graph_edges):
            failed = True
            print(f"import cycle among {', '.join(component)}:")
            for a, b in sorted(graph_edges):
                if a in component and b in component:
                    print(f"  {a} -> {b}")
    if not failed:
        print(f"module graph of {root}/: no import cycles ({len(found)} modules)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
