"""Manifests fuzzed: any YAML, any mutation of a shipped manifest, any `--set`, never a traceback.

Every input is either a valid manifest or a ManifestError whose problems are `field.path: message`
lines; through the CLI (`dgaug validate`, `dgaug plan`) exit code 0 or 2 and no traceback.
Examples per test: DGAUG_FUZZ_EXAMPLES (default a few dozen, so the module takes well under a
minute); set it to thousands for a longer fuzzing session.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dgaug.cli.app import app
from dgaug.core import errors as exitcodes
from dgaug.job.manifest import (
    Manifest,
    ManifestError,
    apply_overrides,
    dump_manifest,
    load_manifest,
    read_yaml,
    validate,
)
from tests.helpers import REPO

EXAMPLES = int(os.environ.get("DGAUG_FUZZ_EXAMPLES", "0")) or None


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=EXAMPLES or n,
        deadline=None,
        database=None,  # nothing written into the repository
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


SHIPPED = sorted((REPO / "manifests").glob("*.yaml"))
SHIPPED_DATA = {p.name: yaml.safe_load(p.read_text()) for p in SHIPPED}

# ------------------------------------------------------------------------------------ strategies

WEIRD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n",
    "{",
    "}{",
    "{0}",
    "{domain.x}",
    "{label[9]}",
    "{domain!z}",
    "{domain:{x}}",
    "{a,b",
    "{0..3",
    "{00000..00002}.tar",
    "*",
    "**/*.tar",
    "?",
    "[",
    "..",
    "../../../etc/passwd",
    "/",
    "/dev/null",
    "~",
    "~nobody/x",
    "file://",
    "file:///nonexistent/x.tsv",
    "s3://",
    "s3://bucket/x",
    "foo://bar",
    "memory://x",
    "http://[::1",
    "http://user:pass@host/x",
    "s3://KEY:SECRET@bucket/x",
    "https://h/x.tsv?X-Amz-Signature=abc",
    "hf-hub:",
    "hf-hub:org/name",
    "tiny-random",
    "ViT-B-32:",
    ":",
    "ARCH:/nonexistent.pt",
    "ℌ𝔢𝔩𝔩𝔬 ünï \u202e rtl",
    "\ud7ff\ue000\ufffd",
    "a" * 5000,
    "1e999",
    "-0",
    "NaN",
    "null",
    "~/.ssh/id_rsa",
    "cuda:99",
    "auto",
]

HUGE = st.sampled_from([2**63, 2**64 + 1, -(2**63) - 1, 10**100, -(10**30)])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(WEIRD_STRINGS),
)
keys = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        ["kind", "path", "output", "seed", "enabled", "model", "source", "stages", "x.y", ""]
    ),
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a nested dict/list structure (the root excluded)."""
    out = []
    if isinstance(node, dict):
        items = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return out
    for k, v in items:
        out.append((*prefix, k))
        out.extend(_paths(v, (*prefix, k)))
    return out


def _parent(root: Any, path: tuple) -> Any:
    for p in path[:-1]:
        root = root[p]
    return root


@st.composite
def mutated_manifest(draw) -> dict[str, Any]:
    """A shipped manifest with one to three mutations at random places."""
    name = draw(st.sampled_from(sorted(SHIPPED_DATA)))
    data = copy.deepcopy(SHIPPED_DATA[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        key = path[-1]
        op = draw(
            st.sampled_from(["replace", "delete", "unknown", "wrap", "nest", "weird", "huge"])
        )
        if op == "replace":
            parent[key] = draw(yaml_values)
        elif op == "delete":
            del parent[key]
        elif op == "unknown" and isinstance(parent, dict):
            parent[draw(keys)] = draw(yaml_values)
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "nest":
            parent[key] = {draw(keys): parent[key]}
        elif op == "weird":
            parent[key] = draw(st.sampled_from(WEIRD_STRINGS))
        elif op == "huge":
            parent[key] = draw(HUGE)
    return data


def _override_values() -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=20),
        st.sampled_from(WEIRD_STRINGS),
        yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
        st.sampled_from(["[", "{a: [}", "!!python/object:os.system x", "&a [*a]", "- a\n- b"]),
    )


