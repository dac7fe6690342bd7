"""Search-space loading: the API, and every validation error naming its file and key."""
from __future__ import annotations

from pathlib import Path

import pytest

from momtune.errors import SearchSpaceError
from momtune.space import canonical, load_space, parse_space, space_names

from .conftest import SPACES
from .fake_template import FAKE

GOOD = """
[template]
name = "fake"
description = "test"

[parameters.BLOCK]
choices = [16, 32, 64]
default = 32

[parameters.num_warps]
choices = [1, 2, 4]
default = 1

[[constraints]]
expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"
why = "tile too large"

[shapes.tiny]
dtype = "float32"
shapes = [ { N = 7, C = 3 }, { N = 1, C = 1 } ]

[shapes.big]
dtype = "bfloat16"
shapes = [ { N = 4096, C = 64 } ]
"""


def write(tmp_path: Path, text: str, name: str = "fake") -> Path:
    (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def test_load_good_space_api(tmp_path: Path) -> None:
    space = load_space("fake", write(tmp_path, GOOD), template=FAKE)
    assert list(space.parameters) == ["BLOCK", "num_warps"]
    assert space.parameters["BLOCK"].choices == (16, 32, 64)
    assert space.default_config() == {"BLOCK": 32, "num_warps": 1}
    dtype, shapes = space.shape_sets["tiny"]
    assert dtype == "float32" and shapes == [{"N": 7, "C": 3}, {"N": 1, "C": 1}]
    assert space.shape_sets["big"].dtype == "bfloat16"
    # N*C = 21: BLOCK <= 21 -> 16 only; num_warps*16 <= 16 -> 1
    assert space.enumerate({"N": 7, "C": 3}) == [{"BLOCK": 16, "num_warps": 1}]
    assert space.size({"N": 4096, "C": 64}) == 1 + 2 + 3
    ok, why = space.is_valid({"BLOCK": 64, "num_warps": 1}, {"N": 7, "C": 3})
    assert not ok and "tile too large" in why and "BLOCK <= max" in why
    assert space.is_valid({"BLOCK": 64, "num_warps": 4}, {"N": 4096, "C": 64}) == (True, "")
    ok, why = space.is_valid({"BLOCK": 48, "num_warps": 1}, {"N": 7, "C": 3})
    assert not ok and "BLOCK=48 is not one of" in why
    assert canonical({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_load_from_test_dir_and_names() -> None:
    assert {"fake", "faulty", "slow"} <= set(space_names(SPACES))
    assert load_space("faulty", SPACES).size({"N": 7, "C": 9}) == 9


def test_package_spaces_load() -> None:
    names = space_names()
    assert set(names) == {"routing", "recurrence", "merge", "conv", "decode", "norm", "swiglu", "norm_bwd", "swiglu_bwd",
                          "merge_bwd", "routing_bwd", "conv_bwd", "recurrence_bwd"}
    for name in names:
        space = load_space(name)
        assert "tiny" in space.shape_sets
        for shape in space.shape_sets["tiny"].shapes:
            assert space.is_valid(space.default_config(), shape)[0] or space.size(shape) > 0


BAD = [
    ("unknown-top-level", ("[shapes.tiny]", "[extra]\nx = 1\n\n[shapes.tiny]"), "extra", "unknown key"),
    ("unknown-parameter-field", ("default = 32\n", "default = 32\nstep = 2\n"), "parameters.BLOCK.step", "unknown key"),
    ("unknown-constraint-field", ('why = "tile too large"', 'why = "x"\nhint = "y"'), "constraints[0].hint", "unknown key"),
    ("unknown-template-field", ('description = "test"', 'description = "test"\nauthor = "me"'), "template.author",
     "unknown key"),
    ("empty-choices", ("choices = [16, 32, 64]", "choices = []"), "parameters.BLOCK.choices", "non-empty"),
    ("default-not-in-choices", ("default = 32\n", "default = 48\n"), "parameters.BLOCK.default", "not one of"),
    ("default-wrong-type", ("default = 32\n", 'default = "32"\n'), "parameters.BLOCK.default", "not one of"),
    ("mixed-types", ("choices = [16, 32, 64]", 'choices = [16, "32", 64.0]'), "parameters.BLOCK.choices", "mixed types"),
    ("repeated-choice", ("choices = [16, 32, 64]", "choices = [16, 32, 32]"), "parameters.BLOCK.choices", "repeated"),
    ("constraint-syntax", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"', 'expr = "BLOCK <= <= 3"'),
     "constraints[0].expr", "does not parse"),
    ("constraint-attribute", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                              'expr = "BLOCK.bit_length() < 9"'), "constraints[0].expr", "not allowed"),
    ("constraint-other-call", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                               "expr = \"__import__('os') or BLOCK > 0\""), "constraints[0].expr", "only min"),
    ("constraint-subscript", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                              'expr = "[BLOCK][0] > 0"'), "constraints[0].expr", "not allowed"),
    ("constraint-lambda", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                           'expr = "(lambda: 1)() > 0"'), "constraints[0].expr", "not allowed"),
    ("constraint-unknown-name", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                                 'expr = "BLOCK <= BV"'), "constraints[0].expr", "unknown names ['BV']"),
    ("constraint-excludes-all-params", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                                        'expr = "BLOCK > 64"'), "constraints[0].expr", "excludes every config"),
    ("constraint-excludes-all-for-shape", ('expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"',
                                           'expr = "BLOCK <= N"'), "shapes.tiny.shapes[0]", "no config is valid"),
    ("unknown-shape-key", ("{ N = 1, C = 1 }", "{ N = 1, C = 1, H = 2 }"), "shapes.tiny.shapes[1].H",
     "unknown shape key"),
    ("missing-shape-key", ("{ N = 1, C = 1 }", "{ N = 1 }"), "shapes.tiny.shapes[1]", "missing shape keys ['C']"),
    ("missing-tiny", ("[shapes.tiny]", "[shapes.small]"), "shapes.tiny", "missing"),
    ("bad-dtype", ('dtype = "float32"', 'dtype = "fp32"'), "shapes.tiny.dtype", "not accepted"),
    ("name-mismatch", ('name = "fake"', 'name = "other"'), "template.name", "does not match"),
    ("not-toml", ("[template]", "[template"), "", "not valid TOML"),
    ("negative-size", ("{ N = 1, C = 1 }", "{ N = -1, C = 1 }"), "shapes.tiny.shapes[1].N", "non-negative"),
]


