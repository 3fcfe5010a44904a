"""A1111's prompt language as text: schedules, emphasis, AND, extra-network tags (no model)."""
import random

import pytest

from ldm_cli.prompt_syntax import BREAK, ExtraNetwork, and_parts, emphasis, extra_networks, schedule, weight_problem


def plan(prompt, steps=10):
    return [list(entry) for entry in schedule(prompt, steps)]


@pytest.mark.parametrize("prompt, expected", [
    ("a fox", [[10, "a fox"]]),
    ("a [fox:3]", [[3, "a "], [10, "a fox"]]),  # [to:N]: added after step N
    ("a [fox: 3 ] x", [[3, "a  x"], [10, "a fox x"]]),  # blanks around the number
    ("a [fox::4]", [[4, "a fox"], [10, "a "]]),  # [from::N]: removed after step N
    ("[fox:cat:2]", [[2, "fox"], [10, "cat"]]),
    ("[fox:cat:0.25]", [[2, "fox"], [10, "cat"]]),  # a decimal point: a fraction of the steps, int(2.5)
    ("[fox:cat:1.5]", [[10, "fox"]]),  # 1.5 of the steps: past the end, clamped to the last step
    ("[fox:cat:0]", [[10, "cat"]]),  # step 0: never before
    ("[fox:cat:30]", [[10, "fox"]]),  # after the last step
    ("[fox:[cat:dog:6]:3] x", [[3, "fox x"], [6, "cat x"], [10, "dog x"]]),  # nested
    ("[(fox:1.2):cat:5]", [[5, "(fox:1.2)"], [10, "cat"]]),  # emphasis kept for later
    ("((fox)) [[a]:2]", [[2, "((fox)) "], [10, "((fox)) [a]"]]),
])
def test_prompt_editing(prompt, expected):
    assert plan(prompt) == expected


def test_alternation_switches_every_step():
    assert [t for _, t in plan("[fox|cat] x", 5)] == ["fox x", "cat x", "fox x", "cat x", "fox x"]
    assert [t for _, t in plan("[a||]b", 4)] == ["ab", "b", "b", "ab"]  # empty options count
    assert [e for e, _ in plan("[fox|cat]", 4)] == [1, 2, 3, 4]


@pytest.mark.parametrize("prompt", [
    "a | b",  # a bar outside alternation: the grammar refuses the whole prompt
    "a [unclosed", "(a|b) [c:3]", "x [a:b:c:3]", "ends with \\",
])
def test_unparsable_prompts_stay_literal(prompt):
    steps = schedule(prompt, 10)
    assert steps[-1] == (10, prompt)
    assert all("[" in text or "|" in text or "\\" in text or "(" in text for _, text in steps)


def test_stray_brackets_beside_an_edit():
    assert plan("((a][:b:c [d:3]") == [[3, "((a][:b:c "], [10, "((a][:b:c d"]]
    assert plan("(a:1.2 [b:c:3]") == [[3, "(a:1.2 b"], [10, "(a:1.2 c"]]  # an unclosed "(" is text


@pytest.mark.parametrize("text, expected", [
    ("a fox", [("a fox", 1.0)]),
    ("a (fox) x", [("a ", 1.0), ("fox", 1.1), (" x", 1.0)]),
    ("a [fox]", [("a ", 1.0), ("fox", 1 / 1.1)]),
    ("(fox:1.5)", [("fox", 1.5)]),
    ("(fox: 0.5 )", [("fox", 0.5)]),
    ("((fox))", [("fox", 1.1 * 1.1)]),
    ("((fox:2))", [("fox", 2 * 1.1)]),
    ("([fox])", [("fox", 1.1 / 1.1)]),
    ("(unclosed", [("unclosed", 1.1)]),
    ("a [b (c", [("a ", 1.0), ("b ", 1 / 1.1), ("c", 1.1 / 1.1)]),
    (r"\(fox\) \[x\] a\\b", [("(fox) [x] a\\b", 1.0)]),
    ("a) b] c:d", [("a) b] c:d", 1.0)]),  # closing brackets that close nothing are text
    ("(a)(b)", [("ab", 1.1)]),  # equal weights join
    ("", [("", 1.0)]),
])
def test_emphasis(text, expected):
    got = emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_nested_weights_multiply_in_a1111s_order():
    # A1111 multiplies inner brackets first; the weights are floats compared exactly when joined
    assert emphasis("(((house:1.3)) a)") == [("house", 1.3 * 1.1 * 1.1), (" a", 1.1)]


