"""The command-line tools and experiments: documented flags exist, unknown flags are refused before any work.

The scripts (``scripts/*.py``) and experiments (``experiments/*.py`` with a command line) are read with
``ast`` (never imported): the function(s) each one hands to fire, their parameters, and every
``python scripts/<name>.py ...`` / ``python -m scripts.<name>`` / ``python -m experiments.<name> ...``
command written in its own docstrings and in the READMEs.
"""

import ast
import glob
import os
import re

import pytest

from common.cli import UnknownFlagError, check_flags, json_spec, strict_fire
from zoo_testing import ROOT, run_script



def _has_cli(path):
    return os.path.basename(path) != "__init__.py" and 'if __name__ == "__main__":' in open(path).read()


SCRIPTS = sorted(p for p in glob.glob(os.path.join(ROOT, "scripts", "*.py")) if _has_cli(p))
SCRIPTS += sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py")) if _has_cli(p))
# owned by other parts of the project (their flags are checked by their own tests)
OTHERS = {"zoo.py", "evaluate.py", "check_data.py"}
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "bundles", "*", "docs", "README.md")))


def _args(fn, skip_self=False):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return (names[1:] if skip_self else names), a.kwarg is not None


def _fire_targets(path):
    """``{command or None: (parameter names, takes **kwargs)}`` of what the script gives to fire."""
    tree = ast.parse(open(path).read())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for n in ast.walk(tree):  # functions defined inside the `if __name__ == "__main__":` block too
        if isinstance(n, ast.FunctionDef):
            funcs.setdefault(n.name, n)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def params(name):
        fn = funcs[name]
        for dec in fn.decorator_list:  # @functools.wraps(other): fire sees other's signature
            if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "wraps":
                return params(dec.args[0].id)
        return _args(fn)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("strict_fire", "Fire"):
            comp = node.args[0]
            if isinstance(comp, ast.Dict):
                return {k.value: params(v.id) for k, v in zip(comp.keys, comp.values)}, funcs, tree
            if comp.id in classes:  # a class: its public methods are the commands
                methods = [m for m in classes[comp.id].body if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")]
                funcs.update({m.name: m for m in methods})
                return {m.name: _args(m, skip_self=True) for m in methods}, funcs, tree
            return {None: params(comp.id)}, funcs, tree
    raise AssertionError(f"{path}: no fire call found")


def _package(path):
    return os.path.basename(os.path.dirname(path))


def _commands(text, script, package="scripts"):
    """Every documented ``python scripts/<script> ...`` or ``python -m <package>.<module> ...`` call in
    ``text``: lists of its tokens after the name."""
    out = []
    joined = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    stem = re.escape(script[:-3])
    name = rf"(?:-m )?scripts/{re.escape(script)}|-m scripts\.{stem}" if package == "scripts" else rf"-m {package}\.{stem}"
    for m in re.finditer(rf"python (?:{name})(?![\w.])((?:[ \t]+[^\s`;|&#]+)*)", joined):
        out.append(m.group(1).split())
    return out


def _documented_flags(tokens, targets):
    cmd = None
    if None not in targets:
        positional = [t for t in tokens if not t.startswith("-")]
        cmd = tokens[0] if tokens and not tokens[0].startswith("-") else ("run" if "run" in targets else None)
        assert cmd in targets, f"command {cmd!r} (from {positional}) not one of {sorted(targets)}"
    if "--" in tokens:
        tokens = tokens[:tokens.index("--")]
    return cmd, [t[2:].split("=")[0].replace("-", "_") for t in tokens if t.startswith("--") and len(t) > 2]


@pytest.mark.parametrize("path", SCRIPTS, ids=[os.path.basename(p) for p in SCRIPTS])
def test_documented_flags_are_real(path):
    """Flags in the script's docstrings (module and fire functions) and in the READMEs exist."""
    name = os.path.basename(path)
    targets, funcs, tree = _fire_targets(path)
    texts = [(f"{name} docstring", ast.get_docstring(tree) or "")]
    texts += [(f"{name}:{f}()", ast.get_docstring(funcs[f]) or "") for f in funcs]
    texts += [(os.path.relpath(d, ROOT), open(d).read()) for d in DOCS]
    wrong = []
    for where, text in texts:
        for tokens in _commands(text, name, _package(path)):
            cmd, flags = _documented_flags(tokens, targets)
            names, var_kw = targets[cmd]
            wrong += [f"{where}: {name}{' ' + cmd if cmd else ''} --{f}" for f in flags
                      if not var_kw and f not in names and not (f.startswith("no") and f[2:] in names)]
    assert not wrong, "documented flags that do not exist:\n" + "\n".join(wrong)


def test_check_flags_rules():
    def main(out_dir="x", n: int = 1, verbose: bool = False):
        return out_dir

    check_flags(main, ["--out_dir", "a", "--n=3", "--verbose", "--noverbose", "--out-dir", "b"])
    check_flags(main, ["pos", "--n", "2", "--", "--help"])
    with pytest.raises(UnknownFlagError, match=r"unknown flag\(s\) --minutes; valid flags: --out_dir, --n, --verbose"):
        check_flags(main, ["--minutes", "3"])
    with pytest.raises(UnknownFlagError, match="too many positional"):
        check_flags(main, ["a", "1", "True", "extra"])
    with pytest.raises(UnknownFlagError, match="unknown command 'trian'"):
        check_flags({"train": main}, ["trian"])
    check_flags(lambda **kw: kw, ["--anything", "1"])
    ran = []
    with pytest.raises(SystemExit) as e:
        strict_fire(lambda n=1: ran.append(n), ["--m", "2"], name="t")
    assert e.value.code == 2 and not ran  # refused before the function ran
    assert strict_fire(lambda n=1: n * 2, ["--n", "4"], name="t") == 8


MINE = [p for p in SCRIPTS if os.path.basename(p) not in OTHERS]


@pytest.mark.parametrize("path", MINE, ids=[os.path.basename(p) for p in MINE])
def test_unknown_flag_is_refused_before_any_work(path, tmp_path):
    """The tool's ``__main__`` block (run in this process: zoo_testing.run_script) exits with status 2 and
    names the flag before it writes or starts anything."""
    targets, _, _ = _fire_targets(path)
    cmd = [] if None in targets else [sorted(targets)[0]]
    p = run_script(f"{_package(path)}.{os.path.basename(path)[:-3]}", *cmd, "--no_such_flag", "1", cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "unknown flag(s) --no_such_flag" in p.stderr
    assert os.listdir(tmp_path) == []  # nothing written, nothing started


def test_child_spec_travels_as_json_on_stdin(monkeypatch):
    """JSON's null/true/false reach a child as None/True/False; fire's parse of a command-line dict is refused."""
    import io
    import json
    import sys

    spec = {"save": None, "fast": False, "compile": True, "roi": [16, 32, 32], "overlap": 0.25, "path": "opt"}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(spec)))
    assert json_spec("stdin") == spec
    assert json_spec(json.dumps(spec)) == spec
    with pytest.raises(TypeError, match="stdin"):
        json_spec({"save": "null", "fast": "false"})  # what fire makes of --spec '{"save": null, ...}'