@pytest.mark.parametrize("old_new,key,msg", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_space_names_file_and_key(tmp_path: Path, old_new: tuple[str, str], key: str, msg: str) -> None:
    old, new = old_new
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(SearchSpaceError) as err:
        load_space("fake", path, template=FAKE)
    text = str(err.value)
    assert str(path / "fake.toml") in text
    assert key in text and msg in text, text


def test_missing_file_lists_known(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    with pytest.raises(SearchSpaceError, match=r"nope\.toml.*known: \['fake'\]"):
        load_space("nope", tmp_path)


def test_shape_keys_from_sets_without_template() -> None:
    space = parse_space(GOOD, "inline.toml", name="fake")
    assert space.shape_keys == ("N", "C")
    with pytest.raises(SearchSpaceError, match="inline.toml: constraints\\[0\\].expr"):
        parse_space(GOOD.replace("max(16, N * C)", "max(16, Q)"), "inline.toml", name="fake")


def test_check_config_of_template_applies(tmp_path: Path) -> None:
    from dataclasses import replace

    tmpl = replace(FAKE, check_config=lambda shape, cfg: "too many warps" if cfg["num_warps"] > 1 else "")
    space = load_space("fake", write(tmp_path, GOOD), template=tmpl)
    assert space.is_valid({"BLOCK": 64, "num_warps": 2}, {"N": 4096, "C": 64}) == (False, "too many warps")
    assert space.size({"N": 4096, "C": 64}) == 3


def test_a_missing_space_dir_is_named(tmp_path: Path) -> None:
    from momtune.space import space_names

    with pytest.raises(SearchSpaceError, match=r"^--space-dir .*nowhere: no such folder$"):
        load_space("norm", tmp_path / "nowhere")
    with pytest.raises(SearchSpaceError, match="no such folder"):
        space_names(tmp_path / "nowhere")


# ---- constraints are evaluated at bounded cost (issue 15: BLOCK_T ** (V ** 99) > 0 hung the search)

GOOD_EXPR = 'expr = "BLOCK <= max(16, N * C) and num_warps * 16 <= BLOCK"'
UNBOUNDED = [
    ("power-tower", "BLOCK ** (N ** 99) > 0", "a power in an exponent"),
    ("power-tower-literal", "2 ** 3 ** 4 > BLOCK", "a power in an exponent"),
    ("large-power", "(BLOCK ** 60) ** 60 > 0", "has more than 256 bits"),
    ("large-power-of-a-shape", "N ** 300 > BLOCK", "has more than 256 bits"),
    ("large-product", "BLOCK * 10 ** 70 * 10 ** 70 > 0", "has more than 256 bits"),
    ("huge-literal", f"BLOCK < {10 ** 100}", "constant of 333 bits"),
    ("string-repeat", "'ab' * 1000000000 == 'x' or BLOCK > 0", "arithmetic on a string"),
    ("string-format", "'%0999999999d' % BLOCK == 'x' or BLOCK > 0", "arithmetic on a string"),
    ("long-expression", "BLOCK > 0" + " and BLOCK > 0" * 100, "a constraint has at most 1000"),
]


@pytest.mark.parametrize("expr,msg", [u[1:] for u in UNBOUNDED], ids=[u[0] for u in UNBOUNDED])
def test_constraints_of_unbounded_cost_are_refused(tmp_path: Path, expr: str, msg: str) -> None:
    path = write(tmp_path, GOOD.replace(GOOD_EXPR, f'expr = "{expr}"'))
    with pytest.raises(SearchSpaceError) as err:
        load_space("fake", path, template=FAKE)
    text = str(err.value)
    assert text.startswith(f"{path / 'fake.toml'}: constraints[0].expr: ") and msg in text, text


def test_arithmetic_on_a_string_parameter_is_refused_when_evaluated(tmp_path: Path) -> None:
    text = GOOD.replace("[[constraints]]", '[parameters.MODE]\nchoices = ["a", "b"]\ndefault = "a"\n\n[[constraints]]')
    path = write(tmp_path, text.replace(GOOD_EXPR, 'expr = "MODE * 1000000000 != \'x\' or BLOCK > 0"'))
    with pytest.raises(SearchSpaceError, match=r"fake.toml: constraints\[0\].expr: .* at BLOCK=16, MODE='a': "
                                               r"'\*' on str 'a': arithmetic takes numbers only"):
        load_space("fake", path, template=FAKE)


def test_powers_within_the_bounds_still_work(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace(GOOD_EXPR, 'expr = "2 ** num_warps <= BLOCK // 2 and BLOCK ** 2 <= 2 ** 12 '
                                                   'and (N * C) ** 0.5 >= 1"'))
    space = load_space("fake", path, template=FAKE)
    assert space.is_valid({"BLOCK": 32, "num_warps": 4}, {"N": 7, "C": 3}) == (True, "")
    assert not space.is_valid({"BLOCK": 16, "num_warps": 4}, {"N": 7, "C": 3})[0]  # 16 > 8
    assert not space.is_valid({"BLOCK": 64, "num_warps": 1}, {"N": 0, "C": 3})[0]  # 0 ** 0.5 < 1
    assert space.size({"N": 7, "C": 3}) == 8  # only BLOCK 16 with 4 warps is out


def test_the_hostile_constraint_fails_fast_instead_of_hanging(tmp_path: Path) -> None:
    """Run where a hang can be cut off: before the fix this took forever (2 ** (2 ** 396))."""
    import subprocess
    import sys

    from .conftest import ROOT, cli_env

    path = write(tmp_path, GOOD.replace(GOOD_EXPR, 'expr = "BLOCK ** (BLOCK ** 99) > 0"'))
    code = ("import sys; from momtune.space import load_space\n"
            "try:\n    load_space('fake', sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.stdout.startswith(f"SearchSpaceError {path / 'fake.toml'}: constraints[0].expr:"), proc.stdout


def test_starts_are_completed_with_defaults_and_checked(tmp_path: Path) -> None:
    space = parse_space(GOOD + '\n[[starts]]\nBLOCK = 64\nwhy = "fast on some GPU"\n\n[[starts]]\nnum_warps = 2\n',
                        "inline.toml", name="fake")
    assert space.starts == [{"BLOCK": 64, "num_warps": 1}, {"BLOCK": 32, "num_warps": 2}]
    assert parse_space(GOOD, "inline.toml", name="fake").starts == []
    for bad, key, msg in (("[[starts]]\nTILE = 64\n", "starts[0].TILE", "not a parameter"),
                          ("[[starts]]\nBLOCK = 48\n", "starts[0].BLOCK", "is not one of"),
                          ("[[starts]]\nBLOCK = 64\nwhy = 3\n", "starts[0].why", "must be a string"),
                          ("starts = 3\n", "starts", "array of tables")):
        text = GOOD.replace("[template]", bad + "\n[template]") if bad.startswith("starts =") else GOOD + "\n" + bad
        with pytest.raises(SearchSpaceError) as err:
            parse_space(text, "inline.toml", name="fake")
        assert key in str(err.value) and msg in str(err.value), str(err.value)