def _override_keys() -> st.SearchStrategy[str]:
    known = sorted({".".join(map(str, p)) for d in SHIPPED_DATA.values() for p in _paths(d)})
    return st.one_of(
        st.sampled_from(known),
        st.text(max_size=20),
        st.lists(keys, min_size=1, max_size=4).map(".".join),
    )


overrides = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", _override_keys(), _override_values()),
        st.text(max_size=20),
    ),
    max_size=3,
)

# --------------------------------------------------------------------------------------- oracles

# `field.path: message`: a path (no spaces unless it echoes a fuzzed key) then ": ".
PROBLEM = re.compile(r"^\S.*?: .+", re.S)


def check_problems(e: ManifestError) -> None:
    assert e.problems, "a ManifestError names at least one problem"
    for p in e.problems:
        assert isinstance(p, str) and PROBLEM.match(p), repr(p)
        assert "Traceback" not in p


def validate_or_problems(data: Any) -> Manifest | None:
    try:
        m = validate(data)
    except ManifestError as e:
        check_problems(e)
        return None
    # A valid manifest also round-trips through its saved form.
    assert validate(yaml.safe_load(dump_manifest(m))) == m
    return m


# ------------------------------------------------------------------------------ library entries


@fuzz_settings(150)
@given(data=st.dictionaries(keys, yaml_values, max_size=6))
def test_random_structures_validate_or_list_problems(data: dict) -> None:
    validate_or_problems(data)


@fuzz_settings(300)
@given(data=mutated_manifest())
def test_mutated_shipped_manifests_validate_or_list_problems(data: dict) -> None:
    validate_or_problems(data)


@fuzz_settings(200)
@given(name=st.sampled_from(sorted(SHIPPED_DATA)), items=overrides)
def test_random_overrides_apply_or_list_problems(name: str, items: list[str]) -> None:
    data = copy.deepcopy(SHIPPED_DATA[name])
    try:
        data = apply_overrides(data, items)
    except ManifestError as e:
        check_problems(e)
        return
    validate_or_problems(data)


@fuzz_settings(150)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_random_yaml_text_loads_or_lists_problems(text: str | bytes, tmp_path_factory) -> None:
    p = tmp_path_factory.mktemp("yaml") / "m.yaml"
    p.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        load_manifest(p)
    except ManifestError as e:
        check_problems(e)


@fuzz_settings(100)
@given(
    name=st.sampled_from(sorted(SHIPPED)),
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 40), st.text(max_size=8))),
)
def test_mutated_yaml_text_loads_or_lists_problems(name, cuts, tmp_path_factory) -> None:
    text = name.read_text()
    for at, n, ins in cuts:
        at %= len(text) + 1
        text = text[:at] + ins + text[at + n :]
    p = tmp_path_factory.mktemp("yaml") / "m.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_manifest(p)
    except ManifestError as e:
        check_problems(e)


@pytest.mark.parametrize(
    "text, problem",
    [
        # Billion laughs: aliases are shared, not copied, but pydantic would walk every use.
        (
            "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n"
                for i in range(8)
            )
            + "output: o\nsource: {kind: synthetic}\nstages: {download: {disallowed_header_directives: *i}}\n",
            "too large",
        ),
        ("output: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ],
    ids=["alias-bomb", "deep-nesting"],
)
def test_hostile_yaml_is_refused_quickly(tmp_path: Path, text: str, problem: str) -> None:
    p = tmp_path / "m.yaml"
    p.write_text(text)
    with pytest.raises(ManifestError, match=problem) as exc:
        read_yaml(p)
    check_problems(exc.value)


# ------------------------------------------------------------------------------------- the CLI

runner = CliRunner()


def _invoke_cli(cmd: str, data: Any, items: list[str], folder: Path) -> None:
    m = folder / "m.yaml"
    m.write_text(yaml.safe_dump(data, allow_unicode=True))
    args = [cmd, str(m)] + [a for item in items for a in ("--set", item)]
    # Relative paths of the shipped manifests resolve in an empty folder, never in the repo.
    with contextlib.chdir(folder):
        r = runner.invoke(app, args)
    out = r.output
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"dgaug {cmd} raised {r.exception!r}:\n{out}") from r.exception
    assert "Traceback" not in out, out
    assert r.exit_code in (exitcodes.OK, exitcodes.INVALID), (r.exit_code, out)
    if r.exit_code == exitcodes.INVALID:
        assert out.startswith("error: "), out
    # Plan and validate never write into the output folder.
    assert not (folder / "out").exists()