def test_break_ends_a_chunk_unless_weighted():
    assert emphasis("a BREAK b") == [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]
    assert emphasis("aBREAKb") == [("aBREAKb", 1.0)]  # only the whole word
    assert emphasis("(a BREAK b)")[1][1] != -1.0  # A1111 weights it too, and reads it as a word


def test_any_text_parses():
    rng = random.Random(0)
    alphabet = "ab ()[]:|\\,.0123456789ANDBREK<>"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert schedule(text, 7)[-1][0] == 7
        assert emphasis(text)


def test_deep_nesting_is_linear_or_literal():
    assert schedule("[" * 40 + "a" + "]" * 40, 5) == ((5, "[" * 40 + "a" + "]" * 40),)
    deep = "(" * 2000 + "a"
    assert schedule(deep, 5) == ((5, deep),)


def test_and_parts_and_weights():
    assert and_parts("a fox AND a cat:0.5 AND snow : -1.25 ") == [("a fox", 1.0), (" a cat", 0.5), (" snow", -1.25)]
    assert and_parts("a fox") == [("a fox", 1.0)]
    assert and_parts("16:9") == [("16", 9.0)]  # a trailing number is a weight, even without AND
    assert and_parts("ANDROID fox") == [("ANDROID fox", 1.0)]  # the word alone


def test_extra_network_tags_are_taken_out():
    text, found = extra_networks("a fox <lora:fox_v2:0.8>, <hypernet:h:1> <lora:x:0.5:0.2>")
    assert text == "a fox ,  "
    assert found == [ExtraNetwork("lora", ("fox_v2", "0.8")), ExtraNetwork("hypernet", ("h", "1")),
                     ExtraNetwork("lora", ("x", "0.5", "0.2"))]
    assert extra_networks("a <b> <:x>") == ("a <b> <:x>", [])


HUGE = "9" * 400  # float() reads it as inf


@pytest.mark.parametrize("text, positive, rule, shown", [
    (f"a (red circle:{HUGE})", True, "may weight words by -100 to 100", "inf on 'red circle'"),
    ("(" * 1000 + "red", False, "may nest brackets at most 100 deep", "1000"),
    ("(" * 49 + "red", True, "may weight words by -100 to 100", "106.719 on 'red'"),  # 1.1**49
    (f"a AND b:{HUGE}", True, "may weight an AND part by -100 to 100", "inf on 'b'"),
    (f"a AND b:-{HUGE}", True, "may weight an AND part by -100 to 100", "-inf on 'b'"),
    (f"((x:0):{HUGE})", False, "may weight words by -100 to 100", "nan on 'x'"),  # 0 * inf
    ("[(x:101):y:0.5]", True, "may weight words by -100 to 100", "101 on 'x'"),  # only in the edit's first half
    ("(x:[1:-101:3])", True, "may weight words by -100 to 100", "-101 on 'x'"),
])
def test_weights_beyond_the_limits_are_named(text, positive, rule, shown):
    found = weight_problem(text, 30, positive)
    assert found is not None and found[0].startswith(rule) and found[1] == shown


@pytest.mark.parametrize("text, positive", [
    ("(" * 48 + "red", True),  # 1.1**48 = 97
    ("[" * 100 + "red", True),  # down to nearly 0: harmless
    ("(a:100) (b:-100) AND c:-100", True),
    (f"a AND b:{HUGE}", False),  # the negative has no AND parts: text
    (f"<lora:x:{HUGE}> fox", True),  # a LoRA's weight is tags.py's
    ("\\(" * 200 + "a", True),  # escaped brackets are text
])
def test_weights_within_the_limits_pass(text, positive):
    assert weight_problem(text, 30, positive) is None
