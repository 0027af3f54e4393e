#!/usr/bin/env python3
"""The shape of the server, counted: Shard's fields and cells, the files with `impl Shard`,
process-wide mutable statics, import circles between top-level modules and between shard
files, the largest files. Usage: python3 scripts/shape.py [ROOT] [-v]  (-v: the circles' edges)."""
import os, re, sys, itertools
root = sys.argv[1] if len(sys.argv) > 1 else '.'
src = os.path.join(root, 'src')
files = {}
for d, _, fs in os.walk(src):
    for f in fs:
        if f.endswith('.rs'):
            p = os.path.join(d, f)
            files[os.path.relpath(p, src)] = open(p).read()
state = files.get('shard/state.rs', '')
m = re.search(r'pub struct Shard \{(.*?)\n\}', state, re.S)
fields = [l for l in m.group(1).splitlines() if re.match(r'\s*(pub(\(\w+\))? )?\w+: ', l)] if m else []
cells = [l for l in fields if 'Cell<' in l]
print(f"Shard fields: {len(fields)}, of them Cell/RefCell: {len(cells)}")
impl_files = sorted(p for p, s in files.items() if re.search(r'^impl Shard \{', s, re.M))
print(f"files with `impl Shard`: {len(impl_files)} {impl_files}")
statics = []
for p, s in files.items():
    if '_tests' in p or p.endswith('tests.rs'): continue
    for mm in re.finditer(r'^\s*(pub(\(\w+\))? )?static (\w+)\s*:\s*([^=]+)=', s, re.M):
        # skip statics inside #[cfg(test)] modules roughly: look back for 'mod tests'
        before = s[:mm.start()]
        if 'mod tests' in before and before.rfind('mod tests') > before.rfind('\n}\n'): continue
        statics.append((p, mm.group(3), mm.group(4).strip()))
mut = [x for x in statics if re.search(r'OnceLock|RwLock|Mutex|Atomic|RefCell|Cell', x[2])]
print(f"process-wide mutable statics: {len(mut)}")
for p, n, t in mut: print(f"   {p}: {n}: {t}")
def top(p):
    return p.split('/')[0].removesuffix('.rs')
graph = {}
for p, s in files.items():
    if '_tests' in p or 'tests.rs' in p or '/sim/' in p: continue
    code = re.sub(r'//.*', '', s)
    code = re.split(r'#\[cfg\(test\)\]\s*mod tests', code)[0]
    a = top(p)
    for mm in re.finditer(r'crate::(\w+)', code):
        b = mm.group(1)
        if b != a and os.path.exists(os.path.join(src, b + '.rs')) or os.path.isdir(os.path.join(src, b)):
            if b != a: graph.setdefault(a, set()).add(b)
def sccs(g):
    index = {}; low = {}; st = []; on = set(); out = []; i = [0]
    def visit(v):
        index[v] = low[v] = i[0]; i[0] += 1; st.append(v); on.add(v)
        for w in g.get(v, ()):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in list(g): 
        if v not in index: visit(v)
    return out
print("top-level module circles:", sccs(graph) or "none")
sg = {}
for p, s in files.items():
    if not p.startswith('shard/') or 'tests' in p: continue
    a = p.removeprefix('shard/').removesuffix('.rs').removesuffix('/mod')
    code = re.sub(r'//.*', '', s)
    for mm in re.finditer(r'crate::shard::(\w+)', code):
        if mm.group(1) != a: sg.setdefault(a, set()).add(mm.group(1))
    for mm in re.finditer(r'\bsuper::(\w+)', code):
        if mm.group(1) != a and os.path.exists(os.path.join(src, 'shard', mm.group(1) + '.rs')): sg.setdefault(a, set()).add(mm.group(1))
print("shard file circles:", sccs(sg) or "none")
big = sorted(((len(s.splitlines()), p) for p, s in files.items()), reverse=True)[:8]
print("largest files:", ", ".join(f"{p} {n}" for n, p in big))
print(f"src files: {len(files)}, lines: {sum(len(s.splitlines()) for s in files.values())}")
if '-v' in sys.argv:
    for comp in sccs(graph):
        for a in comp:
            print("  ", a, "->", sorted(set(graph.get(a, ())) & set(comp)))