def _with_output(data: Any) -> Any:
    if isinstance(data, dict) and isinstance(data.get("output"), str):
        data["output"] = "out"
    return data


@fuzz_settings(40)
@given(data=mutated_manifest(), items=overrides, cmd=st.sampled_from(["validate", "plan"]))
def test_cli_on_mutated_manifests_exits_0_or_2(data, items, cmd, tmp_path_factory) -> None:
    _invoke_cli(cmd, _with_output(data), items, tmp_path_factory.mktemp("cli"))


@fuzz_settings(25)
@given(
    data=st.dictionaries(keys, yaml_values, max_size=6), cmd=st.sampled_from(["validate", "plan"])
)
def test_cli_on_random_structures_exits_2(data, cmd, tmp_path_factory) -> None:
    _invoke_cli(cmd, data, [], tmp_path_factory.mktemp("cli"))


# ------------------------------------------------------------------ crashes the fuzzing found


def _pacs() -> dict:
    return copy.deepcopy(SHIPPED_DATA["pacs.yaml"])


def _demo() -> dict:
    return copy.deepcopy(SHIPPED_DATA["demo.yaml"])


def _set(data: dict, path: str, value: Any) -> dict:
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    "data, problem",
    [
        # str.format attribute access raised AttributeError out of pydantic: a traceback.
        (_set(_pacs(), "source.caption_template", "{domain.x}"), "source.caption_template: "),
        (_set(_pacs(), "source.caption_template", "{domain.__class__}"), "not ['domain."),
        # A NUL byte reached os calls (ValueError: embedded null byte) in `plan`.
        (_set(_demo(), "output", "out\x00put"), "output: must not contain a NUL"),
        (_set(_pacs(), "source.path", "\x00"), "source.path: must not contain a NUL"),
        ({**_demo(), "name": "\ud800"}, "name: is not valid text"),
        # Unbalanced braces raised braceexpand's error in `validate` and `plan`.
        (_set(_demo(), "source", {"kind": "shards", "path": "/d/{0..3.tar"}), "source.path: "),
        # An unknown fsspec protocol raised ValueError when the output was opened.
        (_set(_demo(), "output", "foo://bucket/out"), "output: unknown storage protocol"),
        (
            _set(_demo(), "source", {"kind": "url_list", "path": ["ok.tsv", "nope://x.tsv"]}),
            "source.path: unknown storage protocol",
        ),
        # Keys that are empty or hold dots are quoted in the field path.
        ({**_demo(), "": 1, "a.b": 2}, "'a.b': unknown field"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_found_crashes_are_problems(tmp_path: Path, data: dict, problem: str) -> None:
    with pytest.raises(ManifestError) as exc:
        validate(data)
    check_problems(exc.value)
    assert any(problem in p for p in exc.value.problems), exc.value.problems
    data = _with_output(data) if "output" not in problem else data
    if "\ud800" not in str(data):
        _invoke_cli("plan", data, [], tmp_path)


def test_train_template_with_attribute_access_is_a_problem() -> None:
    # The same AttributeError, in the trainer's own template check (dgaug/trainer/config.py).
    data = _set(_demo(), "train.eval.caption_template", "{domain.x}")
    with pytest.raises(ManifestError) as exc:
        validate(data)
    assert any(p.startswith("train.eval.caption_template: ") for p in exc.value.problems)


def test_output_on_a_store_whose_package_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    # Hide s3fs whether or not it is installed: `import s3fs` fails, no cached class is reused.
    registry = importlib.import_module("fsspec.registry")  # the module; fsspec.registry is a dict
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    data = _set(_demo(), "output", "s3://bucket/out")
    validate(data)  # a known protocol: valid
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(data))
    for cmd in ("plan", "status", "run"):
        r = runner.invoke(app, [cmd, str(m)])
        assert r.exit_code == exitcodes.INVALID, (cmd, r.output)
        assert "Install s3fs" in r.output and "Traceback" not in r.output, r.output
